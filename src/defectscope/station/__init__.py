"""The station on the line: the sorter (files), the results store (a database), the HTTP service and its
dashboard. Built on the torch-free runtime; never imports torch or the export package.
"""
