"""create_app mounted in a user's own ASGI app, over an open Scheduler: every URL works
under the prefix, the app never closes the Scheduler it was given, and close() ends it."""

from __future__ import annotations

import httpx
import pytest

pytest.importorskip("fastapi")

from starlette.applications import Starlette
from starlette.routing import Mount

from pgsched.config import load_settings
from pgsched.web import create_app

TOKEN = "mounted-token-0123456789"


async def test_mounted_under_a_prefix_on_an_open_scheduler(sched):
    settings = load_settings(None, env={}, overrides={"database.schema": sched.schema})
    ui = create_app(sched, token=TOKEN, settings=settings)
    outer = Starlette(routes=[Mount("/scheduler", app=ui)])
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=outer),
                                 base_url="http://app.test") as client:
        await sched.schedule("noop", job_id="mounted-1")
        jobs = (await client.get("/scheduler/api/jobs", headers=auth)).json()["jobs"]
        assert [j["id"] for j in jobs] == ["mounted-1"]
        page = await client.get("/scheduler/", headers=auth)
        assert page.status_code == 200 and '<base href="/scheduler/">' in page.text
        login = await client.get("/scheduler/login", params={"token": TOKEN})
        assert login.headers["location"] == "/scheduler/"
        assert "Path=/scheduler/" in login.headers["set-cookie"]
        assert (await client.get("/scheduler/api/jobs")).status_code == 200  # the cookie
        client.cookies.clear()
        assert (await client.get("/scheduler/api/jobs")).status_code == 401
        assert (await client.get("/scheduler/static/app.js")).status_code == 200
    await ui.state.pgsched.close()
    assert (await sched.get_job("mounted-1"))["status"] == "pending"  # still open


def test_create_app_refuses_to_run_without_a_token():
    with pytest.raises(ValueError, match="needs a token"):
        create_app("postgresql://unused", token="")
