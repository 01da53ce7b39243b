"""An adversarial review of `pgsched web`, against a real process and a real database:
security headers, logging out, crafted headers, ids and bodies, path traversal on static
files, and hostile rows written by a role with exactly the rights `migrate --grant`
gives. What the browser does with those rows is in test_web_browser.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import quote

import httpx
import psutil
import psycopg
import pytest
from conftest import run_cli, wait_until, write_config
from webutil import READ_TOKEN, TOKEN, SseReader, WebProcess, add_web_section

from pgsched.store import UNREADABLE_JSON

pytest.importorskip("fastapi")

AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Text that would run script wherever a dashboard put it in as HTML, or in a link.
HOSTILE = ('<img src=x onerror="window.pwned=1">"\'</script><script>window.pwned=2</script>'
           "javascript:window.pwned=3 \x1b]8;;http://evil.example\x07")


@pytest.fixture(scope="module")
def web_env(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    schema = f"t_webadv_{uuid.uuid4().hex[:8]}"
    role = f"hostile_{uuid.uuid4().hex[:8]}"
    config = add_web_section(write_config(tmp_path_factory.mktemp("webadv"), pg_dsn, schema),
                             token=TOKEN, read_token=READ_TOKEN)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} NOLOGIN")
    result = run_cli("migrate", "--grant", role, config=config)
    assert result.returncode == 0, result.stderr
    web = WebProcess(config, "--listen", "127.0.0.1:0")
    try:
        yield {"config": config, "web": web, "url": web.url, "schema": schema, "dsn": pg_dsn,
               "role": role}
    finally:
        web.stop()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


@pytest.fixture
async def api(web_env: dict) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=web_env["url"], timeout=30) as client:
        yield client


def as_hostile_role(env: dict, statement: str, *params: object) -> None:
    """Run SQL as the role `migrate --grant` made: what a compromised app could write."""
    with psycopg.connect(env["dsn"], autocommit=True) as conn:
        conn.execute(f"SET ROLE {env['role']}")
        conn.execute(statement.replace("{s}", f'"{env["schema"]}"'), params)


def raw_get(url: str, target: str) -> bytes:
    """A request line sent as written: httpx would normalise `..` away."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                     .encode())
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


# -- headers -----------------------------------------------------------------------------


async def test_every_response_forbids_framing_sniffing_referrers_and_foreign_script(api):
    cookie = (await api.get("/login", params={"token": TOKEN})).headers["set-cookie"]
    for path, headers in [("/", AUTH), ("/login", {}), ("/api/jobs", AUTH),
                          ("/api/jobs", {}), ("/static/app.js", {}), ("/api/docs", AUTH),
                          ("/healthz", {})]:
        response = await api.get(path, headers=headers)
        assert response.headers.get("x-content-type-options") == "nosniff", path
        assert response.headers.get("referrer-policy") == "no-referrer", path
        policy = response.headers.get("content-security-policy", "")
        assert "frame-ancestors 'none'" in policy, path
        assert "default-src 'self'" in policy and "object-src 'none'" in policy, path
        assert "'unsafe-inline'" not in policy.partition("script-src")[2].split(";")[0], path
    assert "pgsched_session" in cookie


async def test_api_docs_inline_script_is_allowed_by_its_hash_only(api):
    page = await api.get("/api/docs", headers=AUTH)
    policy = page.headers["content-security-policy"]
    script = policy.partition("script-src")[2].split(";")[0]
    assert "'sha256-" in script and "unsafe" not in script
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text


# -- auth --------------------------------------------------------------------------------


async def test_a_read_only_session_can_log_out_but_not_from_another_site(api, web_env):
    host = web_env["url"].removeprefix("http://")
    login = await api.get("/login", params={"token": READ_TOKEN})
    session = login.headers["set-cookie"].split(";")[0]
    foreign = await api.post("/logout", headers={"Cookie": session,
                                                 "Origin": "http://evil.example"})
    assert foreign.status_code == 403
    logout = await api.post("/logout", headers={"Cookie": session, "Origin": f"http://{host}"})
    assert logout.status_code == 200, logout.text
    assert 'pgsched_session=""' in logout.headers["set-cookie"]


