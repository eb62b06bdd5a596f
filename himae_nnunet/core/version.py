"""The package version, recorded in every checkpoint and plans file we write."""
__version__ = "0.1.0"
