"""How every ``est`` list prints: a table for people, JSON lines for scripts.

On a terminal a list has a header row and aligned columns; piped, it is bare
tab-separated rows (no header, for cut and awk); with
``--json`` it is one JSON object per line, keyed as the admin API keys the
same records. An empty list says so in a sentence on stderr, so stdout stays
data only.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Iterable, Sequence

import click

Column = tuple[str, str]  # (record key, header)

json_option = click.option("--json", "as_json", is_flag=True, help="One JSON object per line, for scripts and the SIEM.")


def print_list(records: Iterable[dict[str, Any]], columns: Sequence[Column], as_json: bool, empty: str) -> None:
    """Print ``records`` (dicts holding at least the ``columns``' keys) as a table, TSV or JSON lines."""
    rows = list(records)
    if not rows:
        click.echo(empty, err=True)
        return
    if as_json:
        for record in rows:
            click.echo(json.dumps(record, sort_keys=True))
        return
    cells = [[_cell(record[key]) for key, _ in columns] for record in rows]
    if not sys.stdout.isatty():
        for line in cells:
            click.echo("\t".join(line))
        return
    header = [title for _, title in columns]
    widths = [max(len(value) for value in column) for column in zip(header, *cells)]
    for line in (header, *cells):
        click.echo("  ".join(value.ljust(width) for value, width in zip(line, widths)).rstrip())


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return " ".join(str(value).split())  # one line per row, whatever a device put in its name

