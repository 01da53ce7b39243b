"""`pgsched top`: the live dashboard, and its terminal session.

Owns: the terminal session of the dashboard: alternate screen, keys read in cbreak mode, one
refresh per interval. The frame itself is rendered by views.dashboard_view.

Invariants: the live loop always restores the terminal (its mode, the main screen, the
cursor) however it ends: q, Ctrl-C, SIGTERM or an error.

Failure: a refresh that cannot reach the database keeps the last snapshot on screen with
the error in the header and tries again on the next tick; any other error ends the loop
(after restoring the terminal) and propagates to the CLI.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import termios
import tty
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Annotated

import typer

from .app import _run, app, command, open_scheduler, out, print_view, settings_of

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from ..ops import Snapshot


@app.command()
@command
def top(
    ctx: typer.Context,
    interval: Annotated[float, typer.Option(
        min=0.2, max=3600, help="Seconds between refreshes.")] = 1.0,
    rows: Annotated[int, typer.Option(
        min=1, max=1000, help="Most rows per job list (fewer if the screen is short).")] = 10,
) -> None:
    """Live dashboard: workers, running jobs, next due jobs, recent failures, throughput.
    q or Ctrl-C quits. When stdout is not a terminal it prints one snapshot and exits."""
    from ..ops import gather
    from ..worker.context import DB_ERRORS
    from .views import dashboard_view

    settings = settings_of(ctx)
    console = out.real()
    title = f"pgsched top · schema {settings.database.schema}"

    async def go() -> None:
        async with open_scheduler(settings) as sched:
            async def fetch():
                return await gather(sched.store, stale_after=settings.worker.lease_seconds,
                                    dashboard=True, rows=rows)

            if not console.is_terminal:  # one snapshot, and no keys to press
                print_view(dashboard_view(await fetch(), title=title))
                return

            def render(snapshot):
                return dashboard_view(snapshot, title=f"{title} · q quits",
                                      height=console.size.height)

            await run_live(fetch, render, console, interval=interval, errors=DB_ERRORS)

    _run(go())


# -- the live loop ---------------------------------------------------------------------


@contextlib.contextmanager
def _keys(on_key: Callable[[str], None]) -> Iterator[None]:
    """Deliver single keypresses from a terminal stdin (cbreak mode: Ctrl-C still sends
    SIGINT); does nothing when stdin is not a terminal."""
    import asyncio

    if not sys.stdin.isatty():
        yield
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    loop = asyncio.get_running_loop()

    def readable() -> None:
        data = os.read(fd, 32)
        for char in data.decode(errors="replace"):
            on_key(char)

    tty.setcbreak(fd)
    loop.add_reader(fd, readable)
    try:
        yield
    finally:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)

async def run_live(
    fetch: Callable[[], Awaitable[Snapshot]],
    render: Callable[[Snapshot], RenderableType],
    console: Console,
    *,
    interval: float = 1.0,
    errors: tuple[type[BaseException], ...] = (),
    fetch_timeout: float = 10.0,
) -> None:
    """Show render(fetch()) full screen, refreshed every `interval` s, until q, Ctrl-C or
    SIGTERM. A refresh that raises one of `errors` or takes longer than `fetch_timeout`
    keeps the last frame, marked with the error. Quitting never waits for a refresh."""
    import asyncio

    from rich.live import Live

    from .views import one_line

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    def on_key(char: str) -> None:
        if char in ("q", "Q"):
            stop.set()

    try:
        snapshot = await fetch()
        with _keys(on_key), Live(render(snapshot), console=console, screen=True,
                                 auto_refresh=False, transient=True) as live:
            tick = loop.time()
            while True:
                # Ticks keep to the interval however long a fetch takes; after a stall
                # (a suspended terminal) the next one is simply a full interval away.
                tick = max(tick + interval, loop.time())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), tick - loop.time())
                if stop.is_set():
                    return
                refresh = asyncio.ensure_future(fetch())
                stopping = asyncio.ensure_future(stop.wait())
                await asyncio.wait({refresh, stopping}, timeout=fetch_timeout,
                                   return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if not refresh.done():
                    # A database that went away can leave a query waiting for minutes.
                    refresh.cancel()
                    with contextlib.suppress(asyncio.CancelledError, *errors):
                        await refresh
                    if stop.is_set():
                        return
                    snapshot.error = f"no answer from the database within {fetch_timeout:g}s"
                elif isinstance(refresh.exception(), errors):
                    snapshot.error = one_line(str(refresh.exception()) or "database error", 80)
                else:
                    snapshot = refresh.result()
                live.update(render(snapshot), refresh=True)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
