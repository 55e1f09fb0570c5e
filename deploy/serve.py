"""Caldera on Ray Serve: N replicas of ``caldera serve`` behind Serve's router.

    serve run caldera.deploy.serve:app_builder model=llava-hf/llava-v1.6-mistral-7b-hf \\
        tensor_parallel_size=2 device=cuda min_replicas=1 max_replicas=4

The arguments are ``caldera serve``'s options, named with underscores (``max_model_len=8192``,
``served_model_name=llava``, ``no_ui=true``), read by the same parser, plus the replica options
of ``ReplicaOptions``. Each replica runs the app of ``caldera serve`` (``create_app``: the same
OpenAI routes, admission and metrics) with its own engine process, the same as the server's::

    Serve proxy --> replica 1: create_app --> engine process --> TP workers (Ray actors)
                \\-> replica 2: ...

Resources of one replica:

- tensor_parallel_size 1: the replica actor holds ``num_cpus`` CPUs and, on GPUs, one GPU,
  which its engine process (a child of the actor) inherits.
- tensor_parallel_size N > 1: a placement group per replica, ``[{"CPU": num_cpus}, {"GPU": 1}
  x N]`` (``{"CPU": cpus_per_rank}`` per rank on CPUs). The replica sits in the first bundle;
  its engine process finds the group (``caldera.engine.core_client.with_ray_context``) and the
  executor puts rank r in the bundle after it, so every replica owns its workers and no
  second placement group competes for the same GPUs.

Autoscaling follows ongoing requests per replica (``target_ongoing_requests``); a replica takes
at most ``max_ongoing_requests`` at once (default: the engine's ``max_num_seqs``, one full
batch), the rest wait in Serve's queue for whichever replica frees first. Serve's health check
asks the replica's own ``/health``, so a replica whose engine or worker died is replaced. The
metrics of every replica go to Ray's metrics agent (caldera.deploy.metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from typing import Any

import httpx
import msgspec
from fastapi import FastAPI
from ray import serve
from ray.serve import Application
from ray.serve.deployment import Deployment

from caldera.api.cli import build_parser, serve_configs
from caldera.api.config import ServerConfig
from caldera.api.server import create_app
from caldera.deploy.metrics import RayMetricsExporter
from caldera.engine.config import EngineConfig
from caldera.engine.core import parallel_config

DEPLOYMENT_NAME = "Caldera"
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# Serve's own options, not caldera serve's: Serve's proxy listens for the replicas.
NOT_PER_REPLICA = ("host", "port", "uvicorn_log_level")


class DeployArgumentError(ValueError):
    """An application argument that cannot be used; the message says which and why."""


@dataclass(frozen=True, kw_only=True)
class ReplicaOptions:
    """How many replicas and what each one holds.

    ``num_replicas``: a fixed count; without it the count is autoscaled between
    ``min_replicas`` and ``max_replicas`` (Serve's defaults, 1 and 1, unless given) on
    ``target_ongoing_requests`` per replica (default: half of ``max_ongoing_requests``).
    ``num_cpus``: CPUs of the replica itself (HTTP, tokenization, image preprocessing, engine
    process). ``placement_group_strategy``: how a replica's bundles spread over nodes (PACK
    keeps the ranks on one node when they fit). ``cpus_per_rank``: what each tensor-parallel
    rank reserves when the ranks run on CPUs (on GPUs each takes one GPU).
    """

    num_replicas: int | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    max_ongoing_requests: int | None = None
    num_cpus: float = 1.0
    cpus_per_rank: float = 1.0
    placement_group_strategy: str = "PACK"

    def __post_init__(self) -> None:
        if self.num_replicas is not None and (self.min_replicas is not None
                                              or self.max_replicas is not None):
            raise DeployArgumentError("give num_replicas (a fixed count) or min_replicas/"
                                      "max_replicas (autoscaled), not both")
        if self.num_replicas is not None and self.num_replicas < 1:
            raise DeployArgumentError(f"num_replicas must be at least 1, got "
                                      f"{self.num_replicas}")
        low, high = self.min_replicas or 0, self.max_replicas
        if low < 0 or (high is not None and high < max(low, 1)):
            raise DeployArgumentError(f"need 0 <= min_replicas <= max_replicas and "
                                      f"max_replicas >= 1, got {low} and {high}")
        if self.num_cpus <= 0 or self.cpus_per_rank <= 0:
            raise DeployArgumentError(f"num_cpus and cpus_per_rank must be positive, got "
                                      f"{self.num_cpus} and {self.cpus_per_rank}")
        if self.placement_group_strategy not in PLACEMENT_STRATEGIES:
            raise DeployArgumentError(f"placement_group_strategy must be one of "
                                      f"{', '.join(PLACEMENT_STRATEGIES)}, got "
                                      f"{self.placement_group_strategy!r}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


# ==== the application =========================================================================


def app_builder(args: dict[str, Any]) -> Application:
    """The application of ``serve run caldera.deploy.serve:app_builder key=value ...`` and of
    a Serve config's ``import_path``; ``args`` are strings from the command line or typed
    values from YAML."""
    options = read_replica_options(args)
    server_config, engine_config = read_caldera_args(
        {k: v for k, v in args.items() if k not in ReplicaOptions.names()})
    return caldera_deployment(server_config, engine_config, options).bind()


def caldera_deployment(server_config: ServerConfig, engine_config: EngineConfig,
                       options: ReplicaOptions | None = None) -> Deployment:
    """The Serve deployment of Caldera replicas (for ``serve.run(...bind())`` from Python)."""
    options = options or ReplicaOptions()

    def build_app() -> FastAPI:  # runs in each replica as it starts
        return replica_app(server_config, engine_config)

    ingress = serve.ingress(build_app)(CalderaReplica)
    max_ongoing = options.max_ongoing_requests or engine_config.max_num_seqs
    settings: dict[str, Any] = dict(
        name=DEPLOYMENT_NAME,
        max_ongoing_requests=max_ongoing,
        # Long generations finish on a replica that is being stopped (a scale-down).
        graceful_shutdown_timeout_s=60,
        **replica_resources(engine_config, options),
    )
    if options.num_replicas is not None:
        settings["num_replicas"] = options.num_replicas
    else:
        settings["autoscaling_config"] = {
            "min_replicas": 1 if options.min_replicas is None else options.min_replicas,
            "max_replicas": max(options.max_replicas or 1, options.min_replicas or 1),
            "target_ongoing_requests": (options.target_ongoing_requests
                                        or max(1, max_ongoing // 2)),
        }
    return serve.deployment(ingress, **settings)


def replica_resources(engine_config: EngineConfig, options: ReplicaOptions) -> dict[str, Any]:
    """Serve's resource settings for one replica (see the module docstring)."""
    use_gpu = wants_gpu(engine_config.device)
    parallel = parallel_config(engine_config)
    if parallel.backend != "ray":
        return {"ray_actor_options": {"num_cpus": options.num_cpus,
                                      "num_gpus": 1 if use_gpu else 0}}
    rank = {"GPU": 1.0} if use_gpu else {"CPU": options.cpus_per_rank}
    return {
        "ray_actor_options": {"num_cpus": options.num_cpus, "num_gpus": 0},
        "placement_group_bundles": [{"CPU": options.num_cpus}]
        + [dict(rank) for _ in range(parallel.tensor_parallel_size)],
        "placement_group_strategy": options.placement_group_strategy,
    }


