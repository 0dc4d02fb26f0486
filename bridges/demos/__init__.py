"""Runnable demos: ``python -m bridges.demos.<name> --help``."""
