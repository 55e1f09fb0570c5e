"""mistral.rs's Python API over Caldera's offline engine, so its LLaVA examples run with one
changed line::

    from caldera.mistralrs import Runner, Which, ChatCompletionRequest, VisionArchitecture

    runner = Runner(
        which=Which.VisionPlain(
            model_id="llava-hf/llava-v1.6-mistral-7b-hf",
            arch=VisionArchitecture.LLaVANext,
        ),
        in_situ_quant="Q4K",
    )
    res = runner.send_chat_completion_request(ChatCompletionRequest(
        model="default", messages=[...], max_tokens=256, temperature=0.1))
    print(res.choices[0].message.content)
    print(res.usage)

Responses are the same OpenAI-shaped objects ``caldera serve`` returns (``usage`` carries
mistral.rs's ``avg_prompt_tok_per_sec`` and ``avg_compl_tok_per_sec``). Only the LLaVA
architectures are served; other ``VisionArchitecture`` values are refused by name.
"""

from __future__ import annotations

import enum
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from caldera.api.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    DeltaMessage,
)
from caldera.api.serving import finish_reason, usage
from caldera.engine.sampling_params import SamplingParams

__all__ = ["ChatCompletionRequest", "Runner", "VisionArchitecture", "Which"]


class VisionArchitecture(enum.Enum):
    LLaVANext = "llava_next"
    LLaVA = "llava"
    # mistral.rs's other vision architectures, named so a user gets a clear refusal.
    Phi3V = "phi3v"
    Idefics2 = "idefics2"
    VLlama = "vllama"
    Qwen2VL = "qwen2vl"
    Idefics3 = "idefics3"
    MiniCpmO = "minicpmo"
    Phi4MM = "phi4mm"
    Qwen2_5VL = "qwen2_5vl"
    Gemma3 = "gemma3"
    Mistral3 = "mistral3"
    Llama4 = "llama4"


_ARCHITECTURES = {
    VisionArchitecture.LLaVA: "LlavaForConditionalGeneration",
    VisionArchitecture.LLaVANext: "LlavaNextForConditionalGeneration",
}


class Which:
    @dataclass(frozen=True)
    class VisionPlain:
        model_id: str
        arch: VisionArchitecture
        tokenizer_json: str | None = None
        dtype: str = "auto"


@dataclass
class ChatCompletionRequest:
    """mistral.rs's request; ``n_choices`` and ``stop_seqs`` are its names for n and stop."""

    messages: list[dict[str, Any]] | str
    model: str = "default"
    logit_bias: dict[int, float] | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    max_tokens: int | None = None
    n_choices: int = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop_seqs: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    stream: bool = False
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(
            n=self.n_choices,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            max_tokens=self.max_tokens,
            stop=self.stop_seqs,
            seed=self.seed,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            logit_bias=self.logit_bias,
        )


class Runner:
    """Loads the model once; ``send_chat_completion_request`` runs one request to its end
    (or streams it, with ``stream=True``)."""

    def __init__(self, which: Which.VisionPlain, *, max_seqs: int = 16,
                 prefix_cache_n: int = 16, chat_template: str | None = None,
                 in_situ_quant: str | None = None, **options: Any) -> None:
        from caldera.engine.llm import LLM

        if not isinstance(which, Which.VisionPlain):
            raise ValueError("Caldera serves vision models: pass which=Which.VisionPlain(...)")
        if which.arch not in _ARCHITECTURES:
            raise ValueError(f"architecture {which.arch.name} is not served by Caldera; use "
                             "VisionArchitecture.LLaVA or VisionArchitecture.LLaVANext")
        self.llm = LLM(model=which.model_id, max_num_seqs=max_seqs,
                       enable_prefix_caching=prefix_cache_n > 0, chat_template=chat_template,
                       isq=in_situ_quant, dtype=which.dtype, **options)
        found = self.llm.model_config.architecture
        if found != _ARCHITECTURES[which.arch]:
            raise ValueError(f"{which.model_id} is a {found}, not {which.arch.name}: pass "
                             f"the matching VisionArchitecture")
        self.model_id = which.model_id

    def send_chat_completion_request(
        self, request: ChatCompletionRequest
    ) -> ChatCompletion | Iterator[ChatCompletionChunk]:
        messages = request.messages
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        params = request.sampling_params()
        if request.stream:
            return self._stream(messages, params, request.model)
        out = self.llm.chat(messages, params, use_tqdm=False)[0]
        if out.error:
            raise ValueError(out.error)
        image_tokens = len(out.prompt_token_ids) - len(self._text_ids(out.prompt_token_ids))
        return ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=request.model,
            choices=[ChatChoice(c.index, AssistantMessage(c.text), None,
                                finish_reason(c.finish_reason) or "stop")
                     for c in out.outputs],
            object="chat.completion", usage=usage(out, image_tokens),
        )

    def _text_ids(self, ids: list[int]) -> list[int]:
        image_id = self.llm.model_config.image_token_index
        return [t for t in ids if t != image_id]

    def _stream(self, messages: list[dict], params: SamplingParams,
                model: str) -> Iterator[ChatCompletionChunk]:
        chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        for delta in self.llm.stream_chat(messages, params):
            yield ChatCompletionChunk(id=chunk_id, created=created, model=model,
                                      choices=[ChatChunkChoice(0, DeltaMessage(content=delta),
                                                               None)],
                                      object="chat.completion.chunk")
        yield ChatCompletionChunk(id=chunk_id, created=created, model=model,
                                  choices=[ChatChunkChoice(0, DeltaMessage(), "stop")],
                                  object="chat.completion.chunk")

    def shutdown(self) -> None:
        self.llm.shutdown()
