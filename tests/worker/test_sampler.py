"""The batched sampler: per-request parameters, seeded reproducibility, penalties, logprobs."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from caldera.engine.sampling_params import SamplingParams
from caldera.worker.sampler import Sampler, SamplingMetadata, apply_penalties

VOCAB = 40


def build(
    params: list[SamplingParams],
    *,
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
    generators: list[torch.Generator | None] | None = None,
    suppress: list[list[int]] | None = None,
    vocab: int = VOCAB,
) -> SamplingMetadata:
    rows = len(params)
    return SamplingMetadata.build(
        params,
        prompts if prompts is not None else [[] for _ in range(rows)],
        outputs if outputs is not None else [[] for _ in range(rows)],
        generators if generators is not None else [None] * rows,
        suppress if suppress is not None else [[] for _ in range(rows)],
        vocab,
        "cpu",
    )


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_logits(rows: int, vocab: int = VOCAB, seed: int = 0, scale: float = 2.0):
    return torch.randn(rows, vocab, generator=seeded(seed)) * scale


def sample_many(logits_row: torch.Tensor, params: SamplingParams, draws: int) -> Counter:
    """Draw ``draws`` tokens for one request by repeating its row in one batch."""
    logits = logits_row.unsqueeze(0).repeat(draws, 1)
    out = Sampler(seeded(7))(logits, build([params] * draws, vocab=logits.shape[1]))
    return Counter(out.token_ids)


# Greedy ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax_in_any_dtype(dtype: torch.dtype) -> None:
    logits = random_logits(6).to(dtype)
    out = Sampler()(logits, build([SamplingParams(temperature=0.0)] * 6))
    assert out.token_ids == logits.float().argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 6


def test_greedy_ties_go_to_the_lowest_id() -> None:
    logits = torch.zeros(2, VOCAB)
    logits[0, [5, 9, 30]] = 3.0
    logits[1, [2, 3]] = 1.0
    metadata = build([SamplingParams(temperature=0.0, repetition_penalty=1.0)] * 2)
    assert Sampler()(logits, metadata).token_ids == [5, 2]


def test_all_greedy_batch_builds_no_tensors() -> None:
    metadata = build([SamplingParams(temperature=0.0)] * 3)
    assert metadata.all_greedy and metadata.no_penalties and metadata.no_suppress
    assert metadata.no_top_k and metadata.no_top_p and metadata.no_min_p and metadata.no_logprobs
    tensors = [
        metadata.temperature,
        metadata.greedy_mask,
        metadata.top_k,
        metadata.top_p,
        metadata.min_p,
        metadata.output_token_ids,
        metadata.prompt_token_ids,
        metadata.suppress_rows,
        metadata.shared_rows,
    ]
    assert all(t is None for t in tensors)


def test_mismatched_per_request_lists_are_rejected() -> None:
    with pytest.raises(ValueError, match="one entry per request"):
        SamplingMetadata.build(
            [SamplingParams()] * 2, [[]], [[], []], [None] * 2, [[]] * 2, 8, "cpu"
        )


# Seeded requests --------------------------------------------------------------------------------


def run_seeded(seed: int, steps_logits: list[torch.Tensor], batch_of: list[int]) -> list[int]:
    """Decode one seeded request over several steps, placed among ``batch_of[step]`` others."""
    params = SamplingParams(temperature=0.9, top_k=25, top_p=0.95, seed=seed)
    generator = seeded(seed)
    others = [
        (SamplingParams(temperature=1.0), None),
        (SamplingParams(temperature=0.0), None),
        (SamplingParams(temperature=0.7, min_p=0.05, seed=99), seeded(99)),
        (SamplingParams(temperature=1.3, top_k=3), None),
    ]
    shared = Sampler(seeded(1))
    tokens = []
    for step, row_logits in enumerate(steps_logits):
        count = batch_of[step]
        position = step % (count + 1)
        batch = [others[(step + i) % len(others)] for i in range(count)]
        batch.insert(position, (params, generator))
        logits = random_logits(count + 1, seed=100 + step)
        logits[position] = row_logits
        metadata = build([p for p, _ in batch], generators=[g for _, g in batch])
        tokens.append(shared(logits, metadata).token_ids[position])
    return tokens


def test_seeded_request_repeats_and_ignores_the_rest_of_the_batch() -> None:
    steps = [random_logits(1, seed=s, scale=0.5)[0] for s in range(24)]
    alone = run_seeded(1234, steps, [0] * 24)
    assert run_seeded(1234, steps, [0] * 24) == alone
    assert run_seeded(1234, steps, [3] * 24) == alone
    assert run_seeded(1234, steps, [(s * 5) % 7 for s in range(24)]) == alone
    assert run_seeded(4321, steps, [0] * 24) != alone


def test_unseeded_requests_follow_the_shared_generator() -> None:
    logits = random_logits(8, scale=0.3)
    metadata = build([SamplingParams(temperature=1.0)] * 8)
    first = Sampler(seeded(5))(logits, metadata).token_ids
    assert Sampler(seeded(5))(logits, metadata).token_ids == first
    assert metadata.all_shared and metadata.seeded == ()


# Distributions and truncation ----------------------------------------------------------------


def test_sampled_frequencies_match_softmax_over_temperature() -> None:
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0])
    counts = sample_many(logits, SamplingParams(temperature=2.0), 20000)
    expected = torch.softmax(logits / 2.0, dim=-1)
    for token in range(4):
        assert abs(counts[token] / 20000 - expected[token].item()) < 0.015


def test_per_request_generators_sample_the_right_distribution() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0]]).repeat(3000, 1)
    params = [SamplingParams(temperature=1.0, seed=i) for i in range(3000)]
    generators = [seeded(i) for i in range(3000)]
    out = Sampler()(logits, build(params, generators=generators, vocab=3))
    counts = Counter(out.token_ids)
    expected = torch.softmax(logits[0], dim=-1)
    for token in range(3):
        assert abs(counts[token] / 3000 - expected[token].item()) < 0.03


def top_p_set(probs: list[float], top_p: float) -> set[int]:
    """The smallest set of most likely ids with total probability >= top_p (plain Python)."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, total = set(), 0.0
    for token in order:
        kept.add(token)
        total += probs[token]
        if total >= top_p:
            break
    return kept