async def test_the_login_form_posts_the_token_so_it_stays_out_of_urls(api):
    form = await api.get("/login")
    assert 'method="post"' in form.text
    wrong = await api.post("/login", data={"token": "wrong-wrong-wrong-wrong"})
    assert wrong.status_code == 401 and "not valid" in wrong.text
    login = await api.post("/login", data={"token": TOKEN})
    assert login.status_code == 303 and login.headers["location"] == "/"
    session = login.headers["set-cookie"].split(";")[0]
    assert (await api.get("/api/jobs", headers={"Cookie": session})).status_code == 200


async def test_writes_with_a_cookie_and_only_a_referer_or_a_form_body_are_refused(api, web_env):
    host = web_env["url"].removeprefix("http://")
    session = (await api.get("/login", params={"token": TOKEN})).headers["set-cookie"]
    session = session.split(";")[0]
    job_id = f"csrf-{uuid.uuid4().hex[:8]}"
    for headers, body in [
        ({"Referer": f"http://{host}/"}, json.dumps({"task": "noop", "id": job_id})),
        ({"Origin": "http://evil.example", "Content-Type": "text/plain"},
         json.dumps({"task": "noop", "id": job_id})),
        ({"Origin": "null", "Content-Type": "application/x-www-form-urlencoded"},
         f"task=noop&id={job_id}"),
        ({"Origin": f"http://{host}.evil.example"}, json.dumps({"task": "noop", "id": job_id})),
        ({"Origin": "http://evil.example", "X-HTTP-Method-Override": "GET"}, "{}"),
    ]:
        refused = await api.post("/api/jobs", content=body, headers={"Cookie": session} | headers)
        assert refused.status_code == 403, headers
    assert (await api.get(f"/api/jobs/{job_id}", headers=AUTH)).status_code == 404


async def test_head_options_and_method_overrides_with_the_read_token_write_nothing(api):
    job_id = f"ro-{uuid.uuid4().hex[:8]}"
    assert (await api.post("/api/jobs", json={"task": "noop", "id": job_id, "delay": 3600},
                           headers=AUTH)).status_code == 201
    read = {"Authorization": f"Bearer {READ_TOKEN}"}
    for method in ("HEAD", "OPTIONS"):
        response = await api.request(method, f"/api/jobs/{job_id}/cancel", headers=read)
        assert response.status_code in (401, 403, 405), method
    override = await api.get(f"/api/jobs/{job_id}/cancel", headers=read | {
        "X-HTTP-Method-Override": "POST", "X-Method-Override": "POST"})
    assert override.status_code == 404  # GET reads a job named "<id>/cancel"
    assert (await api.get(f"/api/jobs/{job_id}", headers=AUTH)).json()["status"] == "pending"


async def test_many_concurrent_requests_are_all_answered(api):
    responses = await asyncio.gather(*(api.get("/api/jobs", params={"limit": 5}, headers=AUTH)
                                       for _ in range(100)))
    assert {r.status_code for r in responses} == {200}


# -- crafted input -----------------------------------------------------------------------


async def test_a_last_event_id_with_non_ascii_digits_gets_a_resync_not_a_broken_stream(
        api, web_env):
    hello = SseReader(api, "/api/events", AUTH)
    await wait_until(lambda: hello.of("hello"), 10, what="hello")
    boot = hello.of("hello")[0]["id"].partition(":")[0]
    await hello.close()
    for bad in ("²", "1²", "٣", "-1", "", "x", "9" * 400, "9" * 5000):
        reader = SseReader(api, "/api/events",
                           AUTH | {"Last-Event-ID": f"{boot}:{bad}".encode("latin-1", "replace")})
        try:
            await wait_until(lambda r=reader: r.events or r.ended.is_set(), 10, what="event")
            assert [e["event"] for e in reader.events][:1] == ["resync"], bad
        finally:
            await reader.close()
    assert "Traceback" not in web_env["web"].log()


