"""The offline API, shaped like vLLM's so users switch by changing an import::

    from caldera.engine import LLM, SamplingParams

    llm = LLM(model="llava-hf/llava-v1.6-mistral-7b-hf", isq="4")
    outputs = llm.generate(
        {"prompt": "[INST] <image>\\nWhat is shown here? [/INST]", "images": ["photo.jpg"]},
        SamplingParams(temperature=0, max_tokens=64),
    )
    print(outputs[0].outputs[0].text)
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

from tqdm.auto import tqdm

from caldera.engine.config import EngineConfig
from caldera.engine.core_client import EngineCoreClient, InprocClient, MPClient
from caldera.engine.messages import EngineCoreRequest, ImageData, TensorData
from caldera.engine.output_processor import OutputProcessor
from caldera.engine.outputs import RequestOutput
from caldera.engine.processor import InputProcessor, ProcessedPrompt, PromptError
from caldera.engine.sampling_params import SamplingParams
from caldera.worker.config import ModelConfig
from caldera.worker.loader import resolve_model_path

logger = logging.getLogger(__name__)

PromptType = str | dict[str, Any]


def to_core_request(request_id: str, processed: ProcessedPrompt, params: SamplingParams,
                    eos_token_id: int | None, arrival_time: float,
                    priority: int = 0) -> EngineCoreRequest:
    images = [
        ImageData(f.identifier, f.offset, f.length, tuple(f.data.image_size),
                  TensorData.from_tensor(f.data.pixel_values), f.data.base_only)
        for f in processed.images
    ]
    return EngineCoreRequest(request_id, processed.token_ids, params, images, eos_token_id,
                             arrival_time, priority)


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    """Sequence ``index`` of an n > 1 request: one sequence each, distinct seeds."""
    seed = None if params.seed is None else params.seed + index
    return SamplingParams(**{**_fields(params), "n": 1, "seed": seed})


def _fields(params: SamplingParams) -> dict[str, Any]:
    return {name: getattr(params, name) for name in params.__struct_fields__}


class LLM:
    """Every engine option of ``caldera serve`` is a keyword argument of the same name."""

    def __init__(self, model: str, *, multiprocess: bool = False, **options: Any) -> None:
        unknown = set(options) - set(EngineConfig.option_names())
        if unknown:
            raise TypeError(f"unknown LLM option(s) {sorted(unknown)}; "
                            f"accepted: {EngineConfig.option_names()}")
        if "isq" in options and options["isq"] is not None:
            options["isq"] = str(options["isq"])
        if "allowed_local_media_paths" in options:
            options["allowed_local_media_paths"] = tuple(options["allowed_local_media_paths"])
        self.config = EngineConfig(model=model, **options)
        model_dir = resolve_model_path(model, self.config.revision)
        self.model_config = ModelConfig.from_model_dir(model_dir)
        # Offline, the caller names its own files and URLs: local paths are allowed unless
        # restricted, and URLs may reach hosts on the caller's own network.
        self.processor = InputProcessor(
            model_dir, self.model_config, chat_template=self.config.chat_template,
            allowed_local_media_paths=self.config.allowed_local_media_paths or ("/",),
            allow_private_media_urls=True,
        )
        self.tokenizer = self.processor.tokenizer
        eos = self.tokenizer.eos_token_id
        client_cls = MPClient if multiprocess else InprocClient
        self.engine: EngineCoreClient = client_cls(self.config, eos)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    # ---- public API ---------------------------------------------------------------------

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Text prompts, or ``{"prompt": text with one <image> per image, "images": [...]}``
        (PIL images, paths, URLs, bytes, data: URLs), optionally with ``"image_details"``:
        "auto", "low" or "high" per image. Outputs come back in prompt order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        processed = [self._process_prompt(p) for p in prompts]
        return self._run(processed, self._per_prompt(sampling_params, len(processed)), use_tqdm)

    def chat(
        self,
        messages: list[dict] | Sequence[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """OpenAI-format conversations (one, or a list of them) through the chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        processed = [
            self.processor.process_chat(list(c), add_generation_prompt=add_generation_prompt)
            for c in conversations
        ]
        return self._run(processed, self._per_prompt(sampling_params, len(processed)), use_tqdm)

    def stream_chat(
        self, messages: list[dict], sampling_params: SamplingParams | None = None
    ) -> Iterator[str]:
        """One conversation's reply as it is generated, text delta by text delta."""
        for out in self.stream_chat_outputs(messages, sampling_params):
            if out.outputs[0].text_delta:
                yield out.outputs[0].text_delta

    def stream_chat_outputs(
        self, messages: list[dict], sampling_params: SamplingParams | None = None
    ) -> Iterator[RequestOutput]:
        """One conversation's RequestOutput after each step that changed it; the last one is
        finished and carries the request's metrics (time to first token, tokens/s)."""
        processed = self.processor.process_chat(messages)
        params = sampling_params or SamplingParams()
        if params.n != 1:
            raise ValueError("stream_chat streams one sequence: use n=1")
        request_id = self._add(processed, params)
        finished = False
        try:
            while not finished:
                outputs = self.engine.get_output()
                result = self.output_processor.process_outputs(outputs.outputs)
                if result.reqs_to_abort:
                    self.engine.abort_requests(result.reqs_to_abort)
                for out in result.request_outputs:
                    if out.request_id == request_id:
                        finished = out.finished
                        yield out
        finally:
            if not finished:  # the caller stopped early (Ctrl-C): free the request
                self.engine.abort_requests(self.output_processor.abort_request(request_id))

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- internals ----------------------------------------------------------------------

    def _process_prompt(self, prompt: PromptType) -> ProcessedPrompt:
        if isinstance(prompt, str):
            return self.processor.process(prompt)
        if not isinstance(prompt, dict) or "prompt" not in prompt:
            raise PromptError("a prompt is a string or {'prompt': str, 'images': [...]}")
        return self.processor.process(
            prompt["prompt"], prompt.get("images") or (), prompt.get("image_details")
        )

    @staticmethod
    def _per_prompt(params: SamplingParams | Sequence[SamplingParams] | None,
                    count: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * count
        if isinstance(params, SamplingParams):
            return [params] * count
        if len(params) != count:
            raise ValueError(f"{len(params)} sampling params for {count} prompts: give one, "
                             "or one per prompt")
        return list(params)

    def _check_length(self, processed: ProcessedPrompt) -> None:
        limit = self.engine.max_model_len
        if len(processed.token_ids) >= limit:
            raise PromptError(
                f"the prompt has {len(processed.token_ids)} tokens (images included); "
                f"max_model_len is {limit}: shorten it or pass fewer/smaller images"
            )

    def _add(self, processed: ProcessedPrompt, params: SamplingParams) -> str:
        self._check_length(processed)
        request_id = str(next(self._ids))
        now = time.monotonic()
        child_ids = self.output_processor.add_request(
            request_id, processed.prompt, processed.token_ids, params, now
        )
        for index, child_id in enumerate(child_ids):
            p = child_params(params, index) if params.n > 1 else params
            self.engine.add_request(to_core_request(
                child_id, processed, p, self.tokenizer.eos_token_id, now))
        return request_id

    def _run(self, processed: list[ProcessedPrompt], params: list[SamplingParams],
             use_tqdm: bool) -> list[RequestOutput]:
        for item in processed:
            self._check_length(item)
        order = [self._add(item, p) for item, p in zip(processed, params)]
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(order), desc="generating", unit="req", disable=not use_tqdm)
        start, generated = time.monotonic(), 0
        while len(finished) < len(order):
            outputs = self.engine.get_output()
            result = self.output_processor.process_outputs(outputs.outputs)
            if result.reqs_to_abort:
                self.engine.abort_requests(result.reqs_to_abort)
            generated += sum(len(o.new_token_ids) for o in outputs.outputs)
            for out in result.request_outputs:
                if out.finished:
                    finished[out.request_id] = out
                    bar.update(1)
            elapsed = time.monotonic() - start
            bar.set_postfix_str(f"{generated / max(elapsed, 1e-9):.1f} tok/s", refresh=False)
        bar.close()
        return [finished[r] for r in order]
