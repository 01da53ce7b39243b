"""The dashboard in a real headless browser (Debian's chromium and chromium-driver, driven
by selenium) against a real `pgsched web`, real workers and the real database: log in,
see a job added from the CLI appear without a reload, retry a failed job with a click,
pause a queue, and screenshots of the main views in light and dark.

Skipped, saying why, only when chromium or chromedriver is not installed (.ci/run
installs them; locally: `apt-get install chromium chromium-driver`). Set
PGSCHED_SCREENSHOTS=docs/img to write the screenshots there.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from conftest import run_cli, write_config
from webutil import TOKEN, WebProcess, add_web_section

pytest.importorskip("fastapi")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="browser tests need chromium and chromedriver: apt-get install chromium "
           "chromium-driver")

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import (  # noqa: E402
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ready  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def site(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    schema = f"t_ui_{uuid.uuid4().hex[:8]}"
    directory = tmp_path_factory.mktemp("ui")
    config = add_web_section(write_config(directory, pg_dsn, schema), token=TOKEN)
    web = WebProcess(config, "--listen", "127.0.0.1:0")
    try:
        yield {"config": config, "url": web.url, "schema": schema, "dsn": pg_dsn, "web": web}
    finally:
        web.stop()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--window-size=1400,900", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def cli(site: dict, *args: str) -> str:
    result = run_cli(*args, config=site["config"])
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def db(site: dict, query: str, *params: object) -> list[tuple]:
    with psycopg.connect(site["dsn"], autocommit=True) as conn:
        return conn.execute(query.replace("{s}", f'"{site["schema"]}"'), params).fetchall()


def open_page(browser: webdriver.Chrome, url: str) -> None:
    # From a blank page: a URL differing from the current one only by its #fragment
    # would not load anything (the login form would stay).
    browser.get("about:blank")
    browser.get(url)


def logged_in(browser: webdriver.Chrome, site: dict, hash_: str = "#/jobs") -> None:
    """The dashboard at `hash_`, logging in first if needed. Once it is open, views change
    as a user changes them (the #fragment), never by loading the page again: each load
    opens an event stream, and Chrome holds at most six connections to one host."""
    if browser.current_url.startswith(site["url"]) and browser.find_elements(By.ID, "view"):
        browser.execute_script("location.hash = arguments[0]", hash_)
    else:
        open_page(browser, f"{site['url']}/{hash_}")
        if browser.find_elements(By.NAME, "token"):
            browser.find_element(By.NAME, "token").send_keys(TOKEN)
            browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
            # The form's redirect lands on the dashboard once the cookie is set.
            WebDriverWait(browser, 20).until(lambda b: b.find_elements(By.ID, "view"))
            browser.execute_script("location.hash = arguments[0]", hash_)
    try:
        WebDriverWait(browser, 20).until(
            ready.presence_of_element_located((By.CSS_SELECTOR, "#live.on")))
    except TimeoutException:
        raise AssertionError(
            f"the dashboard did not go live at {browser.current_url}:\n"
            f"{browser.page_source[:1500]}\nweb log:\n{site['web'].log()[-2000:]}") from None


def test_login_then_a_job_added_from_the_cli_appears_within_two_seconds(browser, site):
    open_page(browser, f"{site['url']}/")
    assert browser.find_elements(By.NAME, "token"), "a stranger must get the login form"
    logged_in(browser, site)
    WebDriverWait(browser, 20).until(
        ready.presence_of_element_located((By.CSS_SELECTOR, "#jobs-table tbody tr")))
    browser.execute_script("window.notReloaded = true")
    job_id = cli(site, "add", "noop", "--in", "1h", "--id", f"cli-{uuid.uuid4().hex[:6]}")
    row = WebDriverWait(browser, 2).until(ready.presence_of_element_located(
        (By.CSS_SELECTOR, f'#jobs-table tr[data-id="{job_id}"]')))
    assert "pending" in row.text
    assert browser.execute_script("return window.notReloaded") is True


def test_retry_a_failed_job_with_a_click_changes_the_database(browser, site):
    job_id = cli(site, "add", "fail", "--id", f"fails-{uuid.uuid4().hex[:6]}")
    cli(site, "worker", "--burst")
    assert db(site, "SELECT status::text FROM {s}.jobs WHERE id = %s", job_id) == [("failed",)]
    logged_in(browser, site, "#/failed")
    click(browser, f'//tr[@data-id="{job_id}"]//button[text()="Retry"]')
    assert eventually(lambda: db(site, "SELECT status::text FROM {s}.jobs WHERE id = %s",
                                      job_id) == [("pending",)])


def test_pause_a_queue_with_a_click(browser, site):
    queue = f"mail{uuid.uuid4().hex[:4]}"
    cli(site, "add", "noop", "--in", "1h", "--queue", queue)
    logged_in(browser, site, "#/workers")
    click(browser, f'//tr[@data-queue="{queue}"]//button[text()="Pause"]')
    assert eventually(lambda: db(site, "SELECT paused_by FROM {s}.paused_queues "
                                      "WHERE queue = %s", queue))
    WebDriverWait(browser, 10).until(ready.text_to_be_present_in_element(
        (By.CSS_SELECTOR, f'tr[data-queue="{queue}"]'), "paused"))


def eventually(predicate, timeout: float = 10.0) -> bool:
    """Poll a condition with a deadline (these tests are synchronous, like selenium)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s")


def click(browser: webdriver.Chrome, xpath: str) -> None:
    """Click the element once it is there; a live update may redraw its row meanwhile."""
    def clicked(_driver: object) -> bool:
        try:
            browser.find_element(By.XPATH, xpath).click()
            return True
        except (NoSuchElementException, StaleElementReferenceException):
            return False

    WebDriverWait(browser, 20).until(clicked)


VIEWS = {"jobs": ("#/jobs", "Jobs"), "job": (None, None),
         "schedules": ("#/schedules", "Schedules"), "failed": ("#/failed", "Failed jobs"),
         "workers": ("#/workers", "Workers")}


def test_screenshots_of_the_main_views_in_light_and_dark(browser, site, workers,
                                                         tmp_path: Path):
    cli(site, "add", "noop", "--cron", "*/5 * * * *", "--id", "reports.hourly")
    cli(site, "add", "noop", "--every", "30s", "--id", "heartbeat")
    cli(site, "trigger", "heartbeat")
    for n in range(4):
        cli(site, "add", "add", "--args", f"[{n}, 1]", "--queue", "math")
    detail = cli(site, "add", "fail", "--args", '["disk full"]', "--retries", "1",
                 "--id", "import-orders")
    cli(site, "add", "noop", "--in", "2h", "--queue", "mail")
    cli(site, "worker", "--burst")
    worker = workers(site["config"])  # a live worker for the workers view
    out = Path(os.environ.get("PGSCHED_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    logged_in(browser, site)
    try:
        WebDriverWait(browser, 30).until(lambda _: db(site, "SELECT count(*) FROM {s}.workers")
                                         [0][0] > 0)
        for scheme in ("light", "dark"):
            browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {
                "features": [{"name": "prefers-color-scheme", "value": scheme}]})
            for name, (hash_, title) in VIEWS.items():
                logged_in(browser, site, hash_ or f"#/job/{detail}")
                WebDriverWait(browser, 20).until(ready.text_to_be_present_in_element(
                    (By.CSS_SELECTOR, "main h1"), title or detail))
                WebDriverWait(browser, 20).until(ready.presence_of_element_located(
                    (By.CSS_SELECTOR, "main table tbody tr, main .empty")))
                WebDriverWait(browser, 20).until(ready.presence_of_element_located(
                    (By.CSS_SELECTOR, "#stats .chart svg")))
                path = out / f"web-{name}-{scheme}.png"
                assert browser.save_screenshot(str(path))
                assert path.stat().st_size > 10_000, path
    finally:
        worker.kill()


HOSTILE = ('<img src=x onerror="window.pwned=1"></script><script>window.pwned=2</script>'
           "javascript:window.pwned=3")


def write(site: dict, statement: str, *params: object) -> None:
    with psycopg.connect(site["dsn"], autocommit=True) as conn:
        conn.execute(statement.replace("{s}", f'"{site["schema"]}"'), params)


def test_hostile_rows_render_as_text_and_run_no_script(browser, site):
    """Task names, ids, errors, tracebacks, results, queue names, schedule ids and worker
    hosts holding HTML, written straight into the tables (as a role with the rights
    `migrate --grant` gives could), show as text in every view and run nothing."""
    job_id, schedule_id = f"x{HOSTILE}"[:200], f"s{HOSTILE}"[:150]
    logged_in(browser, site, "#/jobs")
    try:
        # While the jobs view is open: the row also arrives by the live event stream.
        write(site, """INSERT INTO {s}.jobs (id, task, queue, status, execution_time, last_error,
                    result, args, errors, attempts, worker_id)
                    VALUES (%s, %s, %s, 'failed', now(), %s, %s, %s, %s, 1, %s)""",
           job_id, HOSTILE, HOSTILE, HOSTILE, json.dumps(HOSTILE), json.dumps([HOSTILE]),
           json.dumps([{"attempt": 1, "worker_id": HOSTILE, "at": "2026-01-01T00:00:00Z",
                        "error": HOSTILE, "traceback": HOSTILE}]), HOSTILE)
        write(site, """INSERT INTO {s}.jobs (id, task, status, execution_time)
                    VALUES (%s, %s, 'completed', now())""", f"{schedule_id}@trigger-1", HOSTILE)
        write(site, """INSERT INTO {s}.schedules (id, task, cron, tz, origin, queue,
                                                  next_fire_at)
                    VALUES (%s, %s, %s, %s, 'cli', %s, now() + interval '1 hour')""",
           schedule_id, HOSTILE, HOSTILE, HOSTILE, HOSTILE)
        write(site, """INSERT INTO {s}.workers (id, host, pid, version, concurrency, queues)
                    VALUES (%s, %s, 1, %s, 1, %s)""", HOSTILE, HOSTILE, HOSTILE, [HOSTILE])
        WebDriverWait(browser, 10).until(lambda b: b.find_elements(
            By.CSS_SELECTOR, "#jobs-table tr.fresh"))
        for hash_ in ("#/jobs", "#/failed", f"#/job/{quote(job_id, safe='')}", "#/schedules",
                      "#/workers"):
            logged_in(browser, site, hash_)
            WebDriverWait(browser, 10).until(
                lambda b: HOSTILE in b.find_element(By.TAG_NAME, "main").text, hash_)
            assert browser.execute_script("return window.pwned") is None, hash_
            assert not browser.find_elements(By.CSS_SELECTOR, "main img, main script"), hash_
            hrefs = browser.execute_script(
                "return [...document.querySelectorAll('a[href]')].map(a => a.href)")
            assert all(h.startswith(site["url"]) for h in hrefs), (hash_, hrefs)
    finally:
        write(site, "DELETE FROM {s}.jobs WHERE task = %s", HOSTILE)
        write(site, "DELETE FROM {s}.schedules WHERE id = %s", schedule_id)
        write(site, "DELETE FROM {s}.workers WHERE host = %s", HOSTILE)


def test_api_docs_run_under_the_content_security_policy(browser, site):
    """Swagger UI's inline start-up script is allowed by its hash: the docs render."""
    logged_in(browser, site)
    open_page(browser, f"{site['url']}/api/docs")
    WebDriverWait(browser, 20).until(ready.text_to_be_present_in_element(
        (By.CSS_SELECTOR, ".swagger-ui .info .title"), "pgsched"))
    assert browser.find_elements(By.CSS_SELECTOR, ".opblock-tag")