def b64(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


async def test_control_characters_and_odd_values_in_ids_filters_and_cursors_are_not_500(
        api, web_env):
    probes = [
        ("GET", "/api/jobs/a%00b", None), ("GET", "/api/jobs/%01%1b%7f", None),
        ("POST", "/api/jobs/a%00b/retry", None), ("DELETE", "/api/jobs/a%00b", None),
        ("GET", "/api/schedules/a%00b", None), ("POST", "/api/schedules/a%00b/trigger", None),
        ("GET", "/api/jobs?task=a%00b", None), ("GET", "/api/jobs?queue=a%00b", None),
        ("GET", "/api/jobs?status=pending%00", None),
        ("GET", f"/api/jobs?before={b64(['2026-01-01T00:00:00+00:00', 'a' + chr(0)])}", None),
        ("GET", f"/api/jobs?before={b64(['9999-12-31T23:59:59+14:00', 'x'])}", None),
        ("GET", f"/api/jobs?before={b64([[[[[[1]]]]], 'x'])}", None),
        ("GET", "/api/jobs?before=" + b64("[" * 5000), None),
        ("GET", "/api/jobs?before=" + "A" * 6000, None),
        ("POST", "/api/jobs", {"task": "noop", "id": "a\x00b"}),
        ("POST", "/api/jobs", {"task": "no\x00op"}),
        ("POST", "/api/jobs", {"task": "noop", "queue": "q\x00"}),
        ("POST", "/api/jobs", {"task": "noop", "args": ["a\x00b"]}),
        ("POST", "/api/jobs", {"task": "noop", "kwargs": {"a\x00": 1}}),
        ("POST", "/api/jobs", {"task": "noop", "execution_time": "2026-01-01T00:00:00\x00Z"}),
        ("POST", "/api/jobs", {"task": "noop", "delay": 1e308}),
        ("POST", "/api/jobs", {"task": "noop", "timeout": "NaN"}),
        ("POST", "/api/jobs", {"task": "noop", "max_retries": 2 ** 40}),
        ("POST", "/api/schedules", {"id": "a\x00b", "task": "noop", "every": "1m"}),
        ("POST", "/api/schedules", {"id": "s1", "task": "noop", "cron": "* * * * *",
                                    "tz": "Europe/../../etc/passwd"}),
        ("POST", "/api/queues/q%00/pause", {"reason": "r\x00"}),
        ("POST", "/api/queues/default/pause", {"reason": "r\x00"}),
    ]
    failed = []
    for method, path, body in probes:
        try:
            response = await api.request(method, path, headers=AUTH, json=body)
        except httpx.HTTPError as exc:
            failed.append((method, path, body, repr(exc)))
            continue
        if response.status_code >= 500:
            failed.append((method, path, body, response.status_code))
        assert set(response.json()) <= {"error"} or response.status_code < 300, response.text
        assert "Traceback" not in response.text and web_env["dsn"] not in response.text
    assert not failed, "\n".join(map(str, failed))
    await api.post("/api/queues/default/resume", headers=AUTH)
    assert "web_request_failed" not in web_env["web"].log()


async def test_a_job_id_with_a_slash_can_be_read_cancelled_and_retried(api):
    job_id = f"orders/{uuid.uuid4().hex[:6]}/../x"
    added = await api.post("/api/jobs", json={"task": "noop", "id": job_id, "delay": 3600},
                           headers=AUTH)
    assert added.status_code == 201
    path = f"/api/jobs/{quote(job_id, safe='')}"
    shown = await api.get(path, headers=AUTH)
    assert shown.status_code == 200 and shown.json()["id"] == job_id
    cancelled = await api.post(f"{path}/cancel", headers=AUTH)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    retried = await api.post(f"{path}/retry", headers=AUTH)
    assert retried.status_code == 200 and retried.json()["status"] == "pending"
    deleted = await api.delete(path, headers=AUTH)
    assert deleted.status_code == 200 and deleted.json()["id"] == job_id


async def test_deeply_nested_bodies_are_refused_in_one_line(api):
    for depth in (150, 50_000):
        nested = "[" * depth + "]" * depth
        for path, body in [("/api/jobs", f'{{"task": "noop", "args": [{nested}]}}'),
                           ("/api/schedules", '{"id": "deep", "task": "noop", "every": "1m", '
                                              f'"kwargs": {{"a": {nested}}}}}')]:
            response = await api.post(path, content=body,
                                      headers=AUTH | {"Content-Type": "application/json"})
            assert 400 <= response.status_code < 500, (path, depth, response.text)
            assert list(response.json()) == ["error"]
    assert (await api.get("/api/schedules/deep", headers=AUTH)).status_code == 404


async def test_static_files_cannot_be_read_outside_their_directory(web_env):
    for target in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py",
                   "/static/%2e%2e%2f%2e%2e%2fpyproject.toml", "/static//etc/passwd",
                   "/static/..\\app.py", "/api/docs-static/../../app.py",
                   "/static/../api/jobs"):
        answer = raw_get(web_env["url"], target)
        status = answer.split(b" ", 2)[1]
        assert status in (b"400", b"401", b"404"), (target, answer[:200])
        assert b"import" not in answer and b"root:" not in answer, target


