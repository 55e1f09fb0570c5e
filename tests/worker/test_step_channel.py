"""The step connections between an engine and its ranks, with ranks played by threads: the
same bytes reach every rank, rank 0's output comes back, and a rank that fails or leaves, or a
stranger without the secret, is told apart."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

import pytest

from caldera.worker.step_channel import HEADER, HELLO, RankChannel, RankFailed, StepChannel


def _rank(channel: StepChannel, rank: int, body: Callable[[RankChannel], None]) -> threading.Thread:
    def run() -> None:
        conn = RankChannel(channel.address, channel.token, rank)
        try:
            body(conn)
        finally:
            conn.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _echo(seen: list[bytes], rank: int) -> Callable[[RankChannel], None]:
    def body(conn: RankChannel) -> None:
        while (payload := conn.receive()) is not None:
            seen.append(payload)
            if rank == 0:
                conn.send_output(payload[::-1])

    return body


def test_every_rank_gets_the_step_and_rank_0_answers():
    channel = StepChannel("127.0.0.1", 2)
    seen: list[list[bytes]] = [[], []]
    # A stranger connects first, without the secret: dropped, the ranks still get in.
    stranger = socket.create_connection(channel.address)
    stranger.sendall(HEADER.pack(HELLO, 0) + b"x" * len(channel.token))
    threads = [_rank(channel, rank, _echo(seen[rank], rank)) for rank in (1, 0)]
    channel.accept(10, lambda: None)
    assert stranger.recv(1) == b""  # closed by the engine
    big = bytes(range(256)) * 40_000  # a step with an image's pixels: 10 MB
    for payload in (b"step one", big, b"three"):
        channel.broadcast(payload)
        assert channel.receive(lambda: None) == payload[::-1]
    channel.close()
    for thread in threads:
        thread.join(5)
        assert not thread.is_alive()  # the ranks' loops end when the engine closes
    assert seen == [[b"step one", big, b"three"]] * 2


def test_a_rank_reporting_an_error_or_leaving_fails_the_step_naming_it():
    channel = StepChannel("127.0.0.1", 2)

    def fails(conn: RankChannel) -> None:
        conn.receive()
        conn.send_error("rank 1 (node n, pid 7) failed a step: RuntimeError: out of memory")
        conn.receive()  # and leaves at the next step

    _rank(channel, 0, lambda conn: conn.receive() and conn.receive())
    _rank(channel, 1, fails)
    channel.accept(10, lambda: None)
    channel.broadcast(b"step")
    with pytest.raises(RankFailed, match="out of memory") as failed:
        channel.receive(lambda: None)
    assert failed.value.rank == 1
    channel.broadcast(b"step")
    with pytest.raises(RankFailed) as left:
        channel.receive(lambda: None)
    assert (left.value.rank, left.value.message) in {(0, None), (1, None)}
    channel.close()


def test_waiting_stops_when_check_raises_or_a_rank_never_connects():
    channel = StepChannel("127.0.0.1", 2)
    _rank(channel, 0, lambda conn: conn.receive())
    with pytest.raises(TimeoutError, match=r"rank\(s\) \[1\] did not connect"):
        channel.accept(0.5, lambda: None)
    channel.close()

    channel = StepChannel("127.0.0.1", 1)
    _rank(channel, 0, lambda conn: conn.receive() and conn.receive())  # never answers
    channel.accept(10, lambda: None)
    channel.broadcast(b"step")

    def check() -> None:
        raise RuntimeError("rank 0 has not answered a health check")

    with pytest.raises(RuntimeError, match="health check"):
        channel.receive(check)
    channel.close()
