"""`python -m adapters_cli ...` is the `adapters` command."""

import sys

from adapters_cli.main import main

sys.exit(main())
