"""Front-end side of each request's output: incremental detokenization, stop strings, logprob
formatting, metrics, and fan-in of ``n > 1`` child requests into one RequestOutput."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from caldera.engine.detokenizer import IncrementalDetokenizer
from caldera.engine.messages import EngineCoreOutput
from caldera.engine.outputs import (
    CompletionOutput,
    Logprob,
    PromptLogprobs,
    RequestMetrics,
    RequestOutput,
)
from caldera.engine.sampling_params import SamplingParams
from caldera.engine.tokenizer import Tokenizer
from caldera.scheduler.output import Logprobs


@dataclass
class _Child:
    """One sequence of a request (``n`` of them when n > 1)."""

    index: int
    detokenizer: IncrementalDetokenizer
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text_delta: str = ""


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: dict[str, _Child]
    metrics: RequestMetrics
    prompt_logprobs: PromptLogprobs | None = None
    num_cached_tokens: int = 0
    error: str | None = None

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.children.values())


@dataclass
class ProcessedOutputs:
    request_outputs: list[RequestOutput]
    # Children finished by a stop string here: the engine core must abort them.
    reqs_to_abort: list[str]


def child_request_id(request_id: str, index: int, n: int) -> str:
    return request_id if n == 1 else f"{request_id}#{index}"


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, _Parent] = {}
        self.child_to_parent: dict[str, str] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float) -> list[str]:
        """Registers a request; returns the ids of its children (one per sequence)."""
        children = {}
        for index in range(params.n):
            child_id = child_request_id(request_id, index, params.n)
            children[child_id] = _Child(
                index=index,
                detokenizer=IncrementalDetokenizer(
                    self.tokenizer, prompt_token_ids,
                    skip_special_tokens=params.skip_special_tokens, stop=params.stop,
                ),
                params=params,
                logprobs=[] if params.logprobs is not None else None,
                cumulative_logprob=0.0 if params.logprobs is not None else None,
            )
            self.child_to_parent[child_id] = request_id
        self.parents[request_id] = _Parent(
            request_id, prompt, list(prompt_token_ids), children, RequestMetrics(arrival_time),
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
        )
        return list(children)

    def has_unfinished_requests(self) -> bool:
        return bool(self.parents)

    def abort_request(self, request_id: str) -> list[str]:
        """Forgets a request; returns its children's ids to abort in the core."""
        parent = self.parents.pop(request_id, None)
        if parent is None:
            return []
        for child_id in parent.children:
            self.child_to_parent.pop(child_id, None)
        return list(parent.children)

    def process_outputs(self, outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        now = time.monotonic()
        touched: dict[str, _Parent] = {}
        to_abort: list[str] = []
        for out in outputs:
            parent_id = self.child_to_parent.get(out.request_id)
            if parent_id is None:
                continue  # aborted by the front end meanwhile
            parent = self.parents[parent_id]
            child = parent.children[out.request_id]
            if child.finish_reason is not None:
                continue  # finished by a stop string; the core's abort is on its way
            if self._update_child(parent, child, out, now):
                to_abort.append(out.request_id)
            touched[parent_id] = parent
        results = []
        for parent in touched.values():
            results.append(self._make_output(parent))
            if parent.finished:
                parent.metrics.finished_time = now
                self.abort_request(parent.request_id)
        return ProcessedOutputs(results, to_abort)

    def _update_child(self, parent: _Parent, child: _Child, out: EngineCoreOutput,
                      now: float) -> bool:
        """Applies one core output; True when a stop string finished the child here."""
        if out.prompt_logprobs and parent.prompt_logprobs is not None and child.index == 0:
            parent.prompt_logprobs.extend(self._format(lp) for lp in out.prompt_logprobs)
        parent.num_cached_tokens = max(parent.num_cached_tokens, out.num_cached_tokens)
        if out.first_scheduled_time is not None and parent.metrics.first_scheduled_time is None:
            parent.metrics.first_scheduled_time = out.first_scheduled_time
        if out.new_token_ids and parent.metrics.first_token_time is None:
            parent.metrics.first_token_time = now
        child.token_ids.extend(out.new_token_ids)
        parent.metrics.num_generated_tokens += len(out.new_token_ids)
        if out.new_logprobs and child.logprobs is not None:
            for lp in out.new_logprobs:
                child.logprobs.append(self._format(lp))
                child.cumulative_logprob += lp.logprob
        child.text_delta = child.detokenizer.update(out.new_token_ids)
        stopped_by_string = False
        if child.detokenizer.finished_by_stop is not None and child.finish_reason is None:
            child.finish_reason, child.stop_reason = "stop", child.detokenizer.finished_by_stop
            stopped_by_string = out.finish_reason is None
        elif out.finish_reason is not None:
            child.finish_reason, child.stop_reason = out.finish_reason, out.stop_reason
            if out.error is not None:
                parent.error = out.error
            child.text_delta += child.detokenizer.flush()
        return stopped_by_string

    def _format(self, lp: Logprobs) -> dict[int, Logprob]:
        entry = {
            token: Logprob(value, rank, self.tokenizer.decode([token]))
            for rank, (token, value) in enumerate(zip(lp.top_token_ids, lp.top_logprobs), 1)
        }
        entry[lp.token_id] = Logprob(lp.logprob, lp.rank, self.tokenizer.decode([lp.token_id]))
        return entry

    def _make_output(self, parent: _Parent) -> RequestOutput:
        outputs = [
            CompletionOutput(
                index=c.index,
                text=c.detokenizer.output_text,
                token_ids=list(c.token_ids),
                cumulative_logprob=c.cumulative_logprob,
                logprobs=c.logprobs,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
                text_delta=c.text_delta,
            )
            for c in parent.children.values()
        ]
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            prompt_logprobs=parent.prompt_logprobs,
            outputs=outputs,
            finished=parent.finished,
            metrics=parent.metrics,
            num_cached_tokens=parent.num_cached_tokens,
            error=parent.error,
        )
