"""The shell examples of the README and the guides, run for real against a real server.

The convention for every Markdown file in the repository root and docs/:

- A ```sh block is run by this test. A document's ```sh blocks run in order
  in one bash session (variables, functions and the working directory carry
  over), each under ``set -e``: every command must succeed.
- A ```console block is a shell example shown, not run: it needs root,
  systemd, apt, FreeRADIUS, a hospital's host names or its files (/etc/est,
  /opt/est), or it sets up the machine the test itself runs on.
- Everything else (```text, ```json, ```yaml, ```ini, a bare fence) is output
  or a file. Output right after a ```sh block is compared loosely with what
  the block printed: an ``HTTP/1.1 NNN`` status line must be there, and a
  one-line JSON object must have the same keys (and its first ``items``
  entry the same keys) as the JSON the block printed, so field names in the
  docs stay the API's.

Before running, the test puts the real server's address in place of
``localhost:8445`` and ``127.0.0.1:8445`` (a free port, never 8445 itself) and a temporary folder in
place of ``/tmp/estdoc``. Each document's session gets what its prose says
the reader has; see SESSIONS.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from .conftest import PASSWORD, run_cli
from .server import BIN, REPO, free_port, start_server

pytestmark = pytest.mark.e2e

DOCUMENTS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```\s*$", re.S | re.M)
MARK = "@@doc-block-done@@"


@dataclass
class Block:
    language: str
    text: str
    line: int


def blocks(path: Path) -> list[Block]:
    source = path.read_text()
    return [Block(m.group(1), m.group(2), source.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(source)]


@dataclass
class Session:
    """Where a document's blocks run: working directory, environment, and the address to put in place of 8445."""

    cwd: Path
    env: dict[str, str]
    port: int


def readme_session(pki_dir: Path, tmp_path: Path) -> Iterator[Session]:
    """The README's reader: dev-server.sh running (its `instance/`, the `gateway` user, EST_PASSWORD exported),
    with the `pumps` label in DER that the README has them add, in a second terminal in the checkout."""
    checkout = tmp_path / "checkout"
    shutil.copytree(pki_dir, checkout / "instance")
    server = start_server(
        checkout / "instance", tmp_path, labels={"pumps": {"response_format": "der"}}, rate_limit={"enabled": False},
        database={"url": f"sqlite:///{tmp_path / 'est.db'}"},
    )
    try:
        assert run_cli("user", "add", "gateway", input=PASSWORD + "\n", config=server.config).exit_code == 0
        yield Session(checkout, {"EST_PASSWORD": PASSWORD}, server.port)
    finally:
        server.stop()
    left = sorted(p.name for p in checkout.iterdir() if p.name != "instance")
    assert left == [], f"the README's checks left {left} in the checkout"


def own_server_session(pki_dir: Path, tmp_path: Path) -> Iterator[Session]:
    """A document that starts its own server (in the background, from its first block)."""
    yield Session(tmp_path, {}, free_port())


def iqe_session(pki_dir: Path, tmp_path: Path) -> Iterator[Session]:
    """IQE_INTEGRATION's sections 3 and 5: the gateway team in an empty folder with `tls-root.pem`, `$EST` and
    `$PW` set (section 5's opening block), against a server with the guide's labels and EST user."""
    labels = {
        "pumps": {"response_format": "der", "auth": ["basic", "cert"], "duplicate_policy": "renew"},
        "pumps-b64": {"response_format": "base64", "base64_line_length": 64, "auth": ["basic", "cert"], "duplicate_policy": "renew"},
        "pumps-strict": {"csr_attributes": ["serialNumber"]},
    }
    server = start_server(  # DER at the top, as config-iqe.yaml has it
        pki_dir, tmp_path, response_format="der", labels=labels, rate_limit={"enabled": False}, database={"url": f"sqlite:///{tmp_path / 'est.db'}"}
    )
    try:
        assert run_cli("user", "add", "iqe-gateway", input=PASSWORD + "\n", config=server.config).exit_code == 0
        work = tmp_path / "gateway"
        work.mkdir()
        shutil.copy(server.ca_file, work / "tls-root.pem")  # the development CA issued the server's TLS certificate
        yield Session(work, {"EST": f"{server.url}/.well-known/est", "PW": PASSWORD}, server.port)
    finally:
        server.stop()


