"""`python -m adapters_cli ...` is the `adapters` command."""

from adapters_cli.main import entry

entry()
