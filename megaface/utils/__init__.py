"""Generic helpers below every domain package (base layer: imports nothing from megaface but vocab).

    progress.py   console progress for long jobs: a bar on a terminal, periodic plain lines when piped
    ranges.py     a numeric range, its text and its one check (config validation and the head's constructors)
"""
