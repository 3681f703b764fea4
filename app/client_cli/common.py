"""What every user command shares: the error for bad input, the --json option, reading spec files, printing."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from rich.console import Console


class CliError(Exception):
    """Bad input on the command line: one line on stderr, exit code 2 (as for usage errors)."""

    exit_code = 2


JsonOption = Annotated[bool, typer.Option("--json", help="Print the server's JSON instead of a summary.")]


# ---- input files --------------------------------------------------------------------------------

def load_document(text_or_path: str) -> dict[str, Any]:
    """A JSON object given inline, or a .json / .yaml file (`-`: standard input)."""
    import yaml

    if text_or_path.lstrip().startswith("{"):
        text, where = text_or_path, "the inline spec"
    elif text_or_path == "-":
        text, where = sys.stdin.read(), "standard input"
    else:
        path = Path(text_or_path)
        if not path.is_file():
            raise CliError(f"{path}: no such file")
        try:
            text, where = path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f"cannot read {path}: {exc}") from exc
    try:
        # YAML is a superset of JSON: one parser reads both.
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CliError(f"{where} is neither valid YAML nor JSON: {' '.join(str(exc).split())}") from exc
    if not isinstance(document, dict):
        raise CliError(f"{where} must hold a mapping (key: value pairs), not {type(document).__name__}")
    return document


def existing_file(path: Path) -> Path:
    if not path.is_file():
        raise CliError(f"{path}: no such file")
    return path


# ---- output -------------------------------------------------------------------------------------

def print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2))


def stderr_console() -> Console:
    from rich.console import Console

    return Console(stderr=True)


def print_table(columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False)
    for column in columns:
        # Ids and hashes are copied from here: folded when the terminal is narrow, never cut short.
        table.add_column(column, overflow="fold")
    for row in rows:
        # Text, not str: names are the users' own, and "[bold]" in one is shown, not read as rich markup.
        table.add_row(*(Text("" if cell is None else str(cell)) for cell in row))
    # Piped or captured: as wide as the rows need, so each row stays one line for grep and awk.
    Console(width=None if sys.stdout.isatty() else 1000).print(table)


def timestamp(value: str | None) -> str:
    return value[:16].replace("T", " ") if value else ""


def human_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{count} B"


def flat_metrics(metrics: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Numbers and short strings of the (nested) metrics as dotted names; lists (histories) are skipped."""
    for name, value in metrics.items():
        if isinstance(value, dict):
            yield from flat_metrics(value, f"{prefix}{name}.")
        elif isinstance(value, float):
            yield f"{prefix}{name}", f"{value:.4g}"
        elif isinstance(value, int | str | bool) and value is not None:
            yield f"{prefix}{name}", value
