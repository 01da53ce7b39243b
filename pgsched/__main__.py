"""`python -m pgsched` is the `pgsched` command."""

from .cli import main

main()
