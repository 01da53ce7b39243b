"""mkdocs hook: renders the CLI reference page from the typer app at build time.

Owns: the text that replaces the `<!-- pgsched-cli-reference -->` marker in
docs/reference/cli.md. It is produced by typer's own Markdown generator (the one behind
`typer pgsched.cli utils docs`) from the click command typer builds out of
`pgsched.cli.app`, so every command, argument, option, default and help line on the page is
exactly what `pgsched COMMAND --help` shows, and the page cannot drift from the code.

Invariant: the app is reached only as `pgsched.cli.app`, whether `pgsched.cli` is a module
or a package.

Failure: a page that holds the marker while the app cannot be imported or rendered fails
the build with the import error; a reference page without the marker fails it too (so a
lost marker never ships an empty reference).
"""

from __future__ import annotations

from typing import Any

MARKER = "<!-- pgsched-cli-reference -->"
PAGE = "reference/cli.md"


def render_cli_reference() -> str:
    """Markdown for every command of `pgsched`, as its --help describes it."""
    import typer
    import typer.main
    from typer.cli import MARKUP_MODE_KEY, get_docs_for_click

    from pgsched.cli import app

    command = typer.main.get_command(app)
    ctx = typer.Context(command, info_name="pgsched")
    # The same markup mode as the app, as `typer ... utils docs` does.
    ctx.ensure_object(dict)[MARKUP_MODE_KEY] = getattr(app, "rich_markup_mode", None)
    text = get_docs_for_click(obj=command, ctx=ctx, name="pgsched", indent=1)
    return text.strip() + "\n"


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"{PAGE} lost its {MARKER} marker: the CLI reference would be empty")
    return markdown.replace(MARKER, render_cli_reference())
