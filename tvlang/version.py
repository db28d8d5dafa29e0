"""The version of tvlang (one place; the package and the metadata it writes read it here)."""

__version__ = "0.2.0"
