"""The release's version: the one place it is written (pyproject.toml reads it; build.py rewrites it
in a scratch copy of the tree to build another release)."""

__version__ = "1.0.0"
