"""ModelRunner: one step of the model for a batch the scheduler described.

It keeps each request's tokens, blocks and sampling state between steps (the scheduler sends
new requests whole and known ones as diffs), runs the vision encoder for the images scheduled
this step into an encoder cache, flattens the step's tokens into one batch (see
``caldera.kernels.metadata``), runs the decoder over the paged KV cache, and samples the
requests whose computed tokens reach their end.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from caldera.kernels.metadata import AttentionMetadata
from caldera.scheduler.output import (
    ImageFeature,
    Logprobs,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)
from caldera.worker.config import ModelConfig
from caldera.worker.host_memory import zeros_in_huge_pages
from caldera.worker.models.llava import LlavaForConditionalGeneration
from caldera.worker.sampler import Sampler, SamplingMetadata

logger = logging.getLogger(__name__)


def kv_cache_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype,
                             num_kv_heads: int | None = None) -> int:
    """``num_kv_heads``: the KV heads this rank holds (default: all of the model's)."""
    text = config.text
    per_token = 2 * text.num_layers * (num_kv_heads or text.num_kv_heads) * text.head_dim
    return per_token * block_size * torch.empty((), dtype=dtype).element_size()


@dataclass
class RequestState:
    req_id: str
    prompt_token_ids: list[int]
    images: list[ImageFeature]
    sampling_params: Any
    block_ids: list[int]
    num_computed_tokens: int
    generator: torch.Generator | None
    output_token_ids: list[int] = field(default_factory=list)
    # Prompt positions up to here have had their logprob reported (recomputation after a
    # preemption must not report them twice).
    prompt_logprobs_reported: int = 1

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        prompt_len = len(self.prompt_token_ids)
        if end <= prompt_len:
            return self.prompt_token_ids[start:end]
        tail = self.output_token_ids[max(start - prompt_len, 0): end - prompt_len]
        return self.prompt_token_ids[start:prompt_len] + tail if start < prompt_len else tail


@dataclass
class StepInputs:
    """The flattened batch of one step."""

    req_ids: list[str]
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    image_embeds: torch.Tensor | None  # [rows, hidden]
    image_mask: torch.Tensor | None  # [T]
    sample_rows: list[int]  # row of the last token, for requests that sample this step
    sample_req_indices: list[int]  # index into req_ids of each sampled request
    query_lens: list[int]


class ModelRunner:
    def __init__(
        self,
        model: LlavaForConditionalGeneration,
        config: ModelConfig,
        *,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        eos_token_ids: list[int] | tuple[int, ...] = (),
        seed: int | None = None,
        num_kv_heads: int | None = None,
        samples: bool = True,
    ) -> None:
        """``num_kv_heads``: the KV heads this rank holds (a tensor-parallel shard); ``samples``:
        False on tensor-parallel ranks other than 0, which compute but leave sampling to rank
        0 and learn its tokens through ``append_sampled``."""
        self.model = model
        self.config = config
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = device
        self.dtype = dtype
        self.eos_token_ids = list(eos_token_ids)
        self.vocab_size = config.text.vocab_size
        self.samples = samples
        text = config.text
        shape = (num_blocks, block_size, num_kv_heads or text.num_kv_heads, text.head_dim)
        self.kv_caches = [(self._zeros(shape), self._zeros(shape)) for _ in range(text.num_layers)]
        self.requests: dict[str, RequestState] = {}
        self.encoder_cache: dict[str, torch.Tensor] = {}
        self.sampler = Sampler()
        self.default_generator = torch.Generator(device=device)
        if seed is not None:
            self.default_generator.manual_seed(seed)

    def _zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.device.type == "cpu":
            return zeros_in_huge_pages(shape, self.dtype)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    # ---- request state ------------------------------------------------------------------

    def update_states(self, out: SchedulerOutput) -> None:
        for req_id in out.finished_req_ids:
            self.requests.pop(req_id, None)
        for identifier in out.free_encoder_identifiers:
            self.encoder_cache.pop(identifier, None)
        for new in out.scheduled_new_reqs:
            self.requests[new.req_id] = self._new_state(new)
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self.requests[req_id]
            if cached.resumed_from_preemption[i]:
                state.block_ids = list(cached.new_block_ids[i])
            else:
                state.block_ids.extend(cached.new_block_ids[i])
            state.num_computed_tokens = cached.num_computed_tokens[i]

    def _new_state(self, new: NewRequestData) -> RequestState:
        seed = getattr(new.sampling_params, "seed", None)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed)
        return RequestState(
            req_id=new.req_id,
            prompt_token_ids=list(new.prompt_token_ids),
            images=list(new.images),
            sampling_params=new.sampling_params,
            block_ids=list(new.block_ids),
            num_computed_tokens=new.num_computed_tokens,
            generator=generator,
        )

    # ---- encoder ------------------------------------------------------------------------

    def run_encoders(self, out: SchedulerOutput) -> None:
        """Encodes the scheduled images (all tiles of all images in one vision batch)."""
        todo: list[ImageFeature] = []
        seen: set[str] = set()
        for req_id, indices in out.scheduled_encoder_inputs.items():
            for index in indices:
                image = self.requests[req_id].images[index]
                if image.identifier not in self.encoder_cache and image.identifier not in seen:
                    seen.add(image.identifier)
                    todo.append(image)
        if not todo:
            return
        pixel_values = torch.cat([img.data.pixel_values for img in todo]).to(
            self.device, self.dtype
        )
        tiles = self.model.encode_tiles(pixel_values)
        start = 0
        for image in todo:
            count = image.data.pixel_values.shape[0]
            own = tiles[start: start + count]
            start += count
            embeds = self.model.pack_image(own, tuple(image.data.image_size), image.data.base_only)
            if embeds.shape[0] != image.length:
                raise RuntimeError(
                    f"image {image.identifier[:12]} encodes to {embeds.shape[0]} embeddings but "
                    f"has {image.length} placeholder tokens"
                )
            self.encoder_cache[image.identifier] = embeds

    # ---- inputs -------------------------------------------------------------------------

    def prepare_inputs(self, out: SchedulerOutput) -> StepInputs:
        req_ids = list(out.num_scheduled_tokens)
        input_ids: list[int] = []
        positions: list[int] = []
        query_lens, seq_lens, tables = [], [], []
        sample_rows, sample_req_indices = [], []
        embed_parts: list[torch.Tensor] = []
        mask_rows: list[int] = []
        for i, req_id in enumerate(req_ids):
            state = self.requests[req_id]
            n = out.num_scheduled_tokens[req_id]
            start, end = state.num_computed_tokens, state.num_computed_tokens + n
            row0 = len(input_ids)
            input_ids.extend(state.token_slice(start, end))
            positions.extend(range(start, end))
            query_lens.append(n)
            seq_lens.append(end)
            tables.append(state.block_ids)
            for image in state.images:
                lo, hi = max(start, image.offset), min(end, image.end)
                if lo < hi:
                    embed_parts.append(
                        self.encoder_cache[image.identifier][lo - image.offset: hi - image.offset]
                    )
                    mask_rows.extend(range(row0 + lo - start, row0 + hi - start))
            if end >= state.num_tokens:
                sample_rows.append(len(input_ids) - 1)
                sample_req_indices.append(i)
        meta = AttentionMetadata.build(query_lens, seq_lens, tables, self.block_size, self.device)
        meta.sliding_window = self.config.text.sliding_window
        image_embeds = image_mask = None
        if embed_parts:
            image_embeds = torch.cat(embed_parts)
            image_mask = torch.zeros(len(input_ids), dtype=torch.bool, device=self.device)
            image_mask[torch.tensor(mask_rows, device=self.device)] = True
        return StepInputs(
            req_ids=req_ids,
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=self.device),
            positions=torch.tensor(positions, dtype=torch.long, device=self.device),
            meta=meta,
            image_embeds=image_embeds,
            image_mask=image_mask,
            sample_rows=sample_rows,
            sample_req_indices=sample_req_indices,
            query_lens=query_lens,
        )

    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """Hidden states of every token of the step, ``[T, hidden]``."""
        return self.model(
            inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta,
            inputs.image_embeds, inputs.image_mask,
        )

    # ---- the step -----------------------------------------------------------------------

    def append_sampled(self, req_ids: list[str], sampled_token_ids: list[list[int]]) -> None:
        """Appends tokens sampled elsewhere (by tensor-parallel rank 0) to known requests."""
        for req_id, tokens in zip(req_ids, sampled_token_ids):
            state = self.requests.get(req_id)
            if state is not None and tokens:
                state.output_token_ids.extend(tokens)

    @torch.inference_mode()
    def execute_model(self, out: SchedulerOutput) -> ModelRunnerOutput | None:
        """One step. None when this runner does not sample (tensor-parallel ranks past 0);
        such a rank still computes every logit row rank 0 gathers."""
        self.update_states(out)
        if not out.num_scheduled_tokens:
            return ModelRunnerOutput([], [], [], []) if self.samples else None
        encoder_start = time.perf_counter()
        if out.scheduled_encoder_inputs:
            self.run_encoders(out)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # so the time is the encoder's own
        encoder_seconds = time.perf_counter() - encoder_start if out.scheduled_encoder_inputs \
            else 0.0
        inputs = self.prepare_inputs(out)
        hidden = self.forward(inputs)
        prompt_logprobs = self._prompt_logprobs(inputs, hidden)
        sampled: list[list[int]] = [[] for _ in inputs.req_ids]
        logprobs: list[list[Logprobs] | None] = [None for _ in inputs.req_ids]
        if inputs.sample_rows:
            states = [self.requests[inputs.req_ids[i]] for i in inputs.sample_req_indices]
            logits = self.model.compute_logits(hidden[inputs.sample_rows])
            if not self.samples:
                return None
            result = self.sampler(logits, self._sampling_metadata(states))
            for i, state, token, lp in zip(
                inputs.sample_req_indices, states, result.token_ids, result.logprobs
            ):
                state.output_token_ids.append(token)
                sampled[i] = [token]
                logprobs[i] = [lp] if lp is not None else None
        if not self.samples:
            return None
        return ModelRunnerOutput(inputs.req_ids, sampled, logprobs, prompt_logprobs,
                                 encoder_seconds)

    def _sampling_metadata(self, states: list[RequestState]) -> SamplingMetadata:
        suppress = []
        for state in states:
            params = state.sampling_params
            if len(state.output_token_ids) < params.min_tokens:
                suppress.append(list(self.eos_token_ids) + list(params.stop_token_ids or []))
            else:
                suppress.append([])
        return SamplingMetadata.build(
            [s.sampling_params for s in states],
            [s.prompt_token_ids for s in states],
            [s.output_token_ids for s in states],
            [s.generator or self.default_generator for s in states],
            suppress,
            self.vocab_size,
            self.device,
        )

    def _prompt_logprobs(
        self, inputs: StepInputs, hidden: torch.Tensor
    ) -> list[list[Logprobs] | None]:
        """Logprobs of each prompt token computed this step under the preceding position
        (the first prompt token has none)."""
        results: list[list[Logprobs] | None] = [None for _ in inputs.req_ids]
        row = 0
        for i, req_id in enumerate(inputs.req_ids):
            n = inputs.query_lens[i]
            state = self.requests[req_id]
            top_n = getattr(state.sampling_params, "prompt_logprobs", None)
            prompt_len = len(state.prompt_token_ids)
            start = state.num_computed_tokens
            if top_n is not None and start < prompt_len:
                # Row of position p predicts prompt token p + 1.
                first = max(start, state.prompt_logprobs_reported - 1)
                last = min(start + n, prompt_len - 1)
                rows = [row + p - start for p in range(first, last)]
                targets = state.prompt_token_ids[first + 1: last + 1]
                # None on tensor-parallel ranks past 0, which only lend their logit shards.
                logits = self.model.compute_logits(hidden[rows]) if rows else None
                results[i] = _logprobs_of(logits.float(), targets, top_n) \
                    if logits is not None else []
                state.prompt_logprobs_reported = max(state.prompt_logprobs_reported, last + 1)
            row += n
        return results


def _logprobs_of(logits: torch.Tensor, targets: list[int], top_n: int) -> list[Logprobs]:
    logprobs = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(targets, device=logits.device)
    chosen = logprobs.gather(1, target[:, None]).squeeze(1)
    ranks = (logprobs > chosen[:, None]).sum(dim=1) + 1
    top_values, top_ids = logprobs.topk(top_n, dim=-1) if top_n else (None, None)
    out = []
    for j, token in enumerate(targets):
        out.append(Logprobs(
            token_id=token,
            logprob=float(chosen[j]),
            rank=int(ranks[j]),
            top_token_ids=top_ids[j].tolist() if top_ids is not None else [],
            top_logprobs=top_values[j].tolist() if top_values is not None else [],
        ))
    return out
