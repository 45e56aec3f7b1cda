"""Inside checks of the deployment's own files: the configuration, file modes and owners, and the
database (reachable, schema of this version, who may enroll). The certificates: certificates.py.

A secret file (a private key, a password, passphrase or PIN, the SQLite database) may be read by its
owner and by the service's group, never by every user: ``0600 est:est``, or ``0640 root:est`` as
docs/DEPLOYMENT.md and docs/HIGH_AVAILABILITY.md lay out. The service is whoever runs the doctor
(as the guides say, the service user).
"""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
import re
import stat
from pathlib import Path
from typing import Optional

import sqlalchemy as sa
import yaml

from ...config import ConfigError, Settings, parse_config
from ...profiles import EnrollmentProfile
from ...store import Store
from ..database import open_store
from .report import Report, count, one_line

# systemd's LoadCredential= files exist only while the service runs.
CREDENTIALS = "/run/credentials/"
# The settings naming a file that holds a secret; every other *_file holds certificates or configuration
# (tests/test_doctor.py checks that each Path setting is one or the other).
SECRET_FILE_SETTINGS = frozenset({"key_file", "key_passphrase_file", "pin_file", "password_file", "storage_password_file", "ocsp_responder_key_file"})


# --- the configuration and its files ------------------------------------------------------------


def check_config(report: Report, path: Path) -> tuple[Optional[Settings], dict[str, str]]:
    """The settings (None when unusable), and the systemd credentials left out because they are absent, by section."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        report.fail("config", f"cannot read {path}: {exc.strerror}", "pass --config FILE or set EST_CONFIG")
        return None, {}
    except yaml.YAMLError as exc:
        report.fail("config", f"{path} is not valid YAML: {one_line(str(exc))}", "fix the line it names")
        return None, {}
    check_file(report, "config", path, secret=False)
    absent = _leave_out_absent_credentials(data) if isinstance(data, dict) else {}
    try:
        settings = parse_config(data, base_dir=path.resolve().parent, source=str(path))
    except ConfigError as exc:
        todo = "fix the key it names; est-server refuses to start with this same line"
        if re.search(r"[\w.]*(passphrase|password|secret)[\w.]*: unknown key", str(exc), re.I):
            todo = "secrets never go in the YAML: name them with ca.key_passphrase_env or ca.key_passphrase_file"
        report.fail("config", str(exc), todo)
        return None, {}
    report.ok("config", f"{path} is valid")
    return settings, absent


def _leave_out_absent_credentials(data: dict) -> dict[str, str]:
    """Remove from ``data`` each ``ca`` section's passphrase file that is a systemd credential absent here.

    The configuration is refused without them, yet they exist only while est.service
    runs: the rest is checked all the same. Returns their paths by section name.
    """
    sections = {"ca": data.get("ca")}
    labels = data.get("labels")
    if isinstance(labels, dict):
        sections.update({f"labels.{name}.ca": label.get("ca") for name, label in labels.items() if isinstance(label, dict)})
    absent = {}
    for where, section in sections.items():
        credential = section.get("key_passphrase_file") if isinstance(section, dict) else None
        if isinstance(credential, str) and credential.startswith(CREDENTIALS) and not Path(credential).exists():
            absent[where] = section.pop("key_passphrase_file")
    return absent


def check_file(report: Report, subject: str, path: Path, secret: bool = True) -> bool:
    """Mode, owner and readability (a secret's as the module says); True when this user can read it."""
    report.files_checked.add(path)
    try:
        st = path.stat()
    except OSError as exc:
        report.fail(subject, f"{path}: {exc.strerror}", "create it, or fix the path in the configuration")
        return False
    mode, me, group = stat.S_IMODE(st.st_mode), pwd.getpwuid(os.geteuid()).pw_name, _group_name(os.getegid())
    if secret and mode & 0o006:
        access = "readable" if mode & 0o004 else "writable"
        report.fail(subject, f"{path} is {access} by every user (mode {mode:04o})", f"chmod o-rwx {path}")
    elif secret and mode & 0o060 and st.st_gid != os.getegid():
        report.warn(
            subject, f"{path} is open to its group {_group_name(st.st_gid)} (mode {mode:04o}), not the service's ({group}, of {me} who runs doctor)",
            f"chgrp {group} {path}, or chmod g-rwx {path}; or run doctor as the service user",
        )
    elif mode & 0o022 and not secret:
        report.fail(subject, f"{path} is writable by others (mode {mode:04o})", f"chmod go-w {path}")
    if secret and st.st_uid not in (os.geteuid(), 0):
        report.warn(subject, f"{path} is owned by uid {st.st_uid}, neither {me} who runs doctor nor root", f"chown {me} {path}, or run doctor as the service user")
    if not os.access(path, os.R_OK):
        report.fail(subject, f"{path} cannot be read by {me}", "run doctor as the service user; the service needs to read it")
        return False
    return True


def check_secret(report: Report, subject: str, path: Path) -> bool:
    """:func:`check_file` for a secret; a systemd credential absent here is as it should be. True when this user can read it."""
    if str(path).startswith(CREDENTIALS) and not path.exists():
        report.files_checked.add(path)
        report.ok(subject, f"{path} is a systemd credential, present only while est.service runs")
        return False
    return check_file(report, subject, path)


def check_secret_files(report: Report, settings: Settings) -> None:
    """Each secret file the configuration names that no other check has looked at (the database's and Redis's
    password files, OCSP responder keys, retired CAs' keys), named by its setting."""
    for setting, path in _secret_files(settings, "").items():
        if path not in report.files_checked:
            found = len(report.findings)
            if check_secret(report, setting, path) and len(report.findings) == found:
                report.ok(setting, f"{path} is closed to other users")


def _secret_files(section: object, prefix: str) -> dict[str, Path]:
    """The secret files under a settings section (labels and retired CAs included), by setting name."""
    found: dict[str, Path] = {}
    for field in dataclasses.fields(section):
        value, name = getattr(section, field.name), f"{prefix}{field.name}"
        children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, tuple) else ()
        if dataclasses.is_dataclass(value):
            found.update(_secret_files(value, f"{name}."))
        for key, child in children:
            if dataclasses.is_dataclass(child):
                found.update(_secret_files(child, f"{name}.{key}." if isinstance(key, str) else f"{name}[{key}]."))
        if isinstance(value, Path) and field.name in SECRET_FILE_SETTINGS:
            found[name] = value
    return found


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


