"""Data stage: readers that build the one dataset table, image decoding, splits and the resize cache."""
