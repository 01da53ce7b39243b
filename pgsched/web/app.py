"""The ASGI application: `create_app`, shared by `pgsched web` and users who mount it.

Owns: assembling the API router, the pages (/ the dashboard, /login, /healthz,
/api/docs), authentication on every route but /login and /healthz, the JSON error
format, and the 1 MiB request body limit.

Invariants: the database and the change feed are opened on the first request that
needs them (a mounted app gets no lifespan events from Starlette), once, under a lock;
`close()` (called by `pgsched web` on shutdown, by a mounting app when it stops) ends
every event stream at once. A traceback never reaches a response: an unexpected error
is logged with it and answered with 500 and one line.

Failure: database errors answer 503 {"error": "database unreachable: ..."} and the next
request tries again; bad input 400/422; missing or wrong credentials 401/403.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import html
import importlib.resources
import re
import urllib.parse
from collections.abc import MutableMapping
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from .. import __version__
from ..config import Settings, load_settings
from ..errors import (
    DatabaseUnavailable,
    InvalidInput,
    JobConflict,
    JobNotFound,
    PgschedError,
    ScheduleConflict,
    ScheduleNotFound,
)
from ..logs import get_logger
from ..ops import task_checker
from ..scheduler import Scheduler
from ..worker.daemon import DB_ERRORS
from .api import router
from .auth import COOKIE, AuthError, Tokens, authorize
from .feed import ChangeFeed

log = get_logger("pgsched.web")
MAX_BODY = 1024 * 1024
STATIC = importlib.resources.files("pgsched.web").joinpath("static")
# Open to anyone: the login form, the health check, and files that hold no data.
OPEN_PATHS = ("/login", "/healthz")
OPEN_PREFIXES = ("/static/", "/api/docs-static/")
# On every response: no framing (clickjacking), no MIME sniffing, no Referer (a login
# URL carries the token), and script only from this service's own files, so that text
# from a row that ever reached the page as HTML still could not run.
POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
          "connect-src 'self'; object-src 'none'; base-uri 'self'; form-action 'self'; "
          "frame-ancestors 'none'")
SECURITY_HEADERS = ((b"content-security-policy", POLICY.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"))


class Service:
    """What the routes share: settings, the Scheduler (its store), the change feed."""

    def __init__(self, target: str | Scheduler, settings: Settings, *, feed_interval: float,
                 heartbeat: float, migrate: bool):
        self.settings = settings
        self._migrate = migrate
        self._target = target
        self._own = isinstance(target, str)
        self._lock = asyncio.Lock()
        self._ready = False
        self.feed_interval, self.heartbeat = feed_interval, heartbeat
        self.scheduler: Scheduler
        self.feed: ChangeFeed
        self.check_task = task_checker(settings)

    async def ready(self) -> Service:
        if self._ready:
            return self
        async with self._lock:
            if not self._ready:
                s = self.settings
                if isinstance(self._target, str):
                    self.scheduler = Scheduler(
                        self._target, schema=s.database.schema, pool_size=max(
                            4, s.database.pool_size),
                        misfire_grace_time=s.jobs.misfire_grace_seconds,
                        application_name="pgsched-web")
                    await self.scheduler.open()
                    if self._migrate:
                        await self.scheduler.migrate()
                else:
                    self.scheduler = self._target
                self.feed = ChangeFeed(self.scheduler.store, self.scheduler.dsn,
                                       interval=self.feed_interval)
                self.feed.start()
                self._ready = True
        return self

    @property
    def store(self) -> Any:
        return self.scheduler.store

    def close_streams(self) -> None:
        if self._ready:
            self.feed.close_streams()

    async def close(self) -> None:
        if not self._ready:
            return
        await self.feed.stop()
        if self._own:
            await self.scheduler.close()
        self._ready = False


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


STATUS_OF = ((InvalidInput, 400), (JobNotFound, 404), (ScheduleNotFound, 404),
             (JobConflict, 409), (ScheduleConflict, 409), (DatabaseUnavailable, 503))


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(PgschedError)
    async def pgsched_error(_request: Request, exc: PgschedError) -> JSONResponse:
        status = next((code for cls, code in STATUS_OF if isinstance(exc, cls)), 409)
        return _error(status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return _error(422, f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(AuthError)
    async def auth_error(_request: Request, exc: AuthError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return _error(exc.status, str(exc), headers)

    # Registered by class, not in `unexpected`: Starlette closes the connection after an
    # error answered there, and these are the client's or a row's doing, not bugs.
    @app.exception_handler(psycopg.DataError)
    async def unstorable(_request: Request, exc: psycopg.DataError) -> JSONResponse:
        # A value PostgreSQL cannot hold: a NUL character in an id, a filter or JSON.
        return _error(400, f"invalid value: {str(exc).strip().splitlines()[0][:200]}")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, DB_ERRORS):
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return _error(503, f"database unreachable: {detail[:200]}")
        if type(exc).__name__ == "UndefinedTable":
            return _error(503, "the pgsched schema is not set up: run `pgsched migrate`")
        log.error("web_request_failed", path=request.url.path, exc_info=exc)
        return _error(500, "internal error; the service log has the details")


class Guard:
    """ASGI middleware: security headers, the body limit and authentication, before any
    route runs."""

    def __init__(self, app: Any, tokens: Tokens):
        self.app, self.tokens = app, tokens

    async def __call__(self, scope: dict, receive: Any, plain_send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, plain_send)

        async def send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                given = {name.lower() for name, _ in message.get("headers", ())}
                message["headers"] = [*message.get("headers", ()), *(
                    header for header in SECURITY_HEADERS if header[0] not in given)]
            await plain_send(message)

        request = Request(scope)
        path = scope["path"][len(scope.get("root_path", "")):] \
            if scope["path"].startswith(scope.get("root_path", "")) else scope["path"]
        if not (path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)):
            try:
                scope.setdefault("state", {})["role"] = authorize(
                    self.tokens, method=scope["method"], headers=request.headers,
                    cookies=request.cookies, any_role=path == "/logout")
            except AuthError as exc:
                if path == "/" and exc.status == 401:
                    return await _login_page(request)(scope, receive, send)
                headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
                return await _error(exc.status, str(exc), headers)(scope, receive, send)
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return await _error(413, "request body over 1 MiB")(scope, receive, send)
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return await self.app(scope, receive, send)
        body, more = bytearray(), True  # chunked bodies have no length: count them
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY:
                return await _error(413, "request body over 1 MiB")(scope, receive, send)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


def _asset(name: str) -> str:
    return STATIC.joinpath(name).read_text("utf-8")


def _login_page(request: Request, message: str = "", status: int = 401) -> HTMLResponse:
    root = html.escape(request.scope.get("root_path", ""), quote=True)
    page = _asset("login.html").replace("{{message}}", message).replace("{{root}}", root)
    return HTMLResponse(page, status_code=status)


def create_app(
    target: str | Scheduler, *, token: str, read_token: str | None = None,
    settings: Settings | None = None, feed_interval: float = 0.15, heartbeat: float = 15.0,
    migrate: bool = False,
) -> FastAPI:
    """The pgsched web app for a DSN (it opens its own pool) or an open Scheduler (used as
    it is, never closed here). `token` allows everything, `read_token` GET only;
    `settings` gives the schema, time zone, task module and lease (default: pgsched's
    defaults); `migrate` applies pending migrations on first use (DSN only). Mount it
    anywhere: every URL it makes is relative to where it is served."""
    if not token:
        raise InvalidInput("create_app needs a token: every request must authenticate")
    settings = settings or load_settings(None, env={})
    tokens = Tokens(token, read_token)
    app = FastAPI(title="pgsched", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json")
    app.state.pgsched = Service(target, settings, feed_interval=feed_interval,
                                heartbeat=heartbeat, migrate=migrate)
    _install_errors(app)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    # Swagger UI's files come from fastapi-offline (part of the extra): no CDN.
    docs_files = importlib.resources.files("fastapi_offline").joinpath("static")
    app.mount("/api/docs-static", StaticFiles(directory=str(docs_files)), name="docs")

    @app.get("/api/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_swagger_ui_html(
            openapi_url=f"{root}/api/openapi.json", title="pgsched API",
            swagger_js_url=f"{root}/api/docs-static/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/api/docs-static/swagger-ui.css",
            swagger_favicon_url=f"{root}/static/favicon.svg")
        # Swagger UI starts from one inline script: allow exactly it, by its hash; its
        # widgets set inline styles.
        digests = (hashlib.sha256(code).digest()
                   for code in re.findall(rb"<script>(.*?)</script>", page.body, re.S))
        hashes = " ".join(f"'sha256-{base64.b64encode(d).decode()}'" for d in digests)
        page.headers["content-security-policy"] = POLICY.replace(
            "script-src 'self'", f"script-src 'self' {hashes}").replace(
            "style-src 'self'", "style-src 'self' 'unsafe-inline'")
        return page

    @app.get("/healthz", include_in_schema=False)
    async def healthz(request: Request) -> Response:
        svc = request.app.state.pgsched
        try:
            await (await svc.ready()).store.db_now()
        except DB_ERRORS:
            return _error(503, "database unreachable")
        return JSONResponse({"ok": True, "clients": svc.feed.clients})

    def log_in(request: Request, token: str) -> Response:
        role = tokens.role_of_token(token)
        if role is None:
            return _login_page(request, "That token is not valid.")
        root = request.scope.get("root_path", "")
        response = RedirectResponse(f"{root}/", status_code=303)
        response.set_cookie(COOKIE, tokens.cookie_for(role), httponly=True, samesite="strict",
                            path=f"{root}/", secure=request.url.scheme == "https")
        return response

    @app.get("/login", include_in_schema=False)
    async def login(request: Request, token: str | None = None) -> Response:
        if token is None:
            return _login_page(request, status=200)
        return log_in(request, token)  # the URL `pgsched web` prints

    @app.post("/login", include_in_schema=False)
    async def login_form(request: Request) -> Response:
        # The form posts: a typed token stays out of URLs (history, a proxy's access log).
        fields = urllib.parse.parse_qs((await request.body()).decode("utf-8", "replace"))
        return log_in(request, (fields.get("token") or [""])[0])

    @app.post("/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        response = JSONResponse({"ok": True})
        response.delete_cookie(COOKIE, path=f"{request.scope.get('root_path', '')}/")
        return response

    @app.get("/", include_in_schema=False)
    async def dashboard(request: Request) -> HTMLResponse:
        role = request.scope.get("state", {}).get("role", "read")
        root = html.escape(request.scope.get("root_path", ""), quote=True)
        page = _asset("index.html").replace("{{role}}", role).replace("{{root}}", root)
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    app.add_middleware(Guard, tokens=tokens)
    return app