def test_top_k_rows_with_different_k_stay_in_their_sets() -> None:
    logits = random_logits(3, scale=1.0)
    ks = [1, 4, 12]
    draws = 400
    batch = logits.repeat_interleave(draws, dim=0)
    params = [SamplingParams(temperature=1.5, top_k=k) for k in ks for _ in range(draws)]
    tokens = Sampler(seeded(3))(batch, build(params)).token_ids
    for row, k in enumerate(ks):
        allowed = set(logits[row].topk(k).indices.tolist())
        got = set(tokens[row * draws : (row + 1) * draws])
        assert got == allowed  # nothing outside, and every member is reachable


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.9])
def test_top_p_never_samples_outside_the_nucleus(top_p: float) -> None:
    logits = random_logits(1, scale=1.5, seed=11)[0]
    probs = torch.softmax(logits.double(), dim=-1).tolist()
    allowed = top_p_set(probs, top_p)
    counts = sample_many(logits, SamplingParams(top_p=top_p), 3000)
    assert set(counts) <= allowed
    assert len(set(counts)) >= len(allowed) - 1  # the least likely member may be rare


def test_top_k_then_top_p_renormalises_over_the_top_k() -> None:
    logits = random_logits(1, scale=1.5, seed=12)[0]
    top = logits.topk(6).indices.tolist()
    probs = torch.softmax(logits[top].double(), dim=-1).tolist()
    allowed = {top[i] for i in top_p_set(probs, 0.8)}
    counts = sample_many(logits, SamplingParams(top_k=6, top_p=0.8), 3000)
    assert set(counts) <= allowed


