"""The tensor-parallel process group of one rank: NCCL on CUDA, gloo on CPU.

Each rank is its own process (a Ray actor), so the group is torch.distributed's default group
of that process. Rendezvous goes through a ``TCPStore`` served by rank 0 on a free port of its
node::

    rank 0:  port = open_rendezvous(host)              (the store listens on a free port)
    driver:  hands (host, port) to every rank
    rank r:  group = init_tensor_parallel_group(r, world_size, host, port, device, store)

``GLOO_SOCKET_IFNAME`` and ``NCCL_SOCKET_IFNAME`` choose the network interface of the
collectives (torch.distributed and NCCL read them); the executor passes them on to every rank.
"""

from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist

# How long a rank waits for the others at the rendezvous, and a collective for its peers.
RENDEZVOUS_TIMEOUT = timedelta(seconds=300)


def open_rendezvous(host: str, world_size: int) -> dist.TCPStore:
    """Rank 0's store, listening on a free port of ``host`` (``store.port`` says which)."""
    return dist.TCPStore(host, 0, world_size, is_master=True, timeout=RENDEZVOUS_TIMEOUT,
                         wait_for_workers=False)


class TensorParallelGroup:
    """One rank's handle on its tensor-parallel group, passed to the parallel layers.

    ``collective_seconds`` adds up the wall time spent inside collectives (on CUDA, the launch
    time only, unless the caller synchronizes), for the per-step overhead benchmark.
    """

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self.collective_seconds = 0.0

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place; every rank gets the same values."""
        start = time.perf_counter()
        dist.all_reduce(tensor)
        self.collective_seconds += time.perf_counter() - start
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        self.collective_seconds += time.perf_counter() - start
        return tensor

    def gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
        """Every rank's ``tensor`` concatenated along ``dim`` in rank order, on rank 0; None on
        the others."""
        start = time.perf_counter()
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)] if self.is_first \
            else None
        dist.gather(tensor, parts, dst=0)
        self.collective_seconds += time.perf_counter() - start
        return torch.cat(parts, dim=dim) if parts is not None else None

    def destroy(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def init_tensor_parallel_group(
    rank: int,
    world_size: int,
    host: str,
    port: int,
    device: torch.device,
    store: dist.TCPStore | None = None,
) -> TensorParallelGroup:
    """Joins the group whose rank 0 serves the store at ``host:port`` (rank 0 passes its own
    ``store``). Returns once every rank has joined."""
    if store is None:
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=RENDEZVOUS_TIMEOUT)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        if device.index is None:  # the one GPU Ray made visible to this rank
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=RENDEZVOUS_TIMEOUT,
                            device_id=device if device.type == "cuda" else None)
    return TensorParallelGroup(rank, world_size)
