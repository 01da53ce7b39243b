"""The `pgsched` command: app.py owns the typer app, the global options, errors -> exit
codes and output; each command module registers one group of commands on it.

Command modules import app.py (and views.py for rendering), never each other; importing
this package registers them all. `web` (the HTTP service) has its own module
like the others.
"""

# The order is the order of `pgsched --help`.
from . import operate, jobs, schedules, queues, top, web  # noqa: F401, I001  (register their commands)
from .app import app, main

__all__ = ["app", "main"]
