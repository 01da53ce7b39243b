"""`pgsched web`: an HTTP API, a live event stream and a dashboard over pgsched's schema.

Owns: `create_app`, the ASGI application (FastAPI) that `pgsched web` serves and that a
user's own ASGI app can mount, e.g. `app.mount("/scheduler", create_app(dsn, token=...))`.
It needs the `web` extra (FastAPI, uvicorn); importing this package does not import them,
so `pgsched.web.serve` can explain a missing extra in one line.

Modules: auth.py (tokens, session cookies, Origin check), feed.py (the change feed behind
/api/events), api.py (the JSON API), app.py (assembly, errors, limits, pages), serve.py
(the `pgsched web` command), static/ (the dashboard: plain JS modules and CSS).
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(name)
