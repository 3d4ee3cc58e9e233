"""Names syncd reads from its surroundings: environment variables and the default config file.

A module of constants only, so `syncd --help` can name them without importing the config
loader.
"""

CONFIG_ENV = "SYNCD_CONFIG"
DATABASE_URL_ENV = "SYNCD_DATABASE_URL"
DEFAULT_CONFIG_NAME = "syncd.toml"
