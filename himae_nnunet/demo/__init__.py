"""The demo: the whole chain on synthetic CT (or your scans), every stage as the real command."""
