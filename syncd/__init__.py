"""syncd: an exact, queryable PostgreSQL copy of VSPC backup copy job links, with history."""

# The one place the version is written: pyproject.toml reads it from here (hatch), and
# `syncd --version` answers without importing importlib.metadata.
__version__ = "0.1.0"
