"""pgsched's version, in a module of its own so that any module can read it without
importing the package (and with it the whole public API: an import cycle)."""

__version__ = "0.1.0"
