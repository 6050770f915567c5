"""Entry points of this package's executables: thin, over the library modules."""