def test_min_p_drops_ids_below_the_scaled_maximum() -> None:
    logits = random_logits(1, scale=1.5, seed=13)[0]
    probs = torch.softmax(logits.double(), dim=-1)
    allowed = set(torch.nonzero(probs >= 0.2 * probs.max()).flatten().tolist())
    counts = sample_many(logits, SamplingParams(min_p=0.2), 3000)
    assert set(counts) <= allowed
    assert len(allowed) > 1


# Penalties -------------------------------------------------------------------------------------


def expected_penalised(
    logits: list[float], params: SamplingParams, prompt: list[int], output: list[int]
) -> list[float]:
    """The specification in plain Python: repetition, then frequency and presence."""
    counts = Counter(output)
    seen = set(prompt) | set(output)
    result = []
    for token, value in enumerate(logits):
        if token in seen:
            penalty = params.repetition_penalty
            value = value * penalty if value < 0 else value / penalty
        count = counts[token]
        value -= params.frequency_penalty * count + params.presence_penalty * (count > 0)
        result.append(value)
    return result


PENALTY_CASES = [
    SamplingParams(repetition_penalty=1.3),
    SamplingParams(frequency_penalty=0.7),
    SamplingParams(presence_penalty=-1.2),
    SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.4, presence_penalty=1.5),
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.0, repetition_penalty=2.0, presence_penalty=0.5),
]


def test_penalties_change_logits_exactly_as_specified() -> None:
    logits = random_logits(len(PENALTY_CASES), seed=21)
    gen = seeded(22)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (7, 0, 3, 9, 5, 4)]
    outputs = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (5, 12, 8, 0, 6, 3)]
    metadata = build(PENALTY_CASES, prompts=prompts, outputs=outputs)
    assert not metadata.no_penalties
    got = apply_penalties(logits.clone(), metadata)
    for row, params in enumerate(PENALTY_CASES):
        want = expected_penalised(logits[row].tolist(), params, prompts[row], outputs[row])
        torch.testing.assert_close(got[row], torch.tensor(want), rtol=1e-6, atol=1e-6)


def test_out_of_vocab_ids_are_not_penalised() -> None:
    logits = random_logits(1, seed=23)
    params = [SamplingParams(repetition_penalty=1.5, frequency_penalty=1.0)]
    metadata = build(params, prompts=[[VOCAB + 3]], outputs=[[VOCAB, 2]])
    got = apply_penalties(logits.clone(), metadata)
    want = expected_penalised(logits[0].tolist(), params[0], [], [2])
    torch.testing.assert_close(got[0], torch.tensor(want))


def test_repetition_penalty_equals_transformers_processor() -> None:
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    penalties = [1.3, 0.7, 1.0, 2.5]
    logits = random_logits(4, seed=31)
    gen = seeded(32)
    prompts = [torch.randint(0, VOCAB, (6,), generator=gen).tolist() for _ in penalties]
    outputs = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (4, 0, 2, 9)]
    params = [SamplingParams(repetition_penalty=p) for p in penalties]
    got = apply_penalties(logits.clone(), build(params, prompts=prompts, outputs=outputs))
    for row, penalty in enumerate(penalties):
        input_ids = torch.tensor([prompts[row] + outputs[row]])
        want = RepetitionPenaltyLogitsProcessor(penalty)(input_ids, logits[row : row + 1].clone())
        assert torch.equal(got[row], want[0])


def test_greedy_with_repetition_penalty_matches_transformers_generate() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=48,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    prompt = [3, 17, 17, 5, 40, 9]
    with torch.no_grad():
        result = model.generate(
            torch.tensor([prompt]),
            do_sample=False,
            repetition_penalty=1.4,
            max_new_tokens=12,
            eos_token_id=None,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
        )
    reference = result.sequences[0, len(prompt) :].tolist()
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.4)]
    ours: list[int] = []
    for step_logits in result.logits:  # the raw logits generate saw at each step
        metadata = build(params, prompts=[prompt], outputs=[list(ours)], vocab=48)
        ours.extend(Sampler()(step_logits, metadata).token_ids)
    assert ours == reference


# Suppression ------------------------------------------------------------------------------------


