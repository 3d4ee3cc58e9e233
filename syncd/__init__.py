"""syncd: an exact, queryable PostgreSQL copy of VSPC backup copy job links, with history."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("syncd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
