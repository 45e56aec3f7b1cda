"""Spreading connections over est-server's workers: a worker holding more connections than another lets a new one go.

Every worker waits on the one listening socket and whichever wakes first accepts, so
connections opened together (a gateway's pool at start-up, a burst of pumps) often land
unevenly: eight opened at once were split 6-2, 7-1 or 8-0 (tests/test_worker_balance.py),
the busier core then serving 280-530 enrollments/s while the other idled. Here each
worker publishes how many connections it holds in memory it shares with
the master and its siblings (:class:`ConnectionCounts`), and :class:`BalancedServer` does
not accept while a sibling holds fewer: that sibling takes the connection.

A worker looks at the listening socket once per turn of its event loop, and under load a
turn computes the requests of all its ready connections: about 25 ms with 16 connections
sending enrollments. So the wait lasts until the sibling has looked, up to ``MAX_WAIT``:
when it lasted at most 5 ms, bench_enroll's 32 connections, opened at once, stayed split
8-24 to 11-21 for their lifetime in four runs of five. A sibling that lets a whole wait
pass without looking (stuck, or not accepting: it holds ``server.max_connections``) is
not waited for again until it has looked, so it delays one connection, not each.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from typing import Optional

from gevent.server import StreamServer

SLOTS = 256  # workers alive at once, old and new ones together during a reload (HUP)
# A worker's pid (0: free, -1: reserved for a worker being forked), its open connections, and how many times it
# has looked for a new one.
_SLOT = struct.Struct("qqq")
_FIELD = struct.Struct("q")
_ALL = struct.Struct(f"{3 * SLOTS}q")
MAX_WAIT = 0.5  # seconds a new connection waits for a sibling that holds fewer connections
RETRY = 0.001  # how often the wait looks again


class ConnectionCounts:
    """The open connections of every worker, one slot each, in an anonymous shared mapping made by the master."""

    def __init__(self) -> None:
        self._memory = mmap.mmap(-1, _ALL.size)  # MAP_SHARED: the forked workers see each other's writes

    def reserve(self) -> int:
        """In the master, before a fork: a slot for the worker about to be forked (a dead worker's slot is reused)."""
        for slot in range(SLOTS):
            pid = _FIELD.unpack_from(self._memory, slot * _SLOT.size)[0]
            if pid == 0 or (pid > 0 and not _alive(pid)):
                _SLOT.pack_into(self._memory, slot * _SLOT.size, -1, 0, 0)
                return slot
        raise RuntimeError(f"more than {SLOTS} est-server workers alive at once")

    def take(self, slot: int) -> None:
        """In the worker: ``slot`` is this process's."""
        _SLOT.pack_into(self._memory, slot * _SLOT.size, os.getpid(), 0, 0)

    def release(self, slot: int) -> None:
        """The worker is stopping: its count no longer holds connections back."""
        _SLOT.pack_into(self._memory, slot * _SLOT.size, 0, 0, 0)

    def held(self, slot: int) -> int:
        """The connections the worker in ``slot`` holds."""
        return _FIELD.unpack_from(self._memory, slot * _SLOT.size + _FIELD.size)[0]

    def add(self, slot: int, change: int) -> None:
        """In the worker of ``slot`` (one thread counts, its hub's): ``change`` connections opened (+) or closed (-)."""
        _FIELD.pack_into(self._memory, slot * _SLOT.size + _FIELD.size, self.held(slot) + change)

    def looked(self, slot: int) -> None:
        """In the worker of ``slot``: it is looking for a new connection (and takes it unless a sibling holds fewer)."""
        offset = slot * _SLOT.size + 2 * _FIELD.size
        _FIELD.pack_into(self._memory, offset, _FIELD.unpack_from(self._memory, offset)[0] + 1)

    def fewest_elsewhere(self, slot: int) -> Optional[tuple[int, int]]:
        """The sibling holding the fewest connections: how many, and how many times it has looked for
        one (None: no sibling is running)."""
        values = _ALL.unpack_from(self._memory)
        siblings = [values[i + 1 : i + 3] for i in range(0, len(values), 3) if values[i] > 0 and i != 3 * slot]
        return min(siblings, default=None)


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
        self._wait: Optional[tuple[float, int]] = None  # since when the pending connection waits, the sibling's looks then
        self._in_vain: Optional[int] = None  # the sibling's looks when a whole wait for it last ran out

    def do_read(self):
        self._counts.looked(self._slot)
        sibling = self._counts.fewest_elsewhere(self._slot)
        if sibling is not None and self._counts.held(self._slot) > sibling[0] and self._leave_to(sibling[1]):
            self.stop_accepting()
            self._timer = self.loop.timer(RETRY)
            self._timer.start(self._start_accepting_if_started)
            return None
        self._wait = None
        accepted = super().do_read()
        if accepted:
            self._counts.add(self._slot, 1)  # counted at once: the connection's greenlet starts later
        return accepted

    def _leave_to(self, looks: int) -> bool:
        """Whether the pending connection waits longer for the sibling holding fewer, which has looked ``looks`` times."""
        now = time.monotonic()
        if self._wait is None or self._wait[1] != looks or now - self._wait[0] > 2 * MAX_WAIT:
            # A connection not waited for yet: the sibling has looked since (and taken the last one), or that wait is long past.
            if looks == self._in_vain:
                return False  # it has not looked since a whole wait for it ran out
            self._wait = (now, looks)
        if now - self._wait[0] < MAX_WAIT:
            return True
        self._in_vain = looks
        return False

    def do_close(self, sock, *args) -> None:
        """After the connection's handler returned (gevent calls this for every accepted connection)."""
        try:
            super().do_close(sock, *args)
        finally:
            self._counts.add(self._slot, -1)
