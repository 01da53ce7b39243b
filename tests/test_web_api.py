"""The web API against a real `pgsched web` process and a real database: every endpoint's
success and failure statuses, authentication (401/403), the Origin check on cookie
writes, the 1 MiB body limit, the start-up rules, and an SSE client that watches a job
added by `pgsched add` run on a real worker.

One web process serves the module (starting one costs a second); each test uses its own
ids, so tests do not see each other's jobs.
"""

from __future__ import annotations

import json
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from conftest import run_cli, wait_until, write_config
from webutil import READ_TOKEN, TOKEN, SseReader, WebProcess, add_web_section

pytest.importorskip("fastapi")

AUTH = {"Authorization": f"Bearer {TOKEN}"}
READ = {"Authorization": f"Bearer {READ_TOKEN}"}


@pytest.fixture(scope="module")
def web_env(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    schema = f"t_web_{uuid.uuid4().hex[:8]}"
    directory = tmp_path_factory.mktemp("web")
    config = add_web_section(write_config(directory, pg_dsn, schema), token=TOKEN,
                             read_token=READ_TOKEN)
    web = WebProcess(config, "--listen", "127.0.0.1:0")
    try:
        yield {"config": config, "web": web, "url": web.url, "schema": schema, "dsn": pg_dsn}
    finally:
        web.stop()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
async def api(web_env: dict) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=web_env["url"], timeout=30) as client:
        yield client


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def job_count(env: dict) -> int:
    with psycopg.connect(env["dsn"], autocommit=True) as conn:
        return conn.execute(f'SELECT count(*) FROM "{env["schema"]}".jobs').fetchone()[0]


def cli(env: dict, *args: str, code: int = 0) -> str:
    result = run_cli(*args, config=env["config"])
    assert result.returncode == code, result.stderr
    return result.stdout


# -- authentication ----------------------------------------------------------------------


