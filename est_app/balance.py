"""Spreading connections over est-server's workers: a worker holding more connections than another lets a new one go.

Every worker waits on the one listening socket and whichever wakes first accepts, so
connections opened together (a gateway's pool at start-up, a burst of pumps) often land
unevenly: eight opened at once were split 6-2, 7-1 or 8-0 (tests/test_worker_balance.py),
the busier core then serving 280-530 enrollments/s while the other idled. Here each
worker publishes how many connections it holds in memory it shares with
the master and its siblings (:class:`ConnectionCounts`), and :class:`BalancedServer` does
not accept while a sibling holds fewer: that sibling takes the connection. A sibling busy
computing may not look for a while, so the wait lasts at most ``MAX_WAIT``; then the
connection is taken here after all.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from typing import Optional

from gevent.server import StreamServer

SLOTS = 256  # workers alive at once, old and new ones together during a reload (HUP)
_SLOT = struct.Struct("qq")  # a worker's pid (0: free, -1: reserved for a worker being forked), its open connections
_COUNT = struct.Struct("q")
_ALL = struct.Struct(f"{2 * SLOTS}q")
MAX_WAIT = 0.005  # seconds a new connection waits for a sibling that holds fewer connections
RETRY = 0.001  # how often the wait looks again


class ConnectionCounts:
    """The open connections of every worker, one slot each, in an anonymous shared mapping made by the master."""

    def __init__(self) -> None:
        self._memory = mmap.mmap(-1, _ALL.size)  # MAP_SHARED: the forked workers see each other's writes

    def reserve(self) -> int:
        """In the master, before a fork: a slot for the worker about to be forked (a dead worker's slot is reused)."""
        for slot in range(SLOTS):
            pid, _ = _SLOT.unpack_from(self._memory, slot * _SLOT.size)
            if pid == 0 or (pid > 0 and not _alive(pid)):
                _SLOT.pack_into(self._memory, slot * _SLOT.size, -1, 0)
                return slot
        raise RuntimeError(f"more than {SLOTS} est-server workers alive at once")

    def take(self, slot: int) -> None:
        """In the worker: ``slot`` is this process's."""
        _SLOT.pack_into(self._memory, slot * _SLOT.size, os.getpid(), 0)

    def release(self, slot: int) -> None:
        """The worker is stopping: its count no longer holds connections back."""
        _SLOT.pack_into(self._memory, slot * _SLOT.size, 0, 0)

    def held(self, slot: int) -> int:
        """The connections the worker in ``slot`` holds."""
        return _COUNT.unpack_from(self._memory, slot * _SLOT.size + _COUNT.size)[0]

    def add(self, slot: int, change: int) -> None:
        """In the worker of ``slot`` (one thread counts, its hub's): ``change`` connections opened (+) or closed (-)."""
        _COUNT.pack_into(self._memory, slot * _SLOT.size + _COUNT.size, self.held(slot) + change)

    def fewest_elsewhere(self, slot: int) -> Optional[int]:
        """The fewest connections a sibling holds (None: no sibling is running)."""
        values = _ALL.unpack_from(self._memory)
        counts = [values[i + 1] for i in range(0, len(values), 2) if values[i] > 0 and i != 2 * slot]
        return min(counts, default=None)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # PermissionError too means it exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class BalancedServer(StreamServer):
    """gevent's StreamServer that counts the connections it holds in its worker's slot and leaves a pending
    one, for a while, to a sibling holding fewer."""

    def __init__(self, listener, counts: ConnectionCounts, slot: int, **kwargs) -> None:
        super().__init__(listener, **kwargs)
        self._counts, self._slot = counts, slot
        self._waiting_since: Optional[float] = None

    def do_read(self):
        fewest = self._counts.fewest_elsewhere(self._slot)
        if fewest is not None and self._counts.held(self._slot) > fewest:
            now = time.monotonic()
            if self._waiting_since is None or now - self._waiting_since > 2 * MAX_WAIT:
                self._waiting_since = now  # a connection not seen before (the last one went to a sibling)
            if now - self._waiting_since < MAX_WAIT:
                self.stop_accepting()
                self._timer = self.loop.timer(RETRY)
                self._timer.start(self._start_accepting_if_started)
                return None
        self._waiting_since = None
        accepted = super().do_read()
        if accepted:
            self._counts.add(self._slot, 1)  # counted at once: the connection's greenlet starts later
        return accepted

    def do_close(self, sock, *args) -> None:
        """After the connection's handler returned (gevent calls this for every accepted connection)."""
        try:
            super().do_close(sock, *args)
        finally:
            self._counts.add(self._slot, -1)
