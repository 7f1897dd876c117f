"""Data audit (``defectscope audit``): counts, sizes, duplicates, leakage, metadata-label association and
suspect labels, reported as JSON, CSV lists and one HTML page. Reads data and optionally a frozen model; never
changes a data file."""
