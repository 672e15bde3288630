"""megaface: face-recognition training at the scale of millions of identities."""

__version__ = "0.1.0"
