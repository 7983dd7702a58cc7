"""The `adapters` command line: the composition root (nothing imports this package)."""
