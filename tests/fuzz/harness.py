"""What every harness shares: coverage instrumentation, the one rule, the seed corpus, the run.

Import this module first in a harness: it instruments ``est_app`` (and the
werkzeug / Flask-HTTPAuth / pyasn1 code that parses headers and ASN.1 for it)
as it is imported, so libFuzzer sees Python branch coverage.

The rule: the only exceptions that may leave a target are the catalogue's
client errors (4xx, est_app/errors.py); through the Flask test client, no
answer may be a 5xx. A server fault is re-raised with its own traceback, so
atheris reports it and writes the input as ``crash-<sha1>``.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from typing import Callable, Iterable

import atheris

with atheris.instrument_imports(include=["est_app", "werkzeug", "flask_httpauth", "pyasn1", "pyasn1_modules"]):
    import est_app  # noqa: F401  (every est_app module is imported from here on)
    import est_app.errors
    import flask_httpauth  # noqa: F401
    import pyasn1_modules.rfc7030  # noqa: F401
    import werkzeug.test  # noqa: F401

from est_app.errors import ESTError

from . import FINDINGS, WORK


def client_error_or_none(call: Callable, *args, **kwargs):
    """``call``'s result, or None when it refused with a catalogued one-line 4xx; anything else propagates."""
    try:
        return call(*args, **kwargs)
    except ESTError as exc:
        if not 400 <= exc.status < 500 or "\n" in exc.message:
            raise
        return None


class _Faults(logging.Handler):
    """Keeps the exception behind the last 500 the app logged (errors._fault logs it with its traceback)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.last: BaseException | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.last = record.exc_info[1]


_faults = _Faults()
logging.getLogger("est_app.errors").addHandler(_faults)
logging.getLogger("est_app.errors").propagate = False  # the fuzzer's output stays readable


class ServerFault(AssertionError):
    """A 5xx whose cause was not logged (should not happen; the status alone is the finding)."""


def no_server_error(response):
    """Pass a test-client response through; a 5xx re-raises the exception that caused it."""
    if response.status_code >= 500:
        cause, _faults.last = _faults.last, None
        if cause is not None:
            raise cause
        raise ServerFault(f"{response.status_code}: {response.get_data(as_text=True)!r}")
    return response


def run(name: str, test_one_input: Callable[[bytes], None], seeds: Iterable[bytes]) -> None:
    """Write ``seeds`` into the harness's corpus, add the committed findings, and fuzz.

    libFuzzer flags (``-runs=N``, ``-max_total_time=S``...) pass through from the
    command line; a file argument instead of flags replays that one input.
    """
    corpus = WORK / "corpus" / name
    corpus.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        (corpus / hashlib.sha1(seed).hexdigest()).write_bytes(seed)
    args = list(sys.argv)
    if not any(not a.startswith("-") for a in args[1:]):  # no corpus or input given: use ours
        args.append(str(corpus))
        if (FINDINGS / name).is_dir():
            args.append(str(FINDINGS / name))
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()
