"""``est device``, ``est cert`` and ``est audit``: the registry, revocation and the trail."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import click

from ..records import certificate_json, device_json, event_json
from ..audit import cli_actor
from ..ca.crl import REASONS
from ..revocation import crl_not_renewed, delete_device, live_certificates, revoke, signing_authorities
from ..state import state
from ..store import AlreadyRevoked, Device, NotFound
from ..store.reports import AmbiguousDevice, DeviceNotFound, Reports
from . import est, require_ca_key
from .output import json_option, print_list

REASON_CHOICE = click.Choice(sorted(REASONS), case_sensitive=True)
DEVICE_LIST_LIMIT = 1000


@est.group("device")
def device() -> None:
    """The device registry.

    A device is named by its device name (the identity the label takes from the
    CSR, e.g. NPPBBB4) or by its device number (the registry's row number, as
    `device list` shows). Digits alone are a number; a name of digits only, or a
    name enrolled on several labels, needs --label.
    """


@device.command("list")
@click.option("--label", help="Only this label.")
@click.option("--search", help="Device names containing this text (a device number matches itself).")
@json_option
def device_list(label: str | None, search: str | None, as_json: bool) -> None:
    """List devices, newest first: number, label, name, current serial, last enrollment (UTC), status."""
    page = Reports(state().store.engine).devices(label=label, search=search, limit=DEVICE_LIST_LIMIT)
    print_list(
        (device_json(d, d.status, d.not_after) for d in page.items),
        [("number", "NUMBER"), ("label", "LABEL"), ("name", "NAME"), ("current_serial", "CURRENT SERIAL"), ("last_enrolled", "LAST ENROLLED"), ("status", "STATUS")],
        as_json,
        "No devices match." if (label or search) else "No devices are enrolled yet.",
    )
    if page.next_after is not None:
        click.echo(f"(the newest {DEVICE_LIST_LIMIT} of {page.total}; narrow with --label or --search)", err=True)


device_argument = click.argument("device_ref", metavar="DEVICE")
label_option = click.option("--label", help="The device's label, when its name is enrolled on several.")


def find_device(reference: str, label: str | None) -> Device:
    """The device a command names (see `est device --help`); a clear one-line error otherwise."""
    try:
        return Reports(state().store.engine).find_device(reference, label)
    except DeviceNotFound as exc:
        raise click.ClickException(str(exc)) from None
    except AmbiguousDevice as exc:
        raise click.ClickException(f"{exc}: add --label ({' or '.join(exc.labels)}) or give the device number") from None


@device.command("show")
@device_argument
@label_option
def device_show(device_ref: str, label: str | None) -> None:
    """One device (name or number) and its certificate history."""
    store = state().store
    d = find_device(device_ref, label)
    click.echo(
        f"device {d.device_key} (number {d.id}) on label {d.label}\n"
        f"first enrolled {d.first_enrolled:%Y-%m-%d %H:%M:%S} UTC, last {d.last_enrolled:%Y-%m-%d %H:%M:%S} UTC\n"
        f"requester {d.requester} from {d.client_address}\ncertificates:"
    )
    for c in store.device_certificates(d.id):
        current = " (current)" if c.serial == d.current_serial else ""
        click.echo(f"  {c.serial}\t{c.status}{current}\t{c.operation}\tvalid until {c.not_after:%Y-%m-%d}\t{c.subject}")


@device.command("delete")
@device_argument
@label_option
@click.option("--keep-certificate", is_flag=True, help="Leave its certificates valid (until they expire; they cannot re-enroll).")
def device_delete(device_ref: str, label: str | None, keep_certificate: bool) -> None:
    """Forget a device (name or number) so its name can enroll again; its certificates that are still valid are revoked (cessationOfOperation)."""
    d = find_device(device_ref, label)
    live = [] if keep_certificate else live_certificates(d)
    require_ca_key("revoke its certificates and sign the CRL", signing_authorities(live))
    if delete_device(d, cli_actor(), keep_certificate=keep_certificate) is None:
        raise click.ClickException(f"no device {device_ref}")
    if keep_certificate:
        outcome = f"its certificate {d.current_serial} stays valid (--keep-certificate)"
    else:
        crl = f"but {problem}" if (problem := crl_not_renewed()) else "CRL re-signed"
        outcome = f"revoked (cessationOfOperation): {', '.join(c.serial for c in live) or 'none still valid'}; {crl}"
    click.echo(f"deleted device {d.device_key} (number {d.id}, label {d.label}); it may enroll again; {outcome}")


@device.command("revoke")
@device_argument
@label_option
@click.option("--reason", type=REASON_CHOICE, default="cessationOfOperation", show_default=True)
def device_revoke(device_ref: str, label: str | None, reason: str) -> None:
    """Revoke the current certificate of a device (name or number) and publish a new CRL."""
    d = find_device(device_ref, label)
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
    record = state().store.get_certificate(serial)
    if record is None:
        raise click.ClickException(f"no certificate with serial {serial}")
    require_ca_key("revoke a certificate (the CRL is re-signed at once)", signing_authorities([record]))
    try:
        revoke(serial, reason, cli_actor())
    except NotFound:
        raise click.ClickException(f"no certificate with serial {serial}") from None
    except AlreadyRevoked:
        raise click.ClickException(f"certificate {serial} is revoked already") from None
    problem = crl_not_renewed()
    click.echo(f"revoked {serial} ({reason}); " + (f"but {problem}" if problem else "CRL re-signed"))


@cert.command("expiring")
@click.option("--days", type=click.IntRange(min=1), default=30, show_default=True)
@json_option
def cert_expiring(days: int, as_json: bool) -> None:
    """Valid certificates whose notAfter falls within DAYS: serial, notAfter (UTC), label, subject."""
    print_list(
        (certificate_json(c) for c in state().store.expiring_certificates(datetime.now(timezone.utc) + timedelta(days=days))),
        [("serial", "SERIAL"), ("not_after", "NOT AFTER"), ("label", "LABEL"), ("device_number", "DEVICE NUMBER"), ("subject", "SUBJECT")],
        as_json,
        f"No valid certificate expires within {days} days.",
    )


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
    require_ca_key("sign the CRL", authorities)
    for authority in authorities:
        record = app_state.crls[authority.issuer_id].regenerate()
        subject = authority.certificate.subject.rfc4514_string()
        click.echo(f"CRL {record.number} valid until {record.next_update:%Y-%m-%d %H:%M} UTC ({authority.name}: {subject})")


@est.command("audit")
@click.option("--since", type=click.DateTime(), help="Only events at or after this UTC time.")
@click.option("--device", "device_name", metavar="NAME", help="Only events for this device name (as the trail keeps them after a delete).")
@json_option
def audit_command(since: datetime | None, device_name: str | None, as_json: bool) -> None:
    """Print the audit trail, oldest first."""
    print_list(
        (event_json(e) for e in state().store.audit_events(since=since, device=device_name)),
        [
            ("at", "AT"), ("event", "EVENT"), ("outcome", "OUTCOME"), ("actor", "ACTOR"), ("client_address", "ADDRESS"),
            ("label", "LABEL"), ("device_name", "DEVICE NAME"), ("serial", "SERIAL"), ("detail", "DETAIL"),
        ],
        as_json,
        "No audit events match." if (since or device_name) else "The audit trail is empty.",
    )
