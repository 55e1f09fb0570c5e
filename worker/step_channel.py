"""The per-step path between an engine and its tensor-parallel ranks: one TCP connection per
rank, opened by the rank to a port the engine listens on.

Ray starts, places and watches the ranks; the steps themselves skip it. A step's input is
pickled once by the engine and the same bytes are written to every rank's connection; rank 0
answers with the step's output, the other ranks only when they fail. A round trip to two
ranks costs about 0.15 ms against 0.55 ms through a Ray compiled graph (BENCHMARKS.md), a
waiting rank sleeps in ``recv`` instead of polling, and a rank that dies shows as its
connection closing, in the middle of a step too.

Frames are a header (kind, length) and a body. A rank's first frame is HELLO: its rank as the
length, then the channel's secret; the engine drops a connection that does not hold it, so
nobody else can pass for a rank and have the engine unpickle what they send.
"""

from __future__ import annotations

import hmac
import secrets
import selectors
import socket
import struct
import time
from collections.abc import Callable

HEADER = struct.Struct("!BQ")  # kind, body length (HELLO: the rank)
HELLO, STEP, OUTPUT, ERROR = range(4)
TOKEN_BYTES = 32
# How often a waiting engine calls its ``check`` (the health of the ranks).
CHECK_INTERVAL = 1.0


class RankFailed(Exception):
    """A rank reported a failed step, or closed its connection (``message`` is None then)."""

    def __init__(self, rank: int, message: str | None) -> None:
        super().__init__(message or f"rank {rank} closed its step connection")
        self.rank = rank
        self.message = message


class StepChannel:
    """The engine's end: listens on ``host``, then holds one connection per rank."""

    def __init__(self, host: str, world_size: int) -> None:
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self.world_size = world_size
        self._listener = socket.create_server((host, 0))
        self.address = (host, self._listener.getsockname()[1])
        self._ranks: list[socket.socket] = []
        self._selector = selectors.DefaultSelector()

    def accept(self, timeout: float, check: Callable[[], None]) -> None:
        """Waits for every rank to connect with the secret; ``check`` runs between waits and
        raises if a rank failed meanwhile."""
        ranks: dict[int, socket.socket] = {}
        deadline = time.monotonic() + timeout
        self._listener.settimeout(CHECK_INTERVAL)
        while len(ranks) < self.world_size:
            check()
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.world_size)) - set(ranks))
                raise TimeoutError(f"rank(s) {missing} did not connect within {timeout:.0f} s")
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(CHECK_INTERVAL)
            try:
                hello = _read_exact(conn, HEADER.size + TOKEN_BYTES)
            except OSError:
                hello = None
            if hello is None:
                conn.close()
                continue
            kind, rank = HEADER.unpack_from(hello)
            token = hello[HEADER.size:]
            if (kind != HELLO or not hmac.compare_digest(token, self.token)
                    or not 0 <= rank < self.world_size or rank in ranks):
                conn.close()
                continue
            conn.settimeout(None)
            _no_delay(conn)
            ranks[rank] = conn
        self._listener.close()
        self._ranks = [ranks[rank] for rank in range(self.world_size)]
        for rank, conn in enumerate(self._ranks):
            self._selector.register(conn, selectors.EVENT_READ, rank)

    def broadcast(self, payload: bytes) -> None:
        """The same step bytes to every rank."""
        frame = HEADER.pack(STEP, len(payload)) + payload
        for rank, conn in enumerate(self._ranks):
            try:
                conn.sendall(frame)
            except OSError:
                raise RankFailed(rank, None) from None

    def receive(self, check: Callable[[], None]) -> bytearray:
        """Rank 0's output of the step; raises RankFailed when a rank reports an error or
        closes its connection first. ``check`` runs every CHECK_INTERVAL while waiting."""
        while True:
            for key, _ in self._selector.select(CHECK_INTERVAL):
                rank: int = key.data
                kind, body = _read_frame(key.fileobj)  # type: ignore[arg-type]
                if kind == OUTPUT and rank == 0:
                    return body
                if kind == ERROR:
                    raise RankFailed(rank, body.decode(errors="replace"))
                raise RankFailed(rank, None)
            check()

    def close(self) -> None:
        self._listener.close()
        self._selector.close()
        for conn in self._ranks:
            conn.close()
        self._ranks = []


class RankChannel:
    """A rank's end: connects to the engine's ``address`` and says who it is."""

    def __init__(self, address: tuple[str, int], token: bytes, rank: int) -> None:
        self._conn = socket.create_connection(address)
        _no_delay(self._conn)
        self._conn.sendall(HEADER.pack(HELLO, rank) + token)

    def receive(self) -> bytearray | None:
        """The next step's bytes; None once the engine has closed the connection."""
        kind, body = _read_frame(self._conn)
        return body if kind == STEP else None

    def send_output(self, payload: bytes) -> None:
        self._conn.sendall(HEADER.pack(OUTPUT, len(payload)) + payload)

    def send_error(self, message: str) -> None:
        body = message.encode()
        self._conn.sendall(HEADER.pack(ERROR, len(body)) + body)

    def close(self) -> None:
        self._conn.close()


def _no_delay(conn: socket.socket) -> None:
    """Small frames leave at once (the peer waits for each one)."""
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _read_frame(conn: socket.socket) -> tuple[int | None, bytearray]:
    """(kind, body), or (None, empty) when the connection closed or broke."""
    try:
        header = _read_exact(conn, HEADER.size)
        if header is None:
            return None, bytearray()
        kind, length = HEADER.unpack(header)
        body = _read_exact(conn, length)
    except OSError:
        return None, bytearray()
    return (None, bytearray()) if body is None else (kind, body)


def _read_exact(conn: socket.socket, size: int) -> bytearray | None:
    """``size`` bytes (read into one buffer, not copied again), or None if the connection
    closes first."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    read = 0
    while read < size:
        count = conn.recv_into(view[read:])
        if count == 0:
            return None
        read += count
    return buffer