async def test_huge_query_strings_and_headers_are_refused_not_served(api, web_env):
    for params in ({"task": "x" * 60_000}, {"status": ["pending"] * 4000}):
        try:
            response = await api.get("/api/jobs", params=params, headers=AUTH)
        except httpx.RemoteProtocolError:
            continue  # the server closed the connection: also a refusal
        assert response.status_code in (200, 400, 413, 414, 422, 431), response.status_code
    assert (await api.get("/healthz")).status_code == 200


# -- hostile rows ------------------------------------------------------------------------


async def test_hostile_rows_from_a_granted_role_come_back_verbatim_as_json(api, web_env):
    job_id = HOSTILE[:200]
    as_hostile_role(web_env, """
        INSERT INTO {s}.jobs (id, task, queue, status, execution_time, last_error, result,
                              args, errors, attempts, worker_id)
        VALUES (%s, %s, %s, 'failed', now(), %s, %s, %s, %s, 1, %s)""",
        job_id, HOSTILE, "default", HOSTILE, json.dumps(HOSTILE), json.dumps([HOSTILE]),
        json.dumps([{"attempt": 1, "worker_id": HOSTILE, "at": "2026-01-01T00:00:00+00:00",
                     "error": HOSTILE, "traceback": HOSTILE}]), HOSTILE)
    deep = "[" * 3000 + "]" * 3000
    as_hostile_role(web_env, "INSERT INTO {s}.jobs (id, task, execution_time, args, result) "
                             "VALUES ('deep-row', 'noop', now(), %s, %s)", deep, deep)
    as_hostile_role(web_env, """
        INSERT INTO {s}.workers (id, host, pid, version, concurrency, queues)
        VALUES (%s, %s, 1, %s, 1, %s)""", HOSTILE, HOSTILE, HOSTILE, [HOSTILE])
    listed = (await api.get("/api/jobs", params={"status": "failed"}, headers=AUTH)).json()
    found = next(j for j in listed["jobs"] if j["id"] == job_id)
    assert found["task"] == HOSTILE and found["last_error"] == HOSTILE
    one = await api.get(f"/api/jobs/{quote(job_id, safe='')}", headers=AUTH)
    assert one.status_code == 200 and one.json()["result"] == HOSTILE
    assert one.headers["content-type"] == "application/json"
    deep_row = await api.get("/api/jobs/deep-row", headers=AUTH)
    assert deep_row.status_code == 200, deep_row.text
    assert deep_row.json()["args"] == deep_row.json()["result"] == UNREADABLE_JSON
    everything = await api.get("/api/jobs", headers=AUTH)  # the poisoned row among the rest
    assert everything.status_code == 200
    assert "deep-row" in {job["id"] for job in everything.json()["jobs"]}
    for path in ("/api/workers", "/api/queues", "/api/status",
                 "/api/schedules"):
        response = await api.get(path, headers=AUTH)
        assert response.status_code == 200, (path, response.text)
    assert "web_request_failed" not in web_env["web"].log()