SESSIONS: dict[str, Callable[[Path, Path], Iterator[Session]]] = {
    "README.md": readme_session,
    "ADMIN_API.md": own_server_session,
    "IQE_INTEGRATION.md": iqe_session,
}


def substituted(text: str, port: int, tmp_path: Path) -> str:
    for host in ("localhost", "127.0.0.1"):
        text = text.replace(f"{host}:8445", f"{host}:{port}")
    return text.replace("/tmp/estdoc", str(tmp_path / "estdoc"))


def run_session(document: Path, runnable: list[Block], session: Session, tmp_path: Path) -> list[tuple[Block, str]]:
    """Run the document's ```sh blocks in one bash; each block's output, in order."""
    script = ["set -e"]
    for block in runnable:
        script += [substituted(block.text, session.port, tmp_path), f"printf '\\n{MARK}\\n'"]
    script.append("kill $(jobs -p) 2>/dev/null || true")  # a server a block started in the background
    env = {**os.environ, **session.env, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("EST_CONFIG", None)
    process = subprocess.Popen(
        ["bash", "-s"], cwd=session.cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: whatever a block starts in the background is stopped below
    )
    try:
        output, _ = process.communicate("\n".join(script).encode(), timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{document.name}: the ```sh blocks did not finish in 300 s:\n{output.decode(errors='replace')[-3000:]}")
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    parts = output.decode(errors="replace").split(f"\n{MARK}\n")
    done = len(parts) - 1
    if done < len(runnable):
        failed = runnable[done]
        pytest.fail(f"{document.name}:{failed.line}: the ```sh block failed (exit {process.returncode}):\n{failed.text}\n--- output ---\n{parts[-1]}")
    return list(zip(runnable, parts))


def check_output(document: Path, block: Block, printed: str, shown: Block) -> None:
    """The output a document shows after a block, against what the block printed."""
    where = f"{document.name}:{shown.line}"
    status = re.match(r"HTTP/1\.1 (\d{3})", shown.text)
    if status:
        assert f"HTTP/1.1 {status.group(1)}" in printed, f"{where}: shows {status.group(0)}; the command printed:\n{printed}"
    if shown.language == "json" and shown.text.count("\n") == 1:
        expected = json.loads(shown.text)
        actual = json.loads(next(line for line in printed.splitlines() if line.startswith("{")))
        assert sorted(expected) == sorted(actual), f"{where}: the fields shown differ from the API's"
        if expected.get("items") and actual.get("items"):
            assert sorted(expected["items"][0]) == sorted(actual["items"][0]), f"{where}: the item fields shown differ from the API's"


@pytest.mark.parametrize("document", [d for d in DOCUMENTS if any(b.language == "sh" for b in blocks(d))], ids=lambda p: p.name)
def test_shell_blocks_run(document, pki_dir, tmp_path):
    all_blocks = blocks(document)
    runnable = [b for b in all_blocks if b.language == "sh"]
    assert document.name in SESSIONS, f"{document.name} has ```sh blocks but no session in tests/test_docs.py says what they need"
    sessions = SESSIONS[document.name](pki_dir, tmp_path)
    session = next(sessions)
    try:
        results = run_session(document, runnable, session, tmp_path)
    finally:
        for _ in sessions:  # runs the session's teardown and its checks
            pass
    position = {id(b): i for i, b in enumerate(all_blocks)}
    for block, printed in results:
        i = position[id(block)]
        following = all_blocks[i + 1] if i + 1 < len(all_blocks) else None
        if following is not None and following.language not in ("sh", "console") and following.line - block.line - block.text.count("\n") <= 3:
            check_output(document, block, printed, following)


def test_every_shell_example_is_run_or_marked_illustrative():
    """A shell example with no language (or ```bash/```shell) is neither run nor marked: say which it is."""
    unmarked = [
        f"{d.relative_to(REPO)}:{b.line}"
        for d in DOCUMENTS
        for b in blocks(d)
        if b.language in ("bash", "shell") or (b.language == "" and re.match(r"\s*(\$ |est-admin |curl |openssl |sudo )", b.text))
    ]
    assert unmarked == [], "mark these ```sh (run by tests/test_docs.py) or ```console (illustrative)"
