"""What the serving benchmark runs beside the engine: ``caldera serve`` and a loopback image
server as subprocesses, streaming HTTP clients that time each SSE chunk as it arrives, an
image load in a process of its own, and the CPU each process got (or waited for) from Linux's
per-thread scheduler statistics."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

JSON_HEADERS = {"Content-Type": "application/json"}

# ==== CPU accounting =========================================================================


@dataclass(frozen=True)
class SchedTimes:
    """Seconds a process's threads ran on a CPU, and waited runnable for one (a busy
    machine shows as waiting)."""

    run_s: float = 0.0
    wait_s: float = 0.0

    def __sub__(self, other: SchedTimes) -> SchedTimes:
        return SchedTimes(self.run_s - other.run_s, self.wait_s - other.wait_s)


def sched_times(pid: int) -> SchedTimes:
    """Summed over the process's live threads (``/proc/PID/task/*/schedstat``); zero where
    /proc has no scheduler statistics."""
    run = wait = 0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                fields = (task / "schedstat").read_text().split()
                run, wait = run + int(fields[0]), wait + int(fields[1])
    return SchedTimes(run / 1e9, wait / 1e9)


class CPUClock:
    """``with clock.measure() as used:`` fills ``used`` (name -> SchedTimes) with what each
    named process got during the block."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = dict(pids)

    @contextlib.contextmanager
    def measure(self) -> Iterator[dict[str, SchedTimes]]:
        before = {name: sched_times(pid) for name, pid in self.pids.items()}
        used: dict[str, SchedTimes] = {}
        try:
            yield used
        finally:
            for name, pid in self.pids.items():
                used[name] = sched_times(pid) - before[name]


def format_cpu(used: dict[str, SchedTimes]) -> str:
    return ", ".join(f"{name} {t.run_s:.1f} ({t.wait_s:.1f})" for name, t in used.items())


def child_pids(pid: int) -> list[int]:
    """Live children of ``pid`` (read from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid and fields[0] != "Z":
                    out.append(int(entry.name))
    return out


def spawned_children(server_pid: int) -> list[int]:
    """The server's multiprocessing children (not the resource tracker), oldest first: the
    EngineCore process, then the image workers."""
    children = []
    for pid in child_pids(server_pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                children.append((int(stat[19]), pid))  # field 22: start time
    return [pid for _, pid in sorted(children)]


def engine_pid(server_pid: int) -> int | None:
    """The server's EngineCore process (None where /proc does not tell)."""
    children = spawned_children(server_pid)
    return children[0] if children else None


def image_worker_pids(server_pid: int) -> list[int]:
    return spawned_children(server_pid)[1:]


