"""SoftHSM for the tests: one token directory per test session, tokens in it, and taking a token away.

:func:`softhsm` makes a private ``softhsm2.conf`` and token directory and points
``SOFTHSM2_CONF`` at it for this process and the servers it starts (SoftHSM reads
it once per C_Initialize, so one per process). :meth:`SoftHSM.init_token`
runs ``softhsm2-util --init-token --free``. :meth:`SoftHSM.token_away` moves a
token's directory out of the token directory and back, which is what SoftHSM
sees as the token disappearing (sessions and handles on it fail; C_Initialize
no longer lists it) and coming back. :func:`token_pki_dir` is `est init` with
the CA key generated in a fresh token: the ``pki_dir`` of the end-to-end tests,
with the key in SoftHSM.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
PIN = "est-test-user-pin"
SO_PIN = "est-test-so-pin"
_counter = itertools.count(1)


class SoftHSM:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tokens = root / "tokens"
        self.tokens.mkdir(parents=True)
        self.conf = root / "softhsm2.conf"
        self.conf.write_text(f"directories.tokendir = {self.tokens}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n")
        self.pin_file = root / "user-pin"
        self.pin_file.write_text(PIN + "\n")
        self.pin_file.chmod(0o600)
        os.environ["SOFTHSM2_CONF"] = str(self.conf)

    def init_token(self, label: Optional[str] = None) -> str:
        """A new token (a unique label unless given); its label."""
        label = label or f"est-ca-{os.getpid()}-{next(_counter)}"
        subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", PIN, "--so-pin", SO_PIN],
            check=True, capture_output=True, env={**os.environ, "SOFTHSM2_CONF": str(self.conf)},
        )
        return label

    def token_directory(self, label: str) -> Path:
        for directory in self.tokens.iterdir():
            if label.encode() in (directory / "token.object").read_bytes():
                return directory
        raise LookupError(f"no token labelled {label} in {self.tokens}")

    @contextmanager
    def token_away(self, label: str) -> Iterator[None]:
        """The token is gone inside the block (its directory moved out), back after it."""
        directory = self.token_directory(label)
        away = self.root / f"away-{directory.name}"
        shutil.move(directory, away)
        try:
            yield
        finally:
            shutil.move(away, directory)


_instance: Optional[SoftHSM] = None


def softhsm() -> SoftHSM:
    """This test process's SoftHSM (made at first use)."""
    global _instance
    if _instance is None:
        _instance = SoftHSM(Path(tempfile.mkdtemp(prefix="softhsm-")))
        atexit.register(shutil.rmtree, _instance.root, True)
    return _instance


def token_pki_dir(directory: Path, key_type: str = "ec-p256") -> tuple[Path, str]:
    """`est init --pkcs11-module ... --token ...` in ``directory`` on a new token: (the directory, the token's label)."""
    from .conftest import run_cli

    hsm = softhsm()
    label = hsm.init_token()
    result = run_cli(
        "init", "--dir", str(directory), "--pkcs11-module", str(MODULE), "--token", label,
        "--pin-file", str(hsm.pin_file), "--key-type", key_type,
    )
    assert result.exit_code == 0, result.output
    return directory, label


ATTRIBUTES_SCRIPT = """
import json, sys, pkcs11
from pkcs11 import Attribute, ObjectClass
module, token, pin, label = sys.argv[1:]
session = pkcs11.lib(module).get_token(token_label=token).open(user_pin=pin)
key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)
names = ("EXTRACTABLE", "SENSITIVE", "NEVER_EXTRACTABLE", "ALWAYS_SENSITIVE", "LOCAL", "PRIVATE", "TOKEN")
print(json.dumps({name: bool(key[getattr(Attribute, name)]) for name in names}))
"""


def key_attributes(token: str, label: str = "issuing-ca") -> dict[str, bool]:
    """The private key's boolean attributes (CKA_EXTRACTABLE, CKA_SENSITIVE, ...), read by a process of its own."""
    import json
    import sys

    result = subprocess.run(
        [sys.executable, "-c", ATTRIBUTES_SCRIPT, str(MODULE), token, PIN, label], check=True, capture_output=True, text=True,
    )
    return json.loads(result.stdout)
