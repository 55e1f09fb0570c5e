"""Request bodies -> engine inputs: the model name, what Caldera refuses, SamplingParams.

Every refusal names the field and says what to send instead; nothing a client sends is ignored
silently when it would change the answer."""

from __future__ import annotations

from collections.abc import Sequence

from caldera.api.errors import APIError, bad_request
from caldera.api.protocol import ChatCompletionRequest, CompletionRequest, _SamplingFields
from caldera.engine.sampling_params import SamplingParams

MAX_N = 16
MAX_TOP_LOGPROBS = 20


def check_model(name: str | None, served: Sequence[str]) -> str:
    """The name to answer with; ``default`` (the seed's examples) and no name mean the first."""
    if name is None or name == "default" or name == "":
        return served[0]
    if name in served:
        return name
    listed = ", ".join(repr(s) for s in served)
    raise APIError(404, f"the model {name!r} does not exist; this server serves {listed} "
                        "(or use 'default')", param="model", code="model_not_found")


def _refuse(field: str, what: str) -> APIError:
    return bad_request(f"{field} is not supported by this server: {what}", param=field,
                       code="unsupported_parameter")


def check_chat_unsupported(req: ChatCompletionRequest) -> None:
    if req.tools:
        raise _refuse("tools", "Caldera does not do tool calling; send the request without "
                               "tools")
    if req.functions:
        raise _refuse("functions", "Caldera does not do function calling")
    if req.function_call not in (None, "none"):
        raise _refuse("function_call", "Caldera does not do function calling")
    if req.tool_choice not in (None, "none"):
        raise _refuse("tool_choice", "Caldera does not do tool calling; omit tool_choice or "
                                     "send 'none'")
    if req.response_format is not None and req.response_format.type != "text":
        raise _refuse("response_format", f"only {{'type': 'text'}} is served, not "
                                         f"{req.response_format.type!r}")
    if req.audio is not None or (req.modalities and req.modalities != ["text"]):
        raise _refuse("modalities", "only text output is generated; omit audio/modalities "
                                    "or send ['text']")
    for field in ("prediction", "web_search_options", "reasoning_effort", "verbosity"):
        if getattr(req, field) is not None:
            raise _refuse(field, "omit it")
    if req.store:
        raise _refuse("store", "completions are not stored; omit store or send false")
    if req.service_tier not in (None, "auto", "default"):
        raise _refuse("service_tier", "there is one tier; omit it or send 'auto'")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream: true",
                          param="stream_options")


def check_completion_unsupported(req: CompletionRequest) -> None:
    if req.suffix:
        raise _refuse("suffix", "insertion (suffix) is not supported; omit suffix")
    if req.best_of not in (None, 1, req.n):
        raise _refuse("best_of", "best_of must equal n (Caldera returns every sequence)")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream: true",
                          param="stream_options")


def _logit_bias(raw: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    if not raw:
        return None
    bias: dict[int, float] = {}
    for key, value in raw.items():
        try:
            token = int(key)
        except ValueError:
            raise bad_request(f"logit_bias keys are token ids as strings; {key!r} is not",
                              param="logit_bias") from None
        if not 0 <= token < vocab_size:
            raise bad_request(f"logit_bias token id {token} is outside the vocabulary "
                              f"(0..{vocab_size - 1})", param="logit_bias")
        if not -100 <= value <= 100:
            raise bad_request(f"logit_bias values must be in [-100, 100], got {value}",
                              param="logit_bias")
        bias[token] = float(value)
    return bias


def sampling_params(req: _SamplingFields, *, max_tokens: int | None, logprobs: int | None,
                    prompt_logprobs: int | None, vocab_size: int) -> SamplingParams:
    """OpenAI's fields -> SamplingParams, ranges checked with the field's name."""
    if not 1 <= req.n <= MAX_N:
        raise bad_request(f"n must be between 1 and {MAX_N}, got {req.n}", param="n")
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise bad_request(f"top_logprobs/logprobs must be between 0 and {MAX_TOP_LOGPROBS}, "
                          f"got {logprobs}", param="logprobs")
    if req.seed is not None and not -(2**63) <= req.seed < 2**63:
        raise bad_request("seed must fit in a 64-bit integer", param="seed")
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    if stop is not None and (len(stop) > 16 or any(not s for s in stop)):
        raise bad_request("stop takes up to 16 non-empty strings", param="stop")
    for token in req.stop_token_ids or ():
        if not 0 <= token < vocab_size:
            raise bad_request(f"stop_token_ids has {token}, outside the vocabulary",
                              param="stop_token_ids")
    if req.temperature is not None and req.temperature > 2.0:
        raise bad_request(f"temperature must be in [0, 2], got {req.temperature}",
                          param="temperature")
    fields = dict(
        n=req.n,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if req.top_k is None else req.top_k,
        min_p=0.0 if req.min_p is None else req.min_p,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        seed=req.seed,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        stop=stop,
        stop_token_ids=req.stop_token_ids,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=req.skip_special_tokens,
        logit_bias=_logit_bias(req.logit_bias, vocab_size),
    )
    try:
        return SamplingParams(**fields)
    except ValueError as exc:
        param = str(exc).split(" ", 1)[0]
        raise bad_request(str(exc), param=param if param in fields else None) from None


def chat_sampling_params(req: ChatCompletionRequest, vocab_size: int) -> SamplingParams:
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise bad_request("max_tokens and max_completion_tokens differ; send one of them",
                          param="max_completion_tokens")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
        else req.max_tokens
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    return sampling_params(req, max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=None,
                           vocab_size=vocab_size)


def completion_sampling_params(req: CompletionRequest, vocab_size: int) -> SamplingParams:
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    prompt_logprobs = req.logprobs if (req.echo and req.logprobs is not None) else None
    return sampling_params(req, max_tokens=max_tokens, logprobs=req.logprobs,
                           prompt_logprobs=prompt_logprobs, vocab_size=vocab_size)