# ==== processes: the server and the image server =============================================


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}: {tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                return
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s: {tail(log)}")


def tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def subprocess_at(cmd: list[str], health_url: str, log: Path, env: dict[str, str] | None = None,
                  timeout: float = 600.0) -> Iterator[subprocess.Popen]:
    """Runs ``cmd`` until the block ends (SIGTERM, then SIGKILL after 60 s)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
    try:
        wait_http(health_url, proc, log, timeout)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def server_command(model_dir: Path, port: int, options: dict[str, Any],
                   profile: Path | None = None) -> list[str]:
    """``caldera serve`` with the offline side's engine options, as flags. With ``profile``,
    the API process's main thread (the event loop) runs under cProfile, written there when
    the server stops."""
    args = ["--log-level", "WARNING", "serve", "--model", str(model_dir), "--port", str(port),
            "--no-ui", "--allow-private-media-urls", "--max-image-bytes", "64MiB"]
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    if profile is None:
        return [sys.executable, "-m", "caldera.api.cli", *args]
    # uvicorn re-raises the SIGTERM it stopped on: exiting through SystemExit instead lets
    # cProfile write its file.
    script = ("import cProfile, signal, sys\nfrom caldera.api.cli import main\n"
              "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
              "sys.argv = ['caldera', *sys.argv[2:]]\n"
              f"cProfile.runctx('main()', globals(), locals(), {str(profile)!r})\n")
    return [sys.executable, "-c", script, "--", *args]


# ==== HTTP clients ===========================================================================


@dataclass
class StreamResult:
    sent: float
    chunk_times: list[float]  # arrivals of the SSE chunks that carry tokens
    text: str
    completion_tokens: int

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.sent

    @property
    def itls(self) -> list[float]:
        return list(np.diff(self.chunk_times))

    def itls_within(self, start: float, end: float) -> list[float]:
        """Intervals between chunks that both arrived in [start, end]."""
        times = [t for t in self.chunk_times if start <= t <= end]
        return list(np.diff(times))


def steady_window(results: Sequence[StreamResult]) -> tuple[float, float]:
    """From the moment every stream of a batch started at once has its first token to the
    moment the first one has its last: no stream is in prefill then, none has left."""
    return (max(r.chunk_times[0] for r in results), min(r.chunk_times[-1] for r in results))


async def stream_chat(client: httpx.AsyncClient, body: bytes) -> StreamResult:
    """One streamed chat completion; chunks are timed as they arrive, before parsing. A
    chunk carries tokens when it has text or logprobs (text can lag its token: the
    detokenizer holds back an incomplete character, and special tokens have none)."""
    sent = time.perf_counter()
    times: list[float] = []
    parts: list[str] = []
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", content=body,
                             headers=JSON_HEADERS) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        buffer = b""
        async for data in response.aiter_raw():
            now = time.perf_counter()
            *events, buffer = (buffer + data).split(b"\n\n")
            for event in events:
                if not event.startswith(b"data: ") or event == b"data: [DONE]":
                    continue
                chunk = json.loads(event[6:])
                if "error" in chunk:
                    raise RuntimeError(f"error event: {chunk['error']}")
                for choice in chunk["choices"]:
                    text = choice["delta"].get("content")
                    if text or choice.get("logprobs"):
                        times.append(now)
                    if text:
                        parts.append(text)
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    if not times:
        raise RuntimeError("a stream ended without any token")
    return StreamResult(sent, times, "".join(parts), tokens)


def http_client(base_url: str, connections: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(600.0), trust_env=False,
                             limits=httpx.Limits(max_connections=connections,
                                                 max_keepalive_connections=connections))


async def run_closed_loop(base_url: str, bodies: Sequence[bytes],
                          concurrency: int) -> tuple[list[StreamResult], float]:
    """``concurrency`` clients; each sends the next body when its last stream has ended."""
    results: list[StreamResult | None] = [None] * len(bodies)
    queue = iter(enumerate(bodies))
    async with http_client(base_url, concurrency) as client:

        async def client_loop() -> None:
            for index, body in queue:  # one shared iterator: each takes the next request
                results[index] = await stream_chat(client, body)

        start = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return [r for r in results if r is not None], wall


def run_async(coro: Any) -> Any:
    """Runs ``coro`` on uvloop when it is installed (cheaper per chunk), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


# ---- the image load, in its own process ------------------------------------------------------


def _image_load_child(spec_path: str) -> None:
    """Runs as ``python -c`` (stdlib and httpx only, so it starts in a moment): says "ready",
    sends non-streamed image requests from the "go" line on stdin to the "stop" line, then
    writes the latencies of the requests done to the spec's result file."""
    import asyncio
    import json
    import sys
    import threading
    import time

    import httpx

    with open(spec_path) as f:
        spec = json.load(f)
    bodies = []
    for path in spec["bodies"]:
        with open(path, "rb") as f:
            bodies.append(f.read())
    clients = spec["clients"]
    stop = threading.Event()
    latencies: list[float] = []
    errors: list[str] = []

    async def loop(client: httpx.AsyncClient, index: int) -> None:
        while not stop.is_set():
            start = time.perf_counter()
            response = await client.post("/v1/chat/completions",
                                         content=bodies[index % len(bodies)],
                                         headers={"Content-Type": "application/json"})
            if response.status_code != 200:
                errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            latencies.append(time.perf_counter() - start)
            index += clients

    async def main() -> None:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=spec["base_url"], timeout=600.0,
                                     limits=limits, trust_env=False) as client:
            print("ready", flush=True)
            await asyncio.to_thread(sys.stdin.readline)  # "go"
            threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()),
                             daemon=True).start()
            await asyncio.gather(*(loop(client, k) for k in range(clients)))

    asyncio.run(main())
    with open(spec["result"], "w") as f:
        json.dump({"latencies": latencies, "errors": errors}, f)