def wants_gpu(device: str) -> bool:
    """``device=auto``: GPUs when the Ray cluster has some (the builder runs in the cluster
    under a Serve config) or, before ``serve run`` has connected, when this machine has one."""
    if device != "auto":
        return device.startswith("cuda")
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) >= 1
    import torch

    return torch.cuda.is_available()


# ==== one replica =============================================================================


class CalderaReplica:
    """A replica: the app of ``caldera serve`` (built by ``replica_app`` once Serve has made
    the actor; ``serve.ingress`` runs its lifespan, which starts the engine process)."""

    app: FastAPI  # set by serve.ingress's wrapper

    async def check_health(self) -> None:
        """Serve's periodic check: the replica's own ``/health`` (503 once its engine or a
        worker died), asked in-process."""
        transport = httpx.ASGITransport(app=self.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
            response = await client.get("/health")
        if response.status_code != 200:
            raise RuntimeError(f"the replica is unhealthy: {response.text}")


def replica_app(server_config: ServerConfig, engine_config: EngineConfig) -> FastAPI:
    """``create_app`` whose lifespan also exports the app's metrics to Ray while it runs."""
    app = create_app(server_config, engine_config)
    exporter = RayMetricsExporter(app.state.metrics.registry, replica_tags())
    serve_lifespan = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app_: FastAPI) -> AsyncIterator[None]:
        async with serve_lifespan(app_):
            task = asyncio.create_task(exporter.run(), name="caldera-ray-metrics")
            try:
                yield
            finally:
                task.cancel()

    app.router.lifespan_context = lifespan
    return app


def replica_tags() -> dict[str, str]:
    """The labels Ray Serve's own metrics use to tell replicas apart."""
    context = serve.get_replica_context()
    return {"application": context.app_name, "deployment": context.deployment,
            "replica": context.replica_tag}


# ==== arguments ===============================================================================


def read_replica_options(args: dict[str, Any]) -> ReplicaOptions:
    """The ``ReplicaOptions`` among ``args`` (the others are ignored), strings converted."""
    ours = {k: v for k, v in args.items() if k in ReplicaOptions.names()}
    try:
        return msgspec.convert(ours, ReplicaOptions, strict=False)
    except msgspec.ValidationError as exc:
        raise DeployArgumentError(f"invalid replica option: {exc}") from None


def read_caldera_args(args: dict[str, Any]) -> tuple[ServerConfig, EngineConfig]:
    """``caldera serve``'s options from ``{"max_model_len": 8192, "no_ui": True, ...}``,
    through the same parser and config code as the command line."""
    parser = _serve_parser()
    argv = ["serve"]
    for key, value in args.items():
        if key in NOT_PER_REPLICA:
            raise DeployArgumentError(f"{key!r} is not an option of a replica: Serve's proxy "
                                      f"listens for every replica (set Serve's http_options)")
        argv += _to_argv(parser, key, value)
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            namespace = build_parser().parse_args(argv)
        return serve_configs(namespace)
    except SystemExit as exc:  # argparse (and a missing --model) exit with their message
        message = errors.getvalue().strip().splitlines() or [str(exc.code)]
        raise DeployArgumentError(f"invalid Caldera option: {message[-1]}") from None


def _serve_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["serve"]


def _to_argv(parser: argparse.ArgumentParser, key: str, value: Any) -> list[str]:
    flag = "--" + key.replace("_", "-")
    action = parser._option_string_actions.get(flag)
    if action is None or flag == "--help":
        known = sorted(a.option_strings[-1][2:].replace("-", "_") for a in parser._actions
                       if a.option_strings and a.option_strings[-1] != "--help")
        raise DeployArgumentError(
            f"unknown argument {key!r}; Caldera's are {', '.join(known)}; the replicas' are "
            f"{', '.join(ReplicaOptions.names())}")
    if action.nargs == 0:  # a switch: true/false
        on = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        return [flag] if on else []
    if action.nargs == "?" and value is True:  # demo: true
        return [flag]
    values = [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    if isinstance(action, argparse._AppendAction):
        return [part for v in values for part in (flag, v)]
    return [flag, *values]
