"""Messages between the front end and the EngineCore process: msgspec Structs over msgpack,
tensors as raw little-endian buffers, never pickle. Append fields only (a test pins the wire
format)."""

from __future__ import annotations

import msgspec
import numpy as np
import torch

from caldera.engine.sampling_params import SamplingParams
from caldera.scheduler.output import Logprobs

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TensorData(msgspec.Struct, array_like=True, gc=False):
    dtype: str
    shape: list[int]
    data: bytes

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> TensorData:
        tensor = tensor.detach().contiguous().cpu()
        name = str(tensor.dtype).removeprefix("torch.")
        raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
        return cls(name, list(tensor.shape), raw.numpy().tobytes())

    def to_tensor(self) -> torch.Tensor:
        dtype = _DTYPES[self.dtype]
        if dtype == torch.bfloat16:
            array = np.frombuffer(self.data, dtype=np.int16).reshape(self.shape)
            return torch.from_numpy(array.copy()).view(torch.bfloat16)
        array = np.frombuffer(self.data, dtype=np.dtype(self.dtype)).reshape(self.shape)
        return torch.from_numpy(array.copy())


class ImageData(msgspec.Struct, array_like=True, gc=False):
    """One preprocessed image of a request: its placeholder range, hash and pixels;
    ``base_only`` marks a LLaVA-NeXT image at low detail (the base tile alone)."""

    identifier: str
    offset: int
    length: int
    image_size: tuple[int, int]
    pixel_values: TensorData
    base_only: bool = False


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    images: list[ImageData] = []
    eos_token_id: int | None = None
    arrival_time: float = 0.0
    priority: int = 0


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | None = None
    new_logprobs: list[Logprobs] | None = None
    prompt_logprobs: list[Logprobs] | None = None
    num_cached_tokens: int = 0
    # Set when the core refused or lost this request (finish_reason is then "abort").
    error: str | None = None
    # time.monotonic() (the host's clock, shared with the front end) of the request's first
    # scheduling; sent once, with its first output.
    first_scheduled_time: float | None = None


class SchedulerStatsMessage(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    # Cumulative: vision encoder wall time, images encoded, images served without encoding
    # (encoder cache or prefix cache).
    encoder_seconds: float = 0.0
    encoder_runs: int = 0
    encoder_cache_hits: int = 0


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    outputs: list[EngineCoreOutput] = []
    stats: SchedulerStatsMessage | None = None
    # Set when the engine failed: every pending request fails with this message.
    error: str | None = None


# Front end -> core commands (tagged union).
class AddRequest(msgspec.Struct, tag="add", array_like=True, gc=False):
    request: EngineCoreRequest


class AbortRequests(msgspec.Struct, tag="abort", array_like=True, gc=False):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True, gc=False):
    pass


class Ready(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """Core -> front end, first message: loaded (with what the front end needs), or failed."""

    num_blocks: int = 0
    max_model_len: int = 0
    error: str | None = None


Command = AddRequest | AbortRequests | Shutdown