# -- resources ---------------------------------------------------------------------------


def server_holds_connection(web: WebProcess, client_port: int) -> bool:
    return any(c.raddr and c.raddr.port == client_port and c.status == "ESTABLISHED"
               for c in psutil.Process(web.proc.pid).net_connections("tcp"))


# Not strict: on a loaded machine the stream may lag and be dropped before the socket
# buffers fill; it then reads its CLOSE and ends, and the test passes by luck.
@pytest.mark.xfail(strict=False, reason=(
    "a dropped client's stream stays blocked in uvicorn's send (flow control) while the "
    "client does not read: it never sees the CLOSE the feed queued. Bounding the send "
    "(asyncio.wait_for) ends the generator, but uvicorn then calls transport.close(), "
    "which waits to flush a buffer the client never takes; only transport.abort() would "
    "end it, and an ASGI app cannot reach the transport. Events are shared, so a held "
    "client costs a task and a socket, not copies of events."))
async def test_an_event_client_that_never_reads_is_disconnected(api, web_env):
    """A client that stops reading is dropped from the feed when its queue is full; its
    connection must end too, not stay blocked in a write for as long as it lives."""
    clients = (await api.get("/healthz")).json()["clients"]
    host, port = web_env["url"].removeprefix("http://").rsplit(":", 1)
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        stuck.connect((host, int(port)))
        stuck.sendall(f"GET /api/events HTTP/1.1\r\nHost: {host}\r\n"
                      f"Authorization: Bearer {TOKEN}\r\n\r\n".encode())
        await wait_until(lambda: stuck.recv(1, socket.MSG_PEEK), 10, what="the stream")
        await wait_until(async_healthz_clients(api, clients + 1), 10, what="subscribed")
        # Batches smaller than its queue: the stream takes each while the socket buffers
        # fill (~4 MB), then blocks, and the next batches overflow its queue.
        for batch in range(30):
            with psycopg.connect(web_env["dsn"], autocommit=True) as conn:
                conn.execute(f'INSERT INTO "{web_env["schema"]}".jobs (id, task, execution_time) '
                             "SELECT %s || n, 'noop', now() + interval '1 day' "
                             "FROM generate_series(1, 900) n", [f"flood-{batch}-{uuid.uuid4()}-"])
            await asyncio.sleep(0.3)  # pacing: one look of the feed per batch
        await wait_until(async_healthz_clients(api, clients), 30, what="dropped from the feed")
        local = stuck.getsockname()[1]
        # 5 s: the xfail's usual end, waited out in every CI run (twice)
        await wait_until(lambda: not server_holds_connection(web_env["web"], local), 5,
                         what="the server to close the stalled connection")
    finally:
        stuck.close()
        with psycopg.connect(web_env["dsn"], autocommit=True) as conn:
            conn.execute(f'DELETE FROM "{web_env["schema"]}".jobs WHERE id LIKE %s', ["flood-%"])


def async_healthz_clients(api: httpx.AsyncClient, expected: int):
    async def check() -> bool:
        return (await api.get("/healthz")).json()["clients"] == expected
    return check