async def test_every_route_but_healthz_and_login_needs_credentials(api):
    for method, path in [("GET", "/api/jobs"), ("GET", "/api/status"), ("GET", "/api/events"),
                         ("POST", "/api/jobs"), ("GET", "/api/openapi.json"),
                         ("DELETE", "/api/schedules/x")]:
        response = await api.request(method, path)
        assert response.status_code == 401, (method, path)
        assert "authentication required" in response.json()["error"]
    wrong = await api.get("/api/jobs", headers={"Authorization": "Bearer nope-nope-nope-nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert (await api.get("/healthz")).json()["ok"] is True
    page = await api.get("/")  # the dashboard answers a stranger with the login form
    assert page.status_code == 401 and 'name="token"' in page.text


async def test_the_read_token_reads_but_every_write_is_403_and_writes_nothing(api, web_env):
    assert (await api.get("/api/jobs", headers=READ)).status_code == 200
    before = job_count(web_env)
    for method, path in [("POST", "/api/jobs"), ("POST", "/api/queues/q1/pause"),
                         ("DELETE", "/api/jobs/x"), ("POST", "/api/jobs/retry")]:
        response = await api.request(method, path, headers=READ,
                                     json={"task": "noop"} if path == "/api/jobs" else None)
        assert response.status_code == 403, path
        assert response.json() == {"error": "the read token allows GET only"}
    assert job_count(web_env) == before


async def test_login_cookie_is_httponly_strict_and_cookie_writes_need_this_origin(api, web_env):
    bad = await api.get("/login", params={"token": "wrong-wrong-wrong-wrong"})
    assert bad.status_code == 401 and "not valid" in bad.text
    login = await api.get("/login", params={"token": TOKEN})
    assert login.status_code == 303 and login.headers["location"] == "/"
    cookie = login.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and TOKEN not in cookie
    session = cookie.split(";")[0]
    host = web_env["url"].removeprefix("http://")
    assert (await api.get("/api/jobs", headers={"Cookie": session})).status_code == 200
    body = {"task": "noop", "id": uid("csrf")}
    for origin in (None, "http://evil.example", "null"):
        headers = {"Cookie": session} | ({"Origin": origin} if origin else {})
        refused = await api.post("/api/jobs", json=body, headers=headers)
        assert refused.status_code == 403, origin
        assert "cross-origin" in refused.json()["error"]
    assert (await api.get(f"/api/jobs/{body['id']}", headers=AUTH)).status_code == 404
    done = await api.post("/api/jobs", json=body,
                          headers={"Cookie": session, "Origin": f"http://{host}"})
    assert done.status_code == 201
    page = await api.get("/", headers={"Cookie": session})
    assert page.status_code == 200 and 'data-role="write"' in page.text
    read_login = await api.get("/login", params={"token": READ_TOKEN})
    read_session = read_login.headers["set-cookie"].split(";")[0]
    page = await api.get("/", headers={"Cookie": read_session})
    assert 'data-role="read"' in page.text  # the dashboard hides its buttons
    logout = await api.post("/logout", headers={"Cookie": session, "Origin": f"http://{host}"})
    assert logout.status_code == 200 and 'pgsched_session=""' in logout.headers["set-cookie"]
    forged = "write." + "0" * 64
    assert (await api.get("/api/jobs", headers={"Cookie": f"pgsched_session={forged}"})
            ).status_code == 401


async def test_a_body_over_one_mib_is_413_and_writes_nothing(api, web_env):
    before = job_count(web_env)
    big = json.dumps({"task": "noop", "args": ["x" * (1024 * 1024)]})
    response = await api.post("/api/jobs", content=big,
                              headers=AUTH | {"Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json() == {"error": "request body over 1 MiB"}

    async def chunks():  # no Content-Length: the limit counts the streamed bytes
        for _ in range(17):
            yield b" " * 65536

    chunked = await api.post("/api/jobs", content=chunks(), headers=AUTH)
    assert chunked.status_code == 413
    assert job_count(web_env) == before


# -- jobs --------------------------------------------------------------------------------


async def test_post_job_with_unique_for_returns_the_holder_with_200(api, web_env):
    key = uid("unique")
    body = {"task": "noop", "unique_for": "10m", "unique_key": key}
    first = await api.post("/api/jobs", headers=AUTH, json=body)
    again = await api.post("/api/jobs", headers=AUTH, json=body | {"unique_for": 600})
    assert (first.status_code, again.status_code) == (201, 200), again.text
    assert again.json()["id"] == first.json()["id"]
    before = job_count(web_env)
    for bad, message in (({"unique_key": key}, "unique_for"),
                         ({"unique_for": "soon"}, "invalid duration"),
                         ({"unique_for": 5, "on_conflict": "replace"}, "replace")):
        refused = await api.post("/api/jobs", headers=AUTH, json={"task": "noop"} | bad)
        assert refused.status_code == 400 and message in refused.text, refused.text
    assert job_count(web_env) == before


async def test_post_job_with_depends_on_waits_and_refuses_unknown_ids(api, web_env):
    first = await api.post("/api/jobs", headers=AUTH, json={"task": "noop", "delay": "1h"})
    dep = first.json()["id"]
    waiting = await api.post("/api/jobs", headers=AUTH,
                             json={"task": "noop", "depends_on": [dep]})
    assert waiting.status_code == 201, waiting.text
    assert waiting.json()["waiting_for"] == [dep]
    before = job_count(web_env)
    for bad, message in (({"depends_on": ["no-such-job"]}, "no job"),
                         ({"depends_on": [dep], "unique_for": 60}, "depends_on")):
        refused = await api.post("/api/jobs", headers=AUTH, json={"task": "noop"} | bad)
        assert refused.status_code == 400 and message in refused.text, refused.text
    assert job_count(web_env) == before


async def test_post_job_returns_the_ls_json_object_and_validates_like_add(api, web_env):
    job_id = uid("add")
    created = await api.post("/api/jobs", headers=AUTH, json={
        "task": "add", "args": [1, 2], "id": job_id, "delay": "1h", "priority": "critical",
        "max_retries": 2, "timeout": 30, "queue": "math"})
    assert created.status_code == 201, created.text
    job = created.json()
    listed = json.loads(cli(web_env, "ls", "--json", "--task", "add", "--limit", "1000"))
    [same] = [j for j in listed if j["id"] == job_id]
    assert job == same | {"queue": "math"}
    assert (job["status"], job["priority"], job["max_retries"]) == ("pending", "critical", 2)

    before = job_count(web_env)
    bad = [
        ({"task": "bad name!"}, 400, "invalid task name"),
        ({"task": "no_such_task"}, 400, "unknown task 'no_such_task'"),
        ({"task": "noop", "execution_time": "tomorrow"}, 400, "invalid time"),
        ({"task": "noop", "execution_time": "2030-01-01T00:00Z", "delay": 5}, 400,
         "either execution_time or delay"),
        ({"task": "noop", "delay": "-5m"}, 400, "negative"),
        ({"task": "noop", "delay": -5}, 400, '"delay" must be a number of seconds'),
        ({"task": "noop", "queue": "bad queue"}, 400, "invalid queue name"),
        ({"task": "noop", "args": {"a": 1}}, 422, "args"),
        ({"task": "noop", "priority": "urgent"}, 422, "priority"),
        ({"task": "noop", "colour": "blue"}, 422, "colour"),
        ({"task": "noop", "max_retries": -1}, 422, "max_retries"),
    ]
    for body, status, text in bad:
        response = await api.post("/api/jobs", json=body, headers=AUTH)
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert text in error and "\n" not in error and "Traceback" not in error, error
    malformed = await api.post("/api/jobs", content=b"{not json", headers=AUTH | {
        "Content-Type": "application/json"})
    assert malformed.status_code == 422
    assert job_count(web_env) == before

    again = {"task": "noop", "id": job_id}
    assert (await api.post("/api/jobs", json=again, headers=AUTH)).status_code == 409
    kept = await api.post("/api/jobs", json=again | {"on_conflict": "ignore"}, headers=AUTH)
    assert kept.status_code == 200 and kept.json()["task"] == "add"
    replaced = await api.post("/api/jobs", json=again | {"on_conflict": "replace"},
                              headers=AUTH)
    assert replaced.status_code == 201 and replaced.json()["task"] == "noop"


async def test_jobs_are_listed_newest_first_in_keyset_pages_with_filters(api):
    queue = uid("page")
    ids = [f"{queue}-{n}" for n in range(5)]
    for job_id in ids:
        response = await api.post("/api/jobs", headers=AUTH, json={
            "task": "noop", "id": job_id, "queue": queue, "delay": 3600})
        assert response.status_code == 201
    seen, cursor = [], None
    while True:
        params = {"queue": queue, "limit": 2} | ({"before": cursor} if cursor else {})
        page = (await api.get("/api/jobs", params=params, headers=AUTH)).json()
        assert len(page["jobs"]) <= 2
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    await api.post(f"/api/jobs/{ids[0]}/cancel", headers=AUTH)
    cancelled = (await api.get("/api/jobs", headers=AUTH, params={
        "queue": queue, "status": "cancelled"})).json()
    assert [j["id"] for j in cancelled["jobs"]] == [ids[0]]
    for params, status in [({"status": "done"}, 400), ({"before": "garbage"}, 400),
                           ({"queue": "a b"}, 400), ({"limit": 0}, 422),
                           ({"limit": 501}, 422)]:
        response = await api.get("/api/jobs", params=params, headers=AUTH)
        assert response.status_code == status, params
        assert set(response.json()) == {"error"}


async def test_job_detail_is_what_show_json_prints(api, web_env):
    job_id = uid("show")
    await api.post("/api/jobs", json={"task": "add", "args": [2, 3], "id": job_id},
                   headers=AUTH)
    detail = (await api.get(f"/api/jobs/{job_id}", headers=AUTH)).json()
    shown = json.loads(cli(web_env, "show", job_id, "--json"))
    assert detail == shown | {"queue": "default"}
    missing = await api.get("/api/jobs/nope", headers=AUTH)
    assert missing.status_code == 404 and missing.json() == {"error": "job nope: not found"}


async def test_cancel_and_delete_cancel_a_pending_job_once(api):
    for method, suffix in [("POST", "/cancel"), ("DELETE", "")]:
        job_id = uid("cancel")
        await api.post("/api/jobs", json={"task": "noop", "id": job_id, "delay": 600},
                       headers=AUTH)
        done = await api.request(method, f"/api/jobs/{job_id}{suffix}", headers=AUTH)
        assert done.status_code == 200 and done.json()["status"] == "cancelled"
        again = await api.request(method, f"/api/jobs/{job_id}{suffix}", headers=AUTH)
        assert again.status_code == 409
        assert again.json()["error"] == f"job {job_id}: already cancelled"
        assert (await api.request(method, f"/api/jobs/none{suffix}", headers=AUTH)
                ).status_code == 404


async def test_retry_puts_a_failed_job_back_and_bulk_retry_takes_the_rest(api, web_env):
    task = "fail"
    ids = [uid("failing") for _ in range(3)]
    for job_id in ids:
        await api.post("/api/jobs", json={"task": task, "id": job_id}, headers=AUTH)
    cli(web_env, "worker", "--burst")
    statuses = {i: (await api.get(f"/api/jobs/{i}", headers=AUTH)).json()["status"]
                for i in ids}
    assert set(statuses.values()) == {"failed"}
    retried = await api.post(f"/api/jobs/{ids[0]}/retry", headers=AUTH)
    assert retried.status_code == 200 and retried.json()["status"] == "pending"
    again = await api.post(f"/api/jobs/{ids[0]}/retry", headers=AUTH)
    assert again.status_code == 409 and "is pending" in again.json()["error"]
    assert (await api.post("/api/jobs/none/retry", headers=AUTH)).status_code == 404
    bulk = await api.post("/api/jobs/retry", json={"status": ["failed"], "task": task},
                          headers=AUTH)
    assert bulk.status_code == 200
    assert set(ids[1:]) <= set(bulk.json()["ids"])
    assert (await api.post("/api/jobs/retry", json={"status": ["completed"]}, headers=AUTH)
            ).status_code == 422


# -- schedules ---------------------------------------------------------------------------


async def test_schedules_can_be_created_read_changed_paused_triggered_and_removed(api):
    sid = uid("sched")
    body = {"id": sid, "task": "noop", "every": "1h"}
    created = await api.post("/api/schedules", json=body, headers=AUTH)
    assert created.status_code == 201, created.text
    assert (created.json()["every"], created.json()["state"]) == ("1h", "active")
    assert (await api.post("/api/schedules", json=body, headers=AUTH)).status_code == 409
    kept = await api.post("/api/schedules", json=body | {"every": "2h", "on_conflict": "ignore"},
                          headers=AUTH)
    assert kept.status_code == 200 and kept.json()["every"] == "1h"
    for bad, status in [({"id": uid("s"), "task": "noop", "cron": "not cron"}, 400),
                        ({"id": uid("s"), "task": "noop"}, 400),
                        ({"id": "bad id!", "task": "noop", "every": "1h"}, 400),
                        ({"id": uid("s"), "task": "noop", "every": "1h", "x": 1}, 422)]:
        response = await api.post("/api/schedules", json=bad, headers=AUTH)
        assert response.status_code == status, (bad, response.text)
    changed = await api.put(f"/api/schedules/{sid}", headers=AUTH,
                            json={"task": "noop", "cron": "*/5 * * * *", "tz": "UTC"})
    assert changed.status_code == 200 and changed.json()["cron"] == "*/5 * * * *"
    assert (await api.put("/api/schedules/none", json={"task": "noop", "every": "1h"},
                          headers=AUTH)).status_code == 404
    paused = await api.post(f"/api/schedules/{sid}/pause", headers=AUTH)
    assert paused.json()["state"] == "paused" and paused.json()["next_fire_at"] is None
    resumed = await api.post(f"/api/schedules/{sid}/resume", headers=AUTH)
    assert resumed.json()["state"] == "active"
    triggered = await api.post(f"/api/schedules/{sid}/trigger", headers=AUTH)
    assert triggered.status_code == 201 and triggered.json()["id"].startswith(f"{sid}@trigger")
    listed = (await api.get("/api/schedules", headers=AUTH)).json()["schedules"]
    [mine] = [s for s in listed if s["id"] == sid]
    assert [o["id"] for o in mine["outcomes"]] == [triggered.json()["id"]]
    assert (await api.get(f"/api/schedules/{sid}", headers=AUTH)).json()["id"] == sid
    for action in ("pause", "resume", "trigger"):
        assert (await api.post(f"/api/schedules/none/{action}", headers=AUTH)
                ).status_code == 404
    assert (await api.delete(f"/api/schedules/{sid}", headers=AUTH)).status_code == 200
    assert (await api.get(f"/api/schedules/{sid}", headers=AUTH)).status_code == 404
    assert (await api.delete(f"/api/schedules/{sid}", headers=AUTH)).status_code == 404


# -- queues, status, workers, docs -------------------------------------------------------


async def test_queues_pause_and_resume_like_the_cli(api, web_env):
    queue = uid("q")
    paused = await api.post(f"/api/queues/{queue}/pause", json={"reason": "deploy"},
                            headers=AUTH)
    assert paused.json() == {"queue": queue, "paused": True, "changed": True}
    again = await api.post(f"/api/queues/{queue}/pause", headers=AUTH)
    assert again.json()["changed"] is False
    listed = json.loads(cli(web_env, "queues", "--json"))
    [row] = [q for q in listed if q["queue"] == queue]
    assert row["paused"] and row["reason"] == "deploy"
    api_rows = (await api.get("/api/queues", headers=AUTH)).json()["queues"]
    assert [q for q in api_rows if q["queue"] == queue] == [row]
    resumed = await api.post(f"/api/queues/{queue}/resume", headers=AUTH)
    assert resumed.json() == {"queue": queue, "paused": False, "changed": True}
    bad = await api.post("/api/queues/bad%20name/pause", headers=AUTH)
    assert bad.status_code == 400 and "invalid queue name" in bad.json()["error"]


async def test_status_and_workers_have_the_shape_of_the_cli_json(api, web_env):
    status = (await api.get("/api/status", headers=AUTH)).json()
    assert set(status) == set(json.loads(cli(web_env, "status", "--json")))
    active = (await api.get("/api/status", params={"active": "true"}, headers=AUTH)).json()
    assert set(active) == set(status)
    assert active["totals"]["pending"] == status["totals"]["pending"]
    assert (await api.get("/api/workers", headers=AUTH)).json() == \
        json.loads(cli(web_env, "workers", "--json") or "[]")
    series = (await api.get("/api/throughput", headers=AUTH)).json()
    assert isinstance(series["minutes"], list)


async def test_openapi_and_docs_are_served_without_any_cdn(api):
    spec = (await api.get("/api/openapi.json", headers=AUTH)).json()
    for path in ("/api/jobs", "/api/jobs/{job_id}/retry", "/api/schedules/{schedule_id}",
                 "/api/queues/{name}/pause", "/api/events", "/api/status"):
        assert path in spec["paths"], path
    docs = await api.get("/api/docs", headers=AUTH)
    assert docs.status_code == 200 and "/api/docs-static/swagger-ui-bundle.js" in docs.text
    assert "cdn" not in docs.text.lower()
    asset = await api.get("/api/docs-static/swagger-ui-bundle.js")
    assert asset.status_code == 200


# -- events ------------------------------------------------------------------------------


async def test_sse_client_sees_a_cli_job_run_on_a_real_worker(api, web_env, workers):
    reader = SseReader(api, "/api/events", AUTH)
    try:
        await wait_until(lambda: reader.events, 20, what="the hello event")
        assert reader.status == 200 and reader.events[0]["event"] == "hello"
        job_id = cli(web_env, "add", "add", "--args", "[20, 22]", "--id", uid("sse")).strip()

        def states() -> list[str]:
            return [e["data"]["status"] for e in reader.of("job") if e["data"]["id"] == job_id]

        await wait_until(lambda: "pending" in states(), 20, what="the pending event")
        workers(web_env["config"])
        await wait_until(lambda: "completed" in states(), 30, what="the completed event")
        assert reader.of("workers"), "a worker joined: the registry changed"
        assert states()[0] == "pending" and states()[-1] == "completed"
        assert len(states()) == len(set(states()))  # each change published once
        numbers = [int(e["id"].rpartition(":")[2]) for e in reader.events]
        assert numbers == sorted(numbers)
    finally:
        await reader.close()

    first = next(e for e in reader.of("job") if e["data"]["id"] == job_id)
    boot, _, number = first["id"].rpartition(":")
    replay = SseReader(api, "/api/events", AUTH | {"Last-Event-ID": f"{boot}:{int(number) - 1}"})
    try:
        await wait_until(lambda: any(e["data"].get("status") == "completed"
                                     for e in replay.of("job")), 20, what="the replay")
        assert replay.of("job")[0]["id"] == first["id"]
    finally:
        await replay.close()
    for stale in ("0:1", "garbage", f"{boot}:{10**9}"):  # another process's id, or none
        lost = SseReader(api, "/api/events", AUTH | {"Last-Event-ID": stale})
        try:
            await wait_until(lambda lost=lost: lost.events, 20, what="resync")
            assert lost.events[0]["event"] == "resync", stale
        finally:
            await lost.close()


async def test_sse_reports_queue_schedule_and_dashboard_retry_changes(api, web_env):
    reader = SseReader(api, "/api/events", AUTH)
    try:
        await wait_until(lambda: reader.events, 20, what="the hello event")
        queue, sid = uid("evq"), uid("evs")
        await api.post(f"/api/queues/{queue}/pause", headers=AUTH)
        await wait_until(lambda: any(queue in e["data"]["paused"] for e in reader.of("queues")),
                         20, what="the queues event")
        await api.post("/api/schedules", json={"id": sid, "task": "noop", "every": "1h"},
                       headers=AUTH)
        await wait_until(lambda: reader.of("schedules"), 20, what="the schedules event")
        job_id = uid("evj")
        await api.post("/api/jobs", json={"task": "noop", "id": job_id, "delay": 600},
                       headers=AUTH)
        with psycopg.connect(web_env["dsn"], autocommit=True) as conn:  # an old job, beyond
            conn.execute(f'UPDATE "{web_env["schema"]}".jobs SET created_at = '  # the overlap
                         "created_at - interval '1 hour' WHERE id = %s", [job_id])
        await api.post(f"/api/jobs/{job_id}/cancel", headers=AUTH)

        def states() -> list[str]:
            return [e["data"]["status"] for e in reader.of("job") if e["data"]["id"] == job_id]

        await wait_until(lambda: "cancelled" in states(), 20, what="the cancelled event")
        # The retry leaves no timestamp to find: the service publishes it itself.
        await api.post(f"/api/jobs/{job_id}/retry", headers=AUTH)
        await wait_until(lambda: states()[-1:] == ["pending"], 20, what="pending again")
        await api.post(f"/api/queues/{queue}/resume", headers=AUTH)
    finally:
        await reader.close()


async def test_sigterm_ends_open_event_streams_and_the_process(web_env, tmp_path: Path):
    config = add_web_section(write_config(tmp_path, web_env["dsn"], web_env["schema"]),
                             token=TOKEN)
    web = WebProcess(config, "--listen", "127.0.0.1:0")
    try:
        async with httpx.AsyncClient(base_url=web.url) as client:
            readers = [SseReader(client, "/api/events", AUTH) for _ in range(3)]
            await wait_until(lambda: all(r.events for r in readers), 20, what="streams")
            web.proc.send_signal(signal.SIGTERM)
            for reader in readers:
                await wait_until(reader.ended.is_set, 10, what="the stream to end")
            await wait_until(lambda: web.proc.poll() is not None, 10, what="exit")
            assert web.proc.returncode == 0, web.log()
    finally:
        web.stop()


# -- start-up rules ----------------------------------------------------------------------


def test_a_non_loopback_listen_without_a_token_is_refused(web_env, tmp_path: Path):
    config = write_config(tmp_path, web_env["dsn"], web_env["schema"])
    result = run_cli("web", "--listen", "0.0.0.0:0", config=config)
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0 without a token" in result.stderr
    assert "Traceback" not in result.stderr


async def test_without_a_token_a_random_one_is_printed_and_works(web_env, tmp_path: Path):
    config = write_config(tmp_path, web_env["dsn"], web_env["schema"])
    web = WebProcess(config, "--listen", "127.0.0.1:0")
    try:
        line = next(x for x in web.log().splitlines() if "login?token=" in x)
        token = line.rsplit("token=", 1)[1].strip()
        assert len(token) >= 24 and token != TOKEN
        async with httpx.AsyncClient(base_url=web.url) as client:
            assert (await client.get("/api/status", headers={
                "Authorization": f"Bearer {token}"})).status_code == 200
            assert (await client.get("/api/status", headers=AUTH)).status_code == 401
    finally:
        web.stop()


def test_a_port_in_use_is_one_line_and_exit_1(web_env, tmp_path: Path):
    config = add_web_section(write_config(tmp_path, web_env["dsn"], web_env["schema"]),
                             token=TOKEN)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("web", "--listen", f"127.0.0.1:{port}", config=config)
    assert result.returncode == 1
    assert f"error: cannot listen on 127.0.0.1:{port}: the port is in use" in result.stderr
    assert "Traceback" not in result.stderr
