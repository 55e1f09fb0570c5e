"""Batched sampling: one step's logits [R, V] -> one token (and optional logprobs) per request.

Every request keeps its own SamplingParams inside the shared batch. The pipeline, per row::

    logits (any float dtype) -> float32
      |-- raw logprobs = log_softmax(logits)          (only when some request asks for them)
      v
    penalties: repetition (prompt + output), then frequency and presence (output only)
      v
    suppress: ids the runner forbids this step (EOS + stop ids before min_tokens) -> -inf
      v
    greedy rows: argmax (ties -> lowest id)
    sampled rows: / temperature -> top-k -> top-p -> min-p -> softmax -> exponential race

Logprobs are always those of the model's raw distribution (log_softmax of the logits before
penalties, suppression, temperature and truncation), as vLLM's default "raw logprobs".

Sampling is an exponential race: ``argmax(probs / q)`` with ``q ~ Exponential(1)`` i.i.d. per
vocabulary entry, which draws a token with probability ``probs``. A seeded request draws its
``q`` row from its own torch.Generator (created by the runner once per request and kept across
steps), so it produces the same tokens alone or inside any batch; unseeded requests share the
sampler's generator.

``SamplingMetadata.build`` runs once per step and leaves every unused feature as ``None`` (with
a matching fast flag), so an all-greedy batch without penalties or logprobs is one argmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from caldera.scheduler.output import Logprobs, SamplingParams

_NEG_INF = float("-inf")


@dataclass
class SamplingMetadata:
    """Per-step sampling tensors for R requests; a ``None`` tensor means "unused this step".

    Padded id tensors use ``vocab_size`` as the pad id: token counts are scattered into
    ``vocab_size + 1`` bins and the last bin is dropped.
    """

    num_requests: int
    vocab_size: int
    all_greedy: bool
    all_random: bool
    no_penalties: bool
    no_top_k: bool
    no_top_p: bool
    no_min_p: bool
    no_suppress: bool
    no_logprobs: bool
    # [R] bool, True on greedy rows; None when all_greedy or all_random.
    greedy_mask: torch.Tensor | None = None
    # [R] float32, 1.0 on greedy rows; None when all_greedy.
    temperature: torch.Tensor | None = None
    # [R] int64, vocab_size on rows without top-k; max_top_k is the largest k < vocab_size.
    top_k: torch.Tensor | None = None
    max_top_k: int = 0
    # [R] float32 (1.0 / 0.0 on rows without the feature).
    top_p: torch.Tensor | None = None
    min_p: torch.Tensor | None = None
    # [R] float32 penalties (neutral values on rows without them).
    presence_penalties: torch.Tensor | None = None
    frequency_penalties: torch.Tensor | None = None
    repetition_penalties: torch.Tensor | None = None
    # [R, L] int64 padded with vocab_size; rows that need no penalty are all padding.
    prompt_token_ids: torch.Tensor | None = None
    output_token_ids: torch.Tensor | None = None
    # Flat (row, id) pairs whose logits are set to -inf.
    suppress_rows: torch.Tensor | None = None
    suppress_ids: torch.Tensor | None = None
    # Flat (row, id, bias) triples of OpenAI's logit_bias, added to the logits.
    bias_rows: torch.Tensor | None = None
    bias_ids: torch.Tensor | None = None
    bias_values: torch.Tensor | None = None
    # Sampled rows that draw from their own generator, and the rows that share one.
    seeded: tuple[tuple[int, torch.Generator], ...] = ()
    shared_rows: torch.Tensor | None = None
    all_shared: bool = False
    # Per request: how many top logprobs to return (None: no logprobs at all).
    num_logprobs: tuple[int | None, ...] = ()
    max_num_logprobs: int = 0

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        prompt_token_ids: Sequence[Sequence[int]],
        output_token_ids: Sequence[Sequence[int]],
        generators: Sequence[torch.Generator | None],
        suppress_token_ids: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device | str,
    ) -> SamplingMetadata:
        """Gather one step's per-request parameters into batch tensors on ``device``.

        All sequences are index-aligned with ``params``. ``generators[i]`` (on ``device``) is
        request i's own generator, or None to use the sampler's shared one.
        ``suppress_token_ids[i]`` are ids request i must not produce this step. Ids at or beyond
        ``vocab_size`` (never produced by the lm_head) are ignored by penalties and suppression.
        """
        num = len(params)
        lengths = {len(prompt_token_ids), len(output_token_ids), len(generators)}
        if lengths | {len(suppress_token_ids)} != {num}:
            raise ValueError("every per-request sequence must have one entry per request")
        greedy = [p.greedy for p in params]
        no_suppress = not any(suppress_token_ids)
        num_logprobs = tuple(p.logprobs for p in params)
        no_logprobs = all(n is None for n in num_logprobs)
        metadata = cls(
            num_requests=num,
            vocab_size=vocab_size,
            all_greedy=all(greedy),
            all_random=not any(greedy),
            no_penalties=not any(_has_penalty(p) for p in params),
            no_top_k=True,
            no_top_p=True,
            no_min_p=True,
            no_suppress=no_suppress,
            no_logprobs=no_logprobs,
            num_logprobs=num_logprobs,
            max_num_logprobs=max((n or 0) for n in num_logprobs) if num else 0,
        )
        if not metadata.all_greedy:
            metadata._build_random(params, greedy, generators, device)
        if not metadata.no_penalties:
            metadata._build_penalties(params, prompt_token_ids, output_token_ids, device)
        if not no_suppress:
            metadata._build_suppress(suppress_token_ids, device)
        if any(p.logit_bias for p in params):
            metadata._build_bias(params, device)
        return metadata

    def _build_random(
        self,
        params: Sequence[SamplingParams],
        greedy: list[bool],
        generators: Sequence[torch.Generator | None],
        device: torch.device | str,
    ) -> None:
        vocab = self.vocab_size
        # Greedy rows get neutral values: their token is the argmax, taken before these apply.
        temperature = [1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)]
        top_k = [
            vocab if g or p.top_k <= 0 else min(p.top_k, vocab)
            for p, g in zip(params, greedy, strict=True)
        ]
        top_p = [1.0 if g else p.top_p for p, g in zip(params, greedy, strict=True)]
        min_p = [0.0 if g else p.min_p for p, g in zip(params, greedy, strict=True)]
        self.temperature = torch.tensor(temperature, dtype=torch.float32, device=device)
        if not self.all_random:
            self.greedy_mask = torch.tensor(greedy, dtype=torch.bool, device=device)
        enabled_k = [k for k in top_k if k < vocab]
        if enabled_k:
            self.no_top_k = False
            self.top_k = torch.tensor(top_k, dtype=torch.int64, device=device)
            self.max_top_k = max(enabled_k)
        if any(p < 1.0 for p in top_p):
            self.no_top_p = False
            self.top_p = torch.tensor(top_p, dtype=torch.float32, device=device)
        if any(p > 0.0 for p in min_p):
            self.no_min_p = False
            self.min_p = torch.tensor(min_p, dtype=torch.float32, device=device)
        seeded, shared = [], []
        for row, (is_greedy, generator) in enumerate(zip(greedy, generators, strict=True)):
            if is_greedy:
                continue
            if generator is None:
                shared.append(row)
            else:
                seeded.append((row, generator))
        self.seeded = tuple(seeded)
        self.all_shared = len(shared) == self.num_requests
        if shared:
            self.shared_rows = torch.tensor(shared, dtype=torch.int64, device=device)

    def _build_penalties(
        self,
        params: Sequence[SamplingParams],
        prompt_token_ids: Sequence[Sequence[int]],
        output_token_ids: Sequence[Sequence[int]],
        device: torch.device | str,
    ) -> None:
        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        repetition = [p.repetition_penalty for p in params]
        frequency = [p.frequency_penalty for p in params]
        presence = [p.presence_penalty for p in params]
        if any(v != 1.0 for v in repetition):
            self.repetition_penalties = column(repetition)
            prompts = [
                ids if rep != 1.0 else ()
                for ids, rep in zip(prompt_token_ids, repetition, strict=True)
            ]
            self.prompt_token_ids = _pad_ids(prompts, self.vocab_size, device)
        if any(v != 0.0 for v in frequency):
            self.frequency_penalties = column(frequency)
        if any(v != 0.0 for v in presence):
            self.presence_penalties = column(presence)
        outputs = [
            ids if _has_penalty(p) else () for ids, p in zip(output_token_ids, params, strict=True)
        ]
        self.output_token_ids = _pad_ids(outputs, self.vocab_size, device)

    def _build_suppress(
        self, suppress_token_ids: Sequence[Sequence[int]], device: torch.device | str
    ) -> None:
        pairs = [
            (row, tid)
            for row, ids in enumerate(suppress_token_ids)
            for tid in ids
            if 0 <= tid < self.vocab_size
        ]
        if not pairs:
            self.no_suppress = True
            return
        flat = torch.tensor(pairs, dtype=torch.int64, device=device)
        self.suppress_rows, self.suppress_ids = flat[:, 0], flat[:, 1]


    def _build_bias(self, params: Sequence[SamplingParams], device: torch.device | str) -> None:
        triples = [
            (row, tid, value)
            for row, p in enumerate(params)
            for tid, value in (p.logit_bias or {}).items()
            if 0 <= tid < self.vocab_size
        ]
        if not triples:
            return
        self.bias_rows = torch.tensor([t[0] for t in triples], dtype=torch.int64, device=device)
        self.bias_ids = torch.tensor([t[1] for t in triples], dtype=torch.int64, device=device)
        self.bias_values = torch.tensor([t[2] for t in triples], dtype=torch.float32,
                                        device=device)


def _has_penalty(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0
        or params.frequency_penalty != 0.0
        or params.presence_penalty != 0.0
    )


def _pad_ids(
    rows: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str
) -> torch.Tensor:
    """[R, max_len] int64 of ``rows`` padded (and out-of-vocab ids clamped) to ``vocab_size``."""
    width = max(1, max(len(ids) for ids in rows))
    padded = np.full((len(rows), width), vocab_size, dtype=np.int64)
    for row, ids in enumerate(rows):
        if len(ids):
            padded[row, : len(ids)] = ids
    np.clip(padded, 0, vocab_size, out=padded)
    return torch.from_numpy(padded).to(device)


def _token_counts(padded_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, V] float32: how often each id occurs in each row of a padded id tensor."""
    bins = torch.zeros(
        (padded_ids.shape[0], vocab_size + 1), dtype=torch.float32, device=padded_ids.device
    )
    bins.scatter_add_(1, padded_ids, torch.ones_like(padded_ids, dtype=torch.float32))
    return bins[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """Apply repetition, then frequency and presence penalties to float32 ``logits`` in place.

    Repetition (as transformers' RepetitionPenaltyLogitsProcessor and vLLM): every id seen in the
    prompt or the output has its logit divided by the penalty when positive, multiplied when
    negative. Frequency and presence (OpenAI's definition), over output ids only:
    ``logit -= frequency_penalty * count + presence_penalty * (count > 0)``.
    """
    if metadata.no_penalties:
        return logits
    assert metadata.output_token_ids is not None
    counts = _token_counts(metadata.output_token_ids, metadata.vocab_size)
    if metadata.repetition_penalties is not None:
        assert metadata.prompt_token_ids is not None
        seen = (counts > 0) | (_token_counts(metadata.prompt_token_ids, metadata.vocab_size) > 0)
        penalty = metadata.repetition_penalties.unsqueeze(1)
        penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
        logits.copy_(torch.where(seen, penalised, logits))
    if metadata.frequency_penalties is not None:
        logits.sub_(metadata.frequency_penalties.unsqueeze(1) * counts)
    if metadata.presence_penalties is not None:
        logits.sub_(metadata.presence_penalties.unsqueeze(1) * (counts > 0))
    return logits


def apply_logit_bias(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """Add each request's logit_bias to its row, in place (after penalties, as vLLM)."""
    if metadata.bias_rows is not None:
        logits.index_put_((metadata.bias_rows, metadata.bias_ids), metadata.bias_values,
                          accumulate=True)
    return logits


def apply_suppression(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """Set the logits of this step's suppressed (row, id) pairs to -inf, in place."""
    if metadata.suppress_rows is not None:
        logits.index_put_(
            (metadata.suppress_rows, metadata.suppress_ids),
            torch.tensor(_NEG_INF, dtype=logits.dtype, device=logits.device),
        )
    return logits


def apply_top_k_top_p(
    logits: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    max_top_k: int,
) -> torch.Tensor:
    """Mask (to -inf, in place) the logits outside each row's top-k and top-p sets.

    Top-k keeps every id whose logit is at least the k-th largest (ties at the boundary are
    kept). Top-p then keeps the smallest set of most likely ids whose probability, renormalised
    after top-k, sums to at least p; the most likely id is always kept.
    """
    if top_p is None:
        if top_k is None:
            return logits
        # Top-k alone: a partial top-k up to the largest k is cheaper than a full sort.
        values = logits.topk(max_top_k, dim=-1).values
        kth = values.gather(1, (top_k.clamp(max=max_top_k) - 1).unsqueeze(1))
        kth.masked_fill_((top_k >= logits.shape[-1]).unsqueeze(1), _NEG_INF)
        return logits.masked_fill_(logits < kth, _NEG_INF)
    sorted_logits, order = logits.sort(dim=-1)  # ascending
    if top_k is not None:
        kth = sorted_logits.gather(1, (logits.shape[-1] - top_k).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < kth, _NEG_INF)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # Drop an id when the ids less likely than it, itself included, carry at most 1 - p.
    drop = cumulative <= (1.0 - top_p).unsqueeze(1)
    drop[:, -1] = False
    sorted_logits.masked_fill_(drop, _NEG_INF)
    return logits.scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask (in place) ids whose probability is below ``min_p`` times the row's largest."""
    probs = logits.softmax(dim=-1)
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill_(probs < threshold, _NEG_INF)


@dataclass
class SamplerOutput:
    """One sampled token per request, and its logprobs where the request asked for them."""

    token_ids: list[int]
    logprobs: list[Logprobs | None]


class Sampler:
    """Samples one token per row of a logits batch, each row with its own parameters.

    ``generator`` is the shared generator for sampled requests without their own (None: torch's
    default generator for the logits' device).
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        """Sample from ``logits`` [R, V] (any float dtype; computed in float32)."""
        assert logits.dim() == 2 and logits.shape[0] == metadata.num_requests, (
            f"logits must be [{metadata.num_requests}, V], got {tuple(logits.shape)}"
        )
        md = metadata
        if (md.all_greedy and md.no_penalties and md.no_suppress and md.no_logprobs
                and md.bias_rows is None):
            # The common case: float32 conversion preserves order, so argmax the raw logits.
            return SamplerOutput(logits.argmax(dim=-1).tolist(), [None] * md.num_requests)
        raw_logprobs = None
        if not md.no_logprobs:
            raw_logprobs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
        work = logits.to(torch.float32, copy=True)
        apply_suppression(apply_logit_bias(apply_penalties(work, md), md), md)
        if md.all_greedy:
            sampled = work.argmax(dim=-1)
        elif md.all_random:
            sampled = self._sample(work, md)
        else:
            assert md.greedy_mask is not None
            greedy = work.argmax(dim=-1)
            sampled = torch.where(md.greedy_mask, greedy, self._sample(work, md))
        token_ids = sampled.tolist()
        logprobs: list[Logprobs | None] = [None] * md.num_requests
        if raw_logprobs is not None:
            logprobs = _gather_logprobs(raw_logprobs, sampled, token_ids, md)
        return SamplerOutput(token_ids, logprobs)

    def _sample(self, logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        """Temperature, truncation and an exponential race over ``logits`` (modified in place)."""
        assert md.temperature is not None
        logits.div_(md.temperature.unsqueeze(1))
        apply_top_k_top_p(logits, md.top_k, md.top_p, md.max_top_k)
        if md.min_p is not None:
            apply_min_p(logits, md.min_p)
        probs = logits.softmax(dim=-1)
        return probs.div_(self._exponentials(probs, md)).argmax(dim=-1)

    def _exponentials(self, probs: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        """[R, V] Exponential(1) draws: a seeded row from its own generator, others shared."""
        q = torch.empty_like(probs)
        if md.all_shared:
            q.exponential_(generator=self.generator)
        else:
            q.fill_(1.0)  # greedy rows: any positive value, their sample is discarded
            if md.shared_rows is not None:
                shared = torch.empty(
                    (md.shared_rows.numel(), probs.shape[1]), dtype=q.dtype, device=q.device
                )
                q[md.shared_rows] = shared.exponential_(generator=self.generator)
            for row, generator in md.seeded:
                q[row].exponential_(generator=generator)
        # exponential_ may return exactly 0; a tiny floor keeps probs / q finite.
        return q.clamp_min_(torch.finfo(q.dtype).tiny)


def _gather_logprobs(
    raw_logprobs: torch.Tensor, sampled: torch.Tensor, token_ids: list[int], md: SamplingMetadata
) -> list[Logprobs | None]:
    """Sampled-token logprob, rank (1 + ids strictly more likely) and top-N, per asking row."""
    token_logprobs = raw_logprobs.gather(1, sampled.unsqueeze(1))
    ranks = (raw_logprobs > token_logprobs).sum(dim=-1).add_(1)
    top_n = md.max_num_logprobs
    top_values, top_ids = raw_logprobs.topk(top_n, dim=-1) if top_n else (None, None)
    token_lp = token_logprobs.squeeze(1).tolist()
    rank_list = ranks.tolist()
    top_value_list = top_values.tolist() if top_values is not None else None
    top_id_list = top_ids.tolist() if top_ids is not None else None
    out: list[Logprobs | None] = []
    for row, n in enumerate(md.num_logprobs):
        if n is None:
            out.append(None)
            continue
        out.append(
            Logprobs(
                token_id=token_ids[row],
                logprob=token_lp[row],
                rank=rank_list[row],
                top_token_ids=top_id_list[row][:n] if top_id_list and n else [],
                top_logprobs=top_value_list[row][:n] if top_value_list and n else [],
            )
        )
    return out
