"""The engine's wire format: msgpack round trips, tensors as raw buffers, and pinned field
order (array_like structs break silently if a field is inserted rather than appended)."""

from __future__ import annotations

import msgspec
import torch

from caldera.engine.messages import (
    AbortRequests,
    AddRequest,
    Command,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    ImageData,
    TensorData,
)
from caldera.engine.sampling_params import SamplingParams
from caldera.scheduler.output import Logprobs


def test_request_round_trip_keeps_tensors_exact():
    pixels = torch.randn(3, 3, 8, 8)
    for tensor in (pixels, pixels.to(torch.bfloat16), pixels.to(torch.float16)):
        request = EngineCoreRequest(
            "r1", [1, 2, 32000, 32000, 3], SamplingParams(temperature=0.5, stop=["x"]),
            [ImageData("abc", 2, 2, (300, 500), TensorData.from_tensor(tensor))], 2, 1.5, 0,
        )
        data = msgspec.msgpack.encode(AddRequest(request))
        decoded = msgspec.msgpack.decode(data, type=Command)
        assert isinstance(decoded, AddRequest)
        back = decoded.request.images[0].pixel_values.to_tensor()
        assert back.dtype == tensor.dtype and torch.equal(back, tensor)
        assert decoded.request.sampling_params == request.sampling_params
        assert b"pickle" not in data


def test_wire_format_is_pinned():
    out = EngineCoreOutputs(outputs=[EngineCoreOutput(
        "r", [5], finish_reason="stop", stop_reason=2,
        new_logprobs=[Logprobs(5, -0.5, 1, [5], [-0.5])])])
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(out)) == [
        [["r", [5], "stop", 2, [{"token_id": 5, "logprob": -0.5, "rank": 1,
                                 "top_token_ids": [5], "top_logprobs": [-0.5]}], None, 0, None,
          None]],
        None,
        None,
    ]
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(AbortRequests(["a"]))) == [
        "abort", ["a"]]
