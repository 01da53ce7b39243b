"""`pgsched web`: run the web app under uvicorn until SIGTERM or SIGINT.

Owns: the start-up rules. With no [web] token configured a random one is made for this
run and the login URL is printed on stderr (as Jupyter does); listening on an address
other than loopback without a configured token is refused (exit 2), since anyone who
can reach the port could otherwise act on the jobs. On SIGTERM every event stream is
ended at once, so the server stops without waiting for clients that never leave.

Failure: a missing `web` extra, a port in use or a refused listen end the command with
one line and exit 1 or 2.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import signal
import sys
from typing import Any

from ..config import Settings, parse_listen
from ..errors import InvalidInput, PgschedError
from ..logs import get_logger

log = get_logger("pgsched.web")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(settings: Settings, dsn: str) -> None:
    """Serve [web] listen until a signal; the CLI's `pgsched web` calls this."""
    host, port = parse_listen(settings.web.listen)
    token = settings.web.token
    if token is None:
        if not is_loopback(host):
            raise InvalidInput(
                f"refusing to listen on {host} without a token: set [web] token (anyone who "
                "can reach the port could act on your jobs), or listen on 127.0.0.1")
        token = secrets.token_urlsafe(24)
    try:
        import uvicorn

        from .app import create_app
    except ModuleNotFoundError as exc:
        raise PgschedError(f"pgsched web needs the web extra ({exc.name} is missing): "
                           "pip install 'pgsched[web]'") from None
    # Migrates on first use, like `pgsched worker`: the embedded default works at once.
    app = create_app(dsn, token=token, read_token=settings.web.read_token, settings=settings,
                     migrate=True)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # End the event streams (else uvicorn waits for every SSE client), from the
            # loop: this runs in a signal handler. Not calling super(): uvicorn would
            # raise the signal again at the end, and a clean stop should exit 0.
            asyncio.get_event_loop().call_soon_threadsafe(app.state.pgsched.close_streams)
            self.force_exit = self.should_exit and sig == signal.SIGINT
            self.should_exit = True

    config = uvicorn.Config(app, host=host, port=port, root_path=settings.web.root_path,
                            log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=5)
    server = Server(config)

    async def serve() -> None:
        await app.state.pgsched.ready()  # migrate and connect before saying "listening"
        announce = asyncio.create_task(_announce(server, settings, token))
        try:
            await server.serve()
        except SystemExit:  # uvicorn's way to fail at start-up; it logged the reason
            server.started = False
        finally:
            announce.cancel()
            await app.state.pgsched.close()
        if not server.started:
            raise PgschedError(f"cannot listen on {settings.web.listen}: the port is in use, "
                               "or the host is not an address of this machine")

    asyncio.run(serve())


async def _announce(server: Any, settings: Settings, token: str) -> None:
    while not server.started:
        await asyncio.sleep(0.05)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    base = f"http://{shown}:{port}{settings.web.root_path}"
    log.info("web_listening", url=f"{base}/", api=f"{base}/api/docs")
    if settings.web.token is None:
        # Only a generated token is printed: a configured one is the operator's secret.
        sys.stderr.write(f"pgsched web: open {base}/login?token={token}\n")
    else:
        sys.stderr.write(f"pgsched web: listening on {base}/\n")
    sys.stderr.flush()
