"""`pgsched web`: the HTTP API and the live dashboard (pgsched/web/, extra pgsched[web]).

Owns only the command: its options and the hand-over to pgsched.web.serve. FastAPI and
uvicorn are imported when the command runs, never when the CLI starts.
"""

from __future__ import annotations

from typing import Annotated

import typer

from .app import _ctx, app, command, resolve_dsn


@app.command()
@command
def web(ctx: typer.Context, listen: Annotated[str | None, typer.Option(
        help="host:port (default: [web] listen, 127.0.0.1:8787).")] = None) -> None:
    """Serve the HTTP API and the live dashboard (needs pgsched[web]); see docs/web.md."""
    from ..logs import configure
    from ..web.serve import run  # lazy: FastAPI is imported only by this command

    settings = _ctx(ctx).settings(**{"web.listen": listen})
    configure(settings.log.level, settings.log.format)
    run(settings, resolve_dsn(settings, start_embedded=True))