@contextlib.contextmanager
def go_stop_child(function: Callable[[str], None], spec: dict[str, Any], workdir: Path,
                  name: str) -> Iterator[tuple[Callable[[], None], dict[str, Any]]]:
    """Runs ``function`` (a self-contained function of a spec file's path, its source sent
    as ``python -c``) in a child process that says "ready", works from the "go" line on stdin
    to the "stop" line and writes its results to ``spec["result"]``. Yields (a function that
    says go, a result dict holding ``pid``); leaving the block stops the child and fills the
    dict with ``wall_s`` (from go to stop) and what the child wrote."""
    spec_path = workdir / f"{name}-spec.json"
    spec_path.write_text(json.dumps(spec))
    script = (inspect.getsource(function)
              + f"\n\nimport sys\n{function.__name__}(sys.argv[1])\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(spec_path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    result: dict[str, Any] = {"wall_s": 0.0, "pid": proc.pid}
    started: list[float] = []

    def start() -> None:
        started.append(time.perf_counter())
        proc.stdin.write("go\n")
        proc.stdin.flush()

    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the {name} process did not start")
        yield start, result
    finally:
        if started:
            result["wall_s"] = time.perf_counter() - started[0]
        with contextlib.suppress(OSError):
            proc.stdin.write("go\nstop\n" if not started else "stop\n")
            proc.stdin.close()
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    result.update(json.loads(Path(spec["result"]).read_text()))


def _write_all(workdir: Path, name: str, contents: Sequence[bytes]) -> list[str]:
    paths = []
    for index, data in enumerate(contents):
        path = workdir / f"{name}-{index}"
        path.write_bytes(data)
        paths.append(str(path))
    return paths


@contextlib.contextmanager
def image_load(base_url: str, bodies: Sequence[bytes], clients: int, workdir: Path
               ) -> Iterator[tuple[Callable[[], None], dict[str, Any]]]:
    """Starts the image clients' process; yields (a function that starts the load, the
    result dict, holding ``pid`` already). Leaving the block stops the load, waits for the
    requests in flight and fills in ``latencies`` (s) and ``wall_s`` (from start to stop)."""
    spec = {"base_url": base_url, "bodies": _write_all(workdir, "image-body", bodies),
            "clients": clients, "result": str(workdir / "image-load.json")}
    with go_stop_child(_image_load_child, spec, workdir, "image load") as (start, result):
        yield start, result
    if result["errors"]:
        raise RuntimeError(f"image requests failed: {result['errors'][0]}")


def _image_work_child(spec_path: str) -> None:
    """Runs as ``python -c``: the image pool worker's own work (decode, preprocess, content
    hash, at the worker's niceness, one torch thread) on the spec's pictures, ``rate`` images
    per second, from the "go" line on stdin to the "stop" line, with no server involved; then
    writes how many it did."""
    import json
    import os
    import sys
    import threading
    import time

    import torch

    from caldera.engine.image_pool import WORKER_NICENESS
    from caldera.engine.image_processing import ImageProcessor, ImageProcessorConfig
    from caldera.engine.media import decode_image
    from caldera.engine.processor import prepare_image

    with open(spec_path) as f:
        spec = json.load(f)
    os.nice(WORKER_NICENESS)
    torch.set_num_threads(1)
    processor = ImageProcessor(ImageProcessorConfig.from_model_dir(spec["model_dir"]))
    pictures = []
    for path in spec["pictures"]:
        with open(path, "rb") as f:
            pictures.append(f.read())
    stop = threading.Event()
    print("ready", flush=True)
    sys.stdin.readline()  # "go"
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    done, start = 0, time.perf_counter()
    while not stop.is_set():
        prepare_image(processor, decode_image(pictures[done % len(pictures)]), False)
        done += 1
        delay = start + done / spec["rate"] - time.perf_counter()
        if delay > 0:
            stop.wait(delay)
    with open(spec["result"], "w") as f:
        json.dump({"images": done, "wall_s": time.perf_counter() - start}, f)


@contextlib.contextmanager
def image_work_outside(model_dir: Path, pictures: Sequence[bytes], rate: float, workdir: Path
                       ) -> Iterator[tuple[Callable[[], None], dict[str, Any]]]:
    """The control for the image load: the same decoding and preprocessing in a process of
    its own, beside the server but not through it. Yields (start, result dict with ``pid``);
    leaving the block fills in ``images`` and ``wall_s``."""
    spec = {"model_dir": str(model_dir), "rate": rate,
            "pictures": _write_all(workdir, "control-picture", pictures),
            "result": str(workdir / "image-work.json")}
    with go_stop_child(_image_work_child, spec, workdir, "image work") as (start, result):
        yield start, result


async def run_text_streams(base_url: str, bodies: Sequence[bytes],
                           start_load: Callable[[], None] | None = None) -> list[StreamResult]:
    """Every text stream at once (``start_load`` is called just before they are sent)."""
    async with http_client(base_url, len(bodies)) as client:
        if start_load is not None:
            start_load()
        return list(await asyncio.gather(*(stream_chat(client, b) for b in bodies)))
