"""``est request`` (enrollment requests waiting for approval) and ``est device allow|disallow|inventory`` (the asset inventory)."""

from __future__ import annotations

import csv
from pathlib import Path

import click

from ..approval import inventory_label
from ..audit import cli_actor
from ..config import DEFAULT_LABEL
from ..errors import ESTError
from ..records import inventory_json, request_json
from ..state import state
from ..store import AuditEvent
from ..store.requests import REQUEST_STATUSES, add_to_inventory, list_inventory, remove_from_inventory
from . import est
from .output import json_option, print_list
from .registry import device

REQUEST_COLUMNS = [
    ("id", "ID"), ("label", "LABEL"), ("device", "DEVICE"), ("operation", "OPERATION"), ("status", "STATUS"),
    ("created_at", "CREATED"), ("expires_at", "EXPIRES"), ("requester", "REQUESTER"), ("subject", "SUBJECT"),
]
label_option = click.option("--label", default=DEFAULT_LABEL, show_default=True, help="The label the inventory is for.")


@est.group("request")
def request() -> None:
    """Enrollment requests waiting for an operator (labels with approval: manual or inventory)."""


@request.command("list")
@click.option("--status", type=click.Choice([*REQUEST_STATUSES, "all"]), default="pending", show_default=True)
@json_option
def request_list(status: str, as_json: bool) -> None:
    """Requests, oldest first."""
    requests = state().approval.requests(None if status == "all" else status)
    print_list((request_json(r, state().approval.settings.pending_hours) for r in requests), REQUEST_COLUMNS, as_json, f"No {'' if status == 'all' else status + ' '}requests.")


@request.command("show")
@click.argument("request_id", type=int)
def request_show(request_id: int) -> None:
    """One request with its CSR's details."""
    record = request_json(_call(lambda: state().approval.find(request_id)), state().approval.settings.pending_hours, with_csr=True)
    pem = record.pop("csr_pem")
    for key, value in record.items():
        click.echo(f"{key}: {' '.join(str(value).split()) if value not in (None, []) else '-'}")
    click.echo(pem, nl=False)


@request.command("approve")
@click.argument("request_id", type=int)
def request_approve(request_id: int) -> None:
    """Approve: the device's next try (same CSR) gets its certificate."""
    decided = _call(lambda: state().approval.decide(request_id, True, cli_actor()))
    click.echo(f"request {decided.id} for {decided.device_key} on label {decided.label} approved; issued when the device retries")


@request.command("reject")
@click.argument("request_id", type=int)
@click.option("--reason", required=True, help="Told to the device's next try (403).")
def request_reject(request_id: int, reason: str) -> None:
    """Reject: the device's next try (same CSR) is refused with the reason."""
    decided = _call(lambda: state().approval.decide(request_id, False, cli_actor(), reason))
    click.echo(f"request {decided.id} for {decided.device_key} on label {decided.label} rejected")


def _call(action):
    try:
        return action()
    except ESTError as exc:
        raise click.ClickException(exc.message) from None


@device.command("allow")
@click.argument("names", nargs=-1)
@label_option
@click.option("--file", "listing", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Device ids, one a line, or a CSV file with --column.")
@click.option("--column", help="The CSV column holding the device ids (the file's first row names the columns).")
def device_allow(names: tuple[str, ...], label: str, listing: Path | None, column: str | None) -> None:
    """Add devices to the label's asset inventory (approval: inventory issues to them at once)."""
    keys = list(names) + (_read_listing(listing, column) if listing else [])
    if not keys:
        raise click.UsageError("name at least one device, or give --file")
    _call(lambda: inventory_label(state().settings, label))
    actor = cli_actor()
    audit = AuditEvent(event="inventory-add", actor=actor, label=label, detail=f"{len(keys)} device id(s)" + (f" from {listing.name}" if listing else ""))
    added = add_to_inventory(state().store, label, keys, actor, audit)
    click.echo(f"{added} added to the inventory of label {label} ({len(set(keys)) - added} listed already)")


@device.command("disallow")
@click.argument("name")
@label_option
def device_disallow(name: str, label: str) -> None:
    """Remove a device from the label's asset inventory."""
    audit = AuditEvent(event="inventory-remove", actor=cli_actor(), label=label, device=name)
    if not remove_from_inventory(state().store, label, name, audit):
        raise click.ClickException(f"{name!r} is not in the inventory of label {label}")
    click.echo(f"{name} removed from the inventory of label {label}")


@device.command("inventory")
@click.option("--label", help="Only this label.")
@json_option
def device_inventory(label: str | None, as_json: bool) -> None:
    """The asset inventory."""
    entries = list_inventory(state().store, label)
    columns = [("label", "LABEL"), ("device", "DEVICE"), ("added_by", "ADDED BY"), ("added_at", "ADDED")]
    print_list((inventory_json(e) for e in entries), columns, as_json, "The inventory is empty.")


def _read_listing(path: Path, column: str | None) -> list[str]:
    """Device ids from a file: one a line, or a CSV column named by its header."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        if column is None:
            return [line.strip() for line in handle if line.strip() and not line.startswith("#")]
        reader = csv.DictReader(handle)
        if column not in (reader.fieldnames or []):
            raise click.ClickException(f"{path.name}: no column {column!r} (its columns: {', '.join(reader.fieldnames or [])})")
        return [row[column].strip() for row in reader if (row[column] or "").strip()]
