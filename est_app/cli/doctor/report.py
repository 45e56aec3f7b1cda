"""The doctor's findings and how they print, and the text helpers every check shares.

A finding prints as ``OK|WARN|FAIL subject: what — what to do``; the report
has failed when any finding is FAIL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Finding:
    level: str  # OK | WARN | FAIL
    subject: str
    what: str
    todo: str = ""

    def line(self) -> str:
        return f"{self.level:<4} {self.subject}: {self.what}" + (f" — {self.todo}" if self.todo else "")


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    files_checked: set[Path] = field(default_factory=set)  # each file's mode is checked once, by the first check to reach it

    def ok(self, subject: str, what: str, todo: str = "") -> None:
        self.findings.append(Finding("OK", subject, what, todo))

    def warn(self, subject: str, what: str, todo: str = "") -> None:
        self.findings.append(Finding("WARN", subject, what, todo))

    def fail(self, subject: str, what: str, todo: str = "") -> None:
        self.findings.append(Finding("FAIL", subject, what, todo))

    @property
    def failed(self) -> bool:
        return any(f.level == "FAIL" for f in self.findings)


def shown(text: str) -> str:
    """Device- or file-supplied text made safe for a terminal: control characters escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def one_line(text: str) -> str:
    return " ".join(text.split())[:300]