def test_suppressed_ids_are_never_sampled() -> None:
    logits = random_logits(1, scale=1.0, seed=41)[0]
    banned = logits.topk(3).indices.tolist() + [VOCAB + 5]  # out-of-vocab ids are ignored
    draws = 2000
    params = [SamplingParams(temperature=0.0)] + [SamplingParams(temperature=2.0)] * draws
    batch = logits.unsqueeze(0).repeat(draws + 1, 1)
    metadata = build(params, suppress=[banned] * (draws + 1))
    tokens = Sampler(seeded(4))(batch, metadata).token_ids
    assert tokens[0] == logits.topk(4).indices[3].item()
    assert not set(tokens) & set(banned)


# Logprobs ---------------------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax_with_ranks_and_top_n() -> None:
    logits = random_logits(4, seed=51).to(torch.bfloat16)
    params = [
        SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=1.5),
        SamplingParams(temperature=0.8, top_k=5, logprobs=0, frequency_penalty=1.0),
        SamplingParams(temperature=1.2, logprobs=5, seed=3),
        SamplingParams(temperature=1.0),
    ]
    metadata = build(
        params,
        prompts=[[1, 2], [3], [4], [5]],
        outputs=[[6], [7, 7], [8], [9]],
        generators=[None, None, seeded(3), None],
        suppress=[[], [0], [], []],
    )
    out = Sampler(seeded(0))(logits, metadata)
    raw = torch.log_softmax(logits.float(), dim=-1)
    assert out.logprobs[3] is None
    for row, n in [(0, 3), (1, 0), (2, 5)]:
        entry = out.logprobs[row]
        token = out.token_ids[row]
        assert entry is not None and entry.token_id == token
        assert math.isclose(entry.logprob, raw[row, token].item(), rel_tol=1e-6)
        assert entry.rank == 1 + int((raw[row] > raw[row, token]).sum())
        assert entry.top_token_ids == raw[row].topk(n).indices.tolist()
        assert len(entry.top_logprobs) == n
        torch.testing.assert_close(torch.tensor(entry.top_logprobs), raw[row].topk(n).values)


def test_greedy_token_has_rank_one_without_penalties() -> None:
    logits = random_logits(3, seed=52)
    out = Sampler()(logits, build([SamplingParams(temperature=0.0, logprobs=2)] * 3))
    assert [lp.rank for lp in out.logprobs] == [1, 1, 1]
    assert [lp.top_token_ids[0] for lp in out.logprobs] == out.token_ids


# Mixed batches ----------------------------------------------------------------------------------


def test_mixed_batch_gives_each_request_its_own_semantics() -> None:
    logits = random_logits(5, seed=61, scale=1.0)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, presence_penalty=2.0),
        SamplingParams(temperature=1.0, top_k=2, seed=8),
        SamplingParams(temperature=0.5, min_p=0.5),
        SamplingParams(temperature=1.0, top_p=0.5),
    ]
    outputs = [[], [int(logits[1].argmax())], [], [], []]
    generators = [None, None, seeded(8), None, None]
    metadata = build(params, outputs=outputs, generators=generators)
    assert not (metadata.all_greedy or metadata.all_random or metadata.no_penalties)
    assert not (metadata.no_top_k or metadata.no_top_p or metadata.no_min_p)
    tokens = Sampler(seeded(9))(logits, metadata).token_ids

    assert tokens[0] == int(logits[0].argmax())
    penalised = logits[1].clone()
    penalised[outputs[1][0]] -= 2.0
    assert tokens[1] == int(penalised.argmax())
    assert tokens[2] in logits[2].topk(2).indices.tolist()
    probs = torch.softmax(logits[3] / 0.5, dim=-1)
    assert probs[tokens[3]] >= 0.5 * probs.max()
    assert tokens[4] in top_p_set(torch.softmax(logits[4].double(), -1).tolist(), 0.5)

    alone = Sampler()(logits[2:3], build([params[2]], generators=[seeded(8)])).token_ids
    assert alone == [tokens[2]]
