"""Clients of the EngineCore: the same interface in-process (offline LLM, tests) and across a
process boundary (the server). The multiprocess client speaks msgpack over a pipe
(``send_bytes`` / ``recv_bytes``: msgspec Structs, never pickle)."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import multiprocessing as mp
import os
import queue
import threading
from collections.abc import Callable
from typing import Protocol

import msgspec

from caldera.engine.config import EngineConfig
from caldera.engine.core import EngineCore, parallel_config
from caldera.engine.messages import (
    AbortRequests,
    AddRequest,
    Command,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    Ready,
    Shutdown,
)
from caldera.engine.parent_watch import exit_when_orphaned

logger = logging.getLogger(__name__)

# Seconds between worker health checks while the engine process waits for requests.
HEALTH_CHECK_INTERVAL = 1.0


class EngineDeadError(RuntimeError):
    """The engine process stopped; every pending request fails with this."""


class EngineCoreClient(Protocol):
    num_blocks: int
    max_model_len: int

    def add_request(self, request: EngineCoreRequest) -> None: ...
    def abort_requests(self, request_ids: list[str]) -> None: ...
    def get_output(self, timeout: float | None = None) -> EngineCoreOutputs: ...
    def shutdown(self) -> None: ...


def _refused(request: EngineCoreRequest, exc: Exception) -> EngineCoreOutput:
    return EngineCoreOutput(request.request_id, [], finish_reason="abort", error=str(exc))


class InprocClient:
    """Drives an EngineCore in this process: ``get_output`` runs one step."""

    def __init__(self, config: EngineConfig, eos_token_id: int | None) -> None:
        self.core = EngineCore(config, eos_token_id)
        self.num_blocks = self.core.num_blocks
        self.max_model_len = self.core.max_model_len
        self._refusals: list[EngineCoreOutput] = []

    def add_request(self, request: EngineCoreRequest) -> None:
        try:
            self.core.add_request(request)
        except ValueError as exc:
            self._refusals.append(_refused(request, exc))

    def abort_requests(self, request_ids: list[str]) -> None:
        self.core.abort_requests(request_ids)

    def get_output(self, timeout: float | None = None) -> EngineCoreOutputs:
        outputs = self.core.step()
        if self._refusals:
            outputs.outputs = self._refusals + outputs.outputs
            self._refusals = []
        return outputs

    def shutdown(self) -> None:
        self.core.shutdown()


def with_ray_context(config: EngineConfig) -> EngineConfig:
    """``config`` for an engine process started from inside a Ray placement group (a Ray
    Serve replica): the process is a new Ray driver and would not see the group, so its
    cluster and group are named explicitly."""
    if parallel_config(config).backend != "ray" or config.ray_placement_group is not None:
        return config
    try:
        from caldera.worker.ray_executor import current_ray_context
    except ImportError:  # no Ray here: the engine process says so when it starts
        return config
    context = current_ray_context()
    if context is None:
        return config
    address, group = context
    return dataclasses.replace(config, ray_address=config.ray_address or address,
                               ray_placement_group=group)


def run_engine_core(config_bytes: bytes, eos_token_id: int | None, conn) -> None:
    """Body of the engine process: load, say Ready, then loop commands and steps."""
    exit_when_orphaned()
    encoder = msgspec.msgpack.Encoder()
    commands = msgspec.msgpack.Decoder(Command)
    try:
        core = EngineCore(EngineConfig.from_bytes(config_bytes), eos_token_id)
    except Exception as exc:  # reported to the front end, which raises it
        conn.send_bytes(encoder.encode(Ready(error=f"{type(exc).__name__}: {exc}")))
        return
    _inject_test_fault(core)
    try:
        conn.send_bytes(encoder.encode(Ready(core.num_blocks, core.max_model_len)))
        _loop(core, conn, encoder, commands)
    except (EOFError, OSError):  # the front end is gone
        return
    except Exception as exc:  # a failed step: every pending request fails with its message
        logger.exception("the engine step failed")
        with contextlib.suppress(OSError):
            conn.send_bytes(encoder.encode(
                EngineCoreOutputs(error=f"engine step failed: {type(exc).__name__}: {exc}")))
        raise SystemExit(1) from None
    finally:
        core.shutdown()


# Test-only fault injection, read in the engine process and nowhere else: with this set to k,
# the model's forward raises at the engine's k-th step, so tests can check what clients see
# when the engine fails mid-generation. Not a user option; no CLI flag or docs mention it.
TEST_FAIL_AT_STEP_ENV = "CALDERA_TEST_FAIL_AT_STEP"


def _inject_test_fault(core: EngineCore) -> None:
    value = os.environ.get(TEST_FAIL_AT_STEP_ENV)
    if not value:
        return
    fail_at = int(value)
    execute = core.executor.execute_model
    steps = itertools.count(1)

    def execute_or_fail(scheduler_output):
        if next(steps) == fail_at:
            raise RuntimeError(f"injected test fault at engine step {fail_at}")
        return execute(scheduler_output)

    core.executor.execute_model = execute_or_fail  # type: ignore[method-assign]


def _loop(core: EngineCore, conn, encoder: msgspec.msgpack.Encoder,
          commands: msgspec.msgpack.Decoder) -> None:
    refusals: list[EngineCoreOutput] = []
    last_stats = None
    while True:
        while conn.poll(0) or not (core.has_unfinished_requests() or refusals
                                   or core.has_finished_requests()):
            if not conn.poll(HEALTH_CHECK_INTERVAL):
                core.check_health()  # a dead worker is reported even while idle
                continue
            command = commands.decode(conn.recv_bytes())
            if isinstance(command, Shutdown):
                return
            if isinstance(command, AbortRequests):
                core.abort_requests(command.request_ids)
            else:
                try:
                    core.add_request(command.request)
                except ValueError as exc:
                    refusals.append(_refused(command.request, exc))
        outputs = core.step()
        if refusals:
            outputs.outputs = refusals + outputs.outputs
            refusals = []
        # Stats alone go out when they changed (an abort frees blocks without any output).
        if outputs.outputs or outputs.stats != last_stats:
            last_stats = outputs.stats
            conn.send_bytes(encoder.encode(outputs))


class MPClient:
    """Runs EngineCore in a child process; a reader thread queues what it sends back."""

    def __init__(self, config: EngineConfig, eos_token_id: int | None,
                 startup_timeout: float = 900.0,
                 on_output: Callable[[EngineCoreOutputs], None] | None = None) -> None:
        """``on_output``, when given, receives every batch of outputs on the reader thread
        (the async front end hands them to its event loop) instead of ``get_output``."""
        config = with_ray_context(config)
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=run_engine_core, name="caldera-engine-core",
                                   args=(config.to_bytes(), eos_token_id, child_conn),
                                   daemon=True)
        self.process.start()
        child_conn.close()
        self._encoder = msgspec.msgpack.Encoder()
        self._send_lock = threading.Lock()
        if not self._conn.poll(startup_timeout):
            self.process.kill()
            raise EngineDeadError(f"the engine did not start within {startup_timeout:.0f} s")
        ready = msgspec.msgpack.decode(self._recv_or_dead(), type=Ready)
        if ready.error is not None:
            raise EngineDeadError(f"the engine failed to start: {ready.error}")
        self.num_blocks, self.max_model_len = ready.num_blocks, ready.max_model_len
        self._outputs: queue.Queue[EngineCoreOutputs] = queue.Queue()
        self._deliver = on_output or self._outputs.put
        self._dead: str | None = None
        self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                        name="caldera-engine-reader")
        self._reader.start()
        # Commands are written by their own thread: a request carrying megabytes of pixels
        # must not block the caller (the server's event loop) while the engine is mid-step.
        self._commands: queue.Queue[bytes | None] = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, daemon=True,
                                        name="caldera-engine-writer")
        self._writer.start()

    def _recv_or_dead(self) -> bytes:
        try:
            return self._conn.recv_bytes()
        except (EOFError, OSError) as exc:
            self.process.join(timeout=1.0)
            raise EngineDeadError(
                f"the engine process exited (exit code {self.process.exitcode})"
            ) from exc

    def _read_loop(self) -> None:
        decoder = msgspec.msgpack.Decoder(EngineCoreOutputs)
        while True:
            try:
                data = self._recv_or_dead()
            except EngineDeadError as exc:
                self._dead = str(exc)
                self._deliver(EngineCoreOutputs(error=self._dead))
                return
            outputs = decoder.decode(data)
            if outputs.error is not None:
                self._dead = outputs.error
            self._deliver(outputs)
            if outputs.error is not None:
                return

    def _write_loop(self) -> None:
        while (data := self._commands.get()) is not None:
            try:
                self._conn.send_bytes(data)
            except (BrokenPipeError, OSError):
                self._dead = self._dead or "the engine process is gone"
                return

    @property
    def is_alive(self) -> bool:
        return self._dead is None and self.process.is_alive()

    @property
    def dead_reason(self) -> str | None:
        return self._dead

    def _send(self, command: AddRequest | AbortRequests | Shutdown) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        with self._send_lock:
            self._commands.put(self._encoder.encode(command))

    def add_request(self, request: EngineCoreRequest) -> None:
        self._send(AddRequest(request))

    def abort_requests(self, request_ids: list[str]) -> None:
        self._send(AbortRequests(request_ids))

    def get_output(self, timeout: float | None = None) -> EngineCoreOutputs:
        """The next batch of outputs; raises EngineDeadError once the process is gone."""
        try:
            outputs = self._outputs.get(timeout=timeout)
        except queue.Empty:
            return EngineCoreOutputs()
        if outputs.error is not None:
            self._outputs.put(outputs)  # every later caller sees the failure too
            raise EngineDeadError(outputs.error)
        return outputs

    def shutdown(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(EngineDeadError):
                self._send(Shutdown())
            self.process.join(timeout=10)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(timeout=5)
        self._commands.put(None)
        self._writer.join(timeout=5)
        self._conn.close()
