"""The `pgsched` command: app.py owns the typer app, the global options, errors -> exit
codes and output; each command module registers one group of commands on it.

Command modules import app.py (and views.py for rendering), never each other. app.py names
every command and its module in COMMAND_MODULES and imports a module only when one of its
commands is used, so start-up pays for the command that runs. `web` (the HTTP service) has
its own module like the others.
"""

from .app import app, main

__all__ = ["app", "main"]
