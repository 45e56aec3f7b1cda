"""``est device``, ``est cert`` and ``est audit``: the registry, revocation and the trail."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime, timedelta, timezone

import click

from ..audit import cli_actor
from ..ca.crl import REASONS
from ..revocation import delete_device, revoke
from ..state import state
from ..store import AlreadyRevoked, NotFound
from . import est

REASON_CHOICE = click.Choice(sorted(REASONS), case_sensitive=True)


@est.group("device")
def device() -> None:
    """The device registry."""


@device.command("list")
@click.option("--label", help="Only this label.")
@click.option("--search", help="Device ids containing this text.")
def device_list(label: str | None, search: str | None) -> None:
    """List devices: id, label, device id, current serial, last enrollment."""
    for d in state().store.find_devices(label=label, search=search):
        click.echo(f"{d.id}\t{d.label}\t{d.device_key}\t{d.current_serial}\t{d.last_enrolled:%Y-%m-%d %H:%M}")


@device.command("show")
@click.argument("device_id", type=int)
def device_show(device_id: int) -> None:
    """One device and its certificate history."""
    store = state().store
    d = store.get_device(device_id)
    if d is None:
        raise click.ClickException(f"no device {device_id}")
    click.echo(
        f"device {d.id}: {d.device_key} on label {d.label}\n"
        f"first enrolled {d.first_enrolled:%Y-%m-%d %H:%M:%S} UTC, last {d.last_enrolled:%Y-%m-%d %H:%M:%S} UTC\n"
        f"requester {d.requester} from {d.client_address}\ncertificates:"
    )
    for c in store.device_certificates(d.id):
        current = " (current)" if c.serial == d.current_serial else ""
        click.echo(f"  {c.serial}\t{c.status}{current}\t{c.operation}\tvalid until {c.not_after:%Y-%m-%d}\t{c.subject}")


@device.command("delete")
@click.argument("device_id", type=int)
@click.option("--keep-certificate", is_flag=True, help="Leave its current certificate valid (until it expires; it cannot re-enroll).")
def device_delete(device_id: int, keep_certificate: bool) -> None:
    """Forget a device so its id can enroll again; its current certificate is revoked (cessationOfOperation)."""
    store = state().store
    d = store.get_device(device_id)
    deleted = delete_device(d, cli_actor(), keep_certificate=keep_certificate) if d else None
    if deleted is None:
        raise click.ClickException(f"no device {device_id}")
    c = store.get_certificate(deleted.current_serial)
    status = f"revoked ({c.revocation_reason}); CRL re-signed" if c.status == "revoked" else f"{c.status} (--keep-certificate)"
    click.echo(f"deleted device {device_id}; it may enroll again; its certificate {c.serial} is {status}")


@device.command("revoke")
@click.argument("device_id", type=int)
@click.option("--reason", type=REASON_CHOICE, default="cessationOfOperation", show_default=True)
def device_revoke(device_id: int, reason: str) -> None:
    """Revoke the device's current certificate and publish a new CRL."""
    d = state().store.get_device(device_id)
    if d is None:
        raise click.ClickException(f"no device {device_id}")
    _revoke(d.current_serial, reason)


@est.group("cert")
def cert() -> None:
    """Issued certificates."""


@cert.command("revoke")
@click.argument("serial")
@click.option("--reason", type=REASON_CHOICE, default="unspecified", show_default=True)
def cert_revoke(serial: str, reason: str) -> None:
    """Revoke a certificate by serial (hex) and publish a new CRL."""
    _revoke(serial.lower().replace(":", "").lstrip("0") or "0", reason)


def _revoke(serial: str, reason: str) -> None:
    try:
        revoke(serial, reason, cli_actor())
    except NotFound:
        raise click.ClickException(f"no certificate with serial {serial}") from None
    except AlreadyRevoked:
        raise click.ClickException(f"certificate {serial} is revoked already") from None
    click.echo(f"revoked {serial} ({reason}); CRL re-signed")


@cert.command("expiring")
@click.option("--days", type=click.IntRange(min=1), default=30, show_default=True)
def cert_expiring(days: int) -> None:
    """Valid certificates whose notAfter falls within DAYS: serial, notAfter, label, subject."""
    for c in state().store.expiring_certificates(datetime.now(timezone.utc) + timedelta(days=days)):
        click.echo(f"{c.serial}\t{c.not_after:%Y-%m-%d %H:%M}\t{c.label}\t{c.subject}")


@est.command("crl")
@click.option("--label", help="Only the CA that issues on this label (default: every CA).")
def crl_refresh(label: str | None) -> None:
    """Re-sign and store each CA's CRL now (for a timer; the server also refreshes them at half-life)."""
    app_state = state()
    if label is None:
        authorities = list(app_state.authorities)
    elif label in app_state.settings.labels:
        authorities = [app_state.authorities.for_label(label)]
    else:
        raise click.ClickException(f"no label {label!r} in the configuration")
    for authority in authorities:
        record = app_state.crls[authority.issuer_id].regenerate()
        subject = authority.certificate.subject.rfc4514_string()
        click.echo(f"CRL {record.number} valid until {record.next_update:%Y-%m-%d %H:%M} UTC ({authority.name}: {subject})")


@est.command("audit")
@click.option("--since", type=click.DateTime(), help="Only events at or after this UTC time.")
@click.option("--device", help="Only events for this device id.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines, for the SIEM.")
def audit_command(since: datetime | None, device: str | None, as_json: bool) -> None:
    """Print the audit trail, oldest first."""
    for e in state().store.audit_events(since=since, device=device):
        if as_json:
            record = asdict(e)
            record["at"] = e.at.isoformat() + "Z"
            click.echo(json.dumps(record, sort_keys=True))
        else:
            click.echo(f"{e.at:%Y-%m-%d %H:%M:%S}Z\t{e.event}\t{e.outcome}\t{e.actor}\t{e.client_address}\t{e.label}\t{e.device}\t{e.serial}\t{e.detail}")
