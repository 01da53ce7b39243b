"""The documentation says what the code does: the README's two commands and its Python
example, the copies of that example in the manual, and the generated CLI reference.

The example runs as a real script against the test server (in the test's schema instead of
"pgsched"), and a real `pgsched worker --burst` with examples/tasks.py then runs what it
scheduled, so an example naming a task the example module does not register fails here.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import psycopg
import typer.main
from conftest import ROOT, cli_env, run_cli, write_config

README = ROOT / "README.md"
DOCS = ROOT / "docs"
DAEMON_COMMAND = ("python3 -m venv .venv && .venv/bin/pip install -q -e '.[embedded]' && "
                  ".venv/bin/pgsched --config pgsched.toml.example worker")
TEST_COMMAND = ("python3 -m venv .venv && .venv/bin/pip install -q -e '.[dev]' && "
                ".venv/bin/pytest -q -n 2 --dist worksteal")
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def api_example(path: Path) -> str:
    """The page's Python block that opens a Scheduler: the runnable example."""
    blocks = [b for b in PYTHON_BLOCK.findall(path.read_text(encoding="utf-8"))
              if "Scheduler(" in b]
    assert len(blocks) == 1, f"{path.name}: expected one Scheduler example, found {len(blocks)}"
    return blocks[0]


def test_readme_keeps_the_two_commands_and_ci_runs_the_test_one():
    text = README.read_text(encoding="utf-8")
    assert f"```sh\n{DAEMON_COMMAND}\n```" in text
    assert f"```sh\n{TEST_COMMAND}\n```" in text
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250, "the README is the front door: move detail to docs/"


def test_the_manual_shows_the_readme_example_unchanged():
    example = api_example(README)
    for page in ("getting-started.md", "tasks.md"):
        assert api_example(DOCS / page) == example, f"docs/{page} drifted from the README"


def test_readme_python_example_runs_and_its_jobs_run(pg_dsn, schema, tmp_path):
    code = api_example(README)
    assert code.count('schema="pgsched"') == 1
    code = code.replace('schema="pgsched"', f'schema="{schema}"')
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env=cli_env(PGSCHED_DSN=pg_dsn), timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("welcome-ada [") and done.stdout.rstrip().endswith("True")

    config = write_config(tmp_path, pg_dsn, schema, tasks=str(ROOT / "examples" / "tasks.py"))
    burst = run_cli("worker", "--burst", config=config)
    assert burst.returncode == 0, burst.stderr

    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute(
            f'SELECT id, task, status, kwargs, result FROM "{schema}".jobs ORDER BY task'
        ).fetchall()
    by_task: dict[str, list[tuple]] = {}
    for row in rows:
        by_task.setdefault(row[1], []).append(row)
    assert sorted(by_task) == ["flaky_webhook", "resize_image", "send_welcome_email"]
    assert [r[2] for r in by_task["flaky_webhook"]] == ["cancelled"]
    # Due now: the burst worker ran both, so the example's task name is registered.
    resized = by_task["resize_image"]
    assert [r[2] for r in resized] == ["completed", "completed"]
    assert sorted(r[4]["path"] for r in resized) == ["a.png", "b.png"]
    # Due in 5 s: still pending after the burst, with the example's arguments.
    [welcome] = by_task["send_welcome_email"]
    assert welcome[0] == "welcome-ada" and welcome[2] == "pending"
    assert welcome[3] == {"address": "ada@example.com", "name": "Ada"}


def test_example_tasks_in_the_readme_are_the_registered_ones():
    listed = subprocess.run(
        [sys.executable, "-c", "import json, examples.tasks, pgsched.tasks as t; "
         "print(json.dumps(sorted(t.registered())))"],
        capture_output=True, text=True, cwd=ROOT, env=cli_env(), timeout=60, check=True)
    registered = set(json.loads(listed.stdout))
    readme = README.read_text(encoding="utf-8")
    shown = set(re.findall(r"^(?:async )?def (\w+)\(", readme, re.MULTILINE)) - {"main"}
    assert shown and shown <= registered
    for name in re.findall(r"pgsched \$C add (\w+)", readme):
        assert name in registered


def load_hook():
    spec = importlib.util.spec_from_file_location("cli_reference",
                                                  DOCS / "hooks" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_documents_every_command_and_option():
    from pgsched.cli import app

    page = load_hook().render_cli_reference()
    sections = dict(re.findall(r"^### `pgsched (\S+)`\n(.*?)(?=^#|\Z)", page,
                               re.MULTILINE | re.DOTALL))
    root = typer.main.get_command(app)
    ctx = typer.Context(root, info_name="pgsched")
    names = root.list_commands(ctx)
    assert len(names) > 15
    assert sorted(sections) == sorted(names)
    for name in names:
        command = root.get_command(ctx, name)
        # The first line of the command's own help, and every option it takes.
        assert command.help, f"pgsched {name} has no help text for the reference"
        assert command.help.strip().splitlines()[0] in sections[name], name
        for param in command.params:
            if param.param_type_name == "option" and not param.hidden:
                for opt in param.opts:
                    assert opt in sections[name], f"pgsched {name} {opt}"


def test_cli_reference_page_keeps_its_marker():
    hook = load_hook()
    assert hook.MARKER in (DOCS / hook.PAGE).read_text(encoding="utf-8")
