"""How an EST body is written (DER, PEM, base64 and its lines), and which known client can read it.

Used for the answers the doctor reads (``cacerts``, rendered enrollment
answers) and for a request body captured from a gateway (``--request``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from ...encoding import CTE
from .report import Report, shown

# libest and `openssl base64 -d` read base64 through OpenSSL's BIO filter, which drops
# longer lines (measured with OpenSSL 3.0: 1,023 characters pass, 1,024 do not).
MAX_LINE = 1000
CLIENTS = {
    "strongswan": "strongSwan pki",
    "libest": "libest estclient",
    "globalsign": "GlobalSign estclient",
    "openssl": "openssl base64 -d",
    "der": "a gateway set to DER",
}


@dataclass(frozen=True)
class BodyForm:
    """How an EST body is written, as a client sees it."""

    kind: str  # DER | PEM | base64 | other
    lines: int = 0
    longest_line: int = 0
    crlf: bool = False
    trailing_newline: bool = False
    excess: int = 0  # DER: bytes after the structure (negative: missing from it)
    extra: str = ""  # the PEM label, or the bytes after a DER structure

    def __str__(self) -> str:
        if self.kind == "DER" and self.excess < 0:
            return f"raw DER, truncated: {-self.excess} byte(s) missing at the end"
        if self.kind == "DER":
            return "raw DER" + (f" followed by {self.excess} more byte(s) {self.extra}" if self.excess else "")
        if self.kind == "other":
            return "neither DER, PEM nor base64"
        if self.lines == 1:
            shape = f"on one line of {self.longest_line} characters"
        else:
            shape = f"wrapped at {self.longest_line} columns ({self.lines} lines, {'CRLF' if self.crlf else 'LF'})"
        label = f" ({self.extra})" if self.extra else ""
        return f"{self.kind}{label} {shape}, {'with a' if self.trailing_newline else 'no'} trailing newline"


def body_form(data: bytes) -> BodyForm:
    if data[:1] == b"\x30":
        excess = len(data) - _der_length(data)
        return BodyForm("DER", excess=excess, extra=shown(repr(data[-excess:]))[:40] if excess > 0 else "")
    pem = re.match(rb"\s*-----BEGIN ([A-Z0-9 ]+)-----", data)
    text = re.sub(rb"-----(BEGIN|END) [A-Z0-9 ]+-----", b"", data).strip(b"\r\n")
    if not re.fullmatch(rb"[A-Za-z0-9+/]+={0,2}", re.sub(rb"\s", b"", text)):
        return BodyForm("other")
    lines = [line.rstrip(b"\r") for line in text.split(b"\n")]
    return BodyForm(
        "PEM" if pem else "base64",
        lines=len(lines),
        longest_line=max(len(line) for line in lines),
        crlf=b"\r\n" in data,
        trailing_newline=data.endswith(b"\n"),
        extra=pem.group(1).decode() if pem else "",
    )


def unreadable(client: str, form: BodyForm, cte: bool, certificates: int, root_included: bool, enrollment: bool) -> Optional[str]:
    """Why ``client`` cannot read an answer written so; None when it can."""
    if client == "der":
        return None if form.kind == "DER" else "expects raw DER: response_format: der"
    if form.kind != "base64":
        return "expect base64: response_format: base64"
    if client == "strongswan" and form.lines > 1:
        return "needs one line: base64_line_length: 0"
    if client in ("libest", "openssl") and form.longest_line >= MAX_LINE:
        return f"lose lines of {form.longest_line:,} characters, need under {MAX_LINE:,}: base64_line_length: 64"
    if client == "libest" and not root_included:
        return "needs the self-signed root in cacerts: ca.chain_file"
    if client == "globalsign" and not cte:
        return f"needs {CTE}: base64"
    if client == "globalsign" and enrollment and certificates != 1:
        return f"refuses {certificates} certificates in an enrollment answer: include_chain: false"
    return None


def report_readers(report: Report, subject: str, what: str, verdicts: dict[str, Optional[str]], required: tuple[str, ...]) -> None:
    """One finding: who reads the answer and why the others cannot; FAIL when a ``required`` client (or every one) cannot."""
    readers = [CLIENTS[c] for c, why in verdicts.items() if why is None]
    reasons: dict[str, list[str]] = {}
    for client, why in verdicts.items():
        if why is not None:
            reasons.setdefault(why, []).append(CLIENTS[client])
    text = f"{what}; read by {', '.join(readers) or 'no known client'}"
    text += "".join(f"; not by {', '.join(names)} ({why})" for why, names in reasons.items())
    missing = [CLIENTS[c] for c in required if verdicts[c] is not None]
    if missing:
        report.fail(subject, text, f"{', '.join(missing)} cannot read it: change the label's response_format / base64_line_length / include_chain")
    elif not readers:
        report.fail(subject, text, "set response_format and base64_line_length for the gateway's client")
    else:
        report.ok(subject, text)


def _der_length(data: bytes) -> int:
    """Length of the DER element at the start of ``data``, header included."""
    if len(data) < 2 or data[1] < 0x80:
        return 2 + (data[1] if len(data) > 1 else 0)
    size = data[1] & 0x7F
    return 2 + size + int.from_bytes(data[2 : 2 + size], "big")