# --- the database, and who may enroll ---------------------------------------------------------------


def check_database(report: Report, settings: Settings) -> Optional[Store]:
    """The store when it answers with this version's schema; None otherwise (its findings say why)."""
    password_file = settings.database.password_file
    if password_file is not None and str(password_file).startswith(CREDENTIALS) and not password_file.exists():
        report.warn("database", f"not checked: its password, {password_file}, exists only while est.service runs", "run doctor inside the service's credentials, or check the database from est.service's log")
        return None
    try:
        store = open_store(settings)  # connects at its first query: a missing SQLite file is not created here
        parsed = store.engine.url
        url_shown = parsed.render_as_string(hide_password=True)
        if parsed.get_backend_name() == "sqlite" and parsed.database:
            path = Path(parsed.database)
            if not path.exists():
                report.fail("database", f"{url_shown}: no such file", "point database.url at the server's database; est-admin init or est-server creates it")
                return None
            check_file(report, "database", path)
    except (sa.exc.ArgumentError, ImportError) as exc:
        report.fail("database", f"database.url cannot be used: {one_line(str(exc))}", "fix database.url, or install its driver (PostgreSQL: psycopg)")
        return None
    except ConfigError as exc:  # the password file cannot be read
        report.fail("database", str(exc), "run doctor as the service user; the service needs to read it")
        return None
    try:
        found = store.schema_status()
    except sa.exc.SQLAlchemyError as exc:
        report.fail("database", f"{url_shown} cannot be reached: {one_line(str(exc.orig or exc))}", "start the database, or fix database.url; enrollment answers 503 meanwhile")
        return None
    if found.empty:
        report.warn("database", f"{url_shown} has no tables yet, which est-server creates at schema revision {found.head} when it starts", "start est, or run est-admin db upgrade")
        return None
    if found.problem:
        report.fail("database", f"{url_shown}: {found.problem}", "est-server refuses to start until then (docs/DEPLOYMENT.md)")
        return None
    report.ok("database", f"{url_shown} answers; its schema is this version's (revision {found.current})")
    return store


def check_access(report: Report, store: Store, profile: EnrollmentProfile) -> None:
    subject = f"label {profile.name}"
    users = len(store.list_users()) if "basic" in profile.auth else 0
    ras = sum(profile.name in ra.label_set for ra in store.list_ras()) if "cert" in profile.auth else 0
    if users or ras:
        report.ok(subject, f"auth {', '.join(sorted(profile.auth))}: {count(users, 'user')} and {count(ras, 'RA certificate')} may enroll")
    else:
        todo = " or ".join(
            {"basic": "est-admin user add NAME", "cert": f"est-admin ra add CERT --label {profile.name}"}[m] for m in sorted(profile.auth)
        )
        report.warn(subject, f"auth {', '.join(sorted(profile.auth))}, and nobody is registered: every enrollment gets 401", todo)
