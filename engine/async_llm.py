"""AsyncLLM: the server's side of the engine. Many requests in flight on one event loop, one
EngineCore process behind the msgpack client.

    handler A --generate()--> queue A <--+
    handler B --generate()--> queue B <--+-- output loop <-- reader thread <-- EngineCore process
                 add/abort ---------------------------------> writer thread -->

The client's reader thread hands each batch of engine outputs to the event loop; one output
task detokenizes them (``OutputProcessor``) and feeds each request's queue. A handler that stops
iterating (the HTTP client went away) aborts its request, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from caldera.engine.config import EngineConfig
from caldera.engine.core_client import EngineDeadError, MPClient
from caldera.engine.llm import child_params, to_core_request
from caldera.engine.messages import EngineCoreOutputs, SchedulerStatsMessage
from caldera.engine.output_processor import OutputProcessor
from caldera.engine.outputs import RequestOutput
from caldera.engine.processor import InputProcessor, ProcessedPrompt, PromptError
from caldera.engine.sampling_params import SamplingParams
from caldera.worker.config import ModelConfig
from caldera.worker.loader import resolve_model_path

logger = logging.getLogger(__name__)


class StatLogger(Protocol):
    """Receives what the engine reports, on the event loop (the server's metrics)."""

    def on_engine_step(self, stats: SchedulerStatsMessage | None,
                       outputs: Sequence[RequestOutput], now: float) -> None: ...

    def on_request_aborted(self, request_id: str) -> None: ...


@dataclass
class _Stream:
    queue: asyncio.Queue[RequestOutput | BaseException] = field(default_factory=asyncio.Queue)
    finished: bool = False


class AsyncLLM:
    """Built with ``await AsyncLLM.start(config)`` inside a running event loop."""

    def __init__(self, config: EngineConfig, processor: InputProcessor,
                 model_config: ModelConfig, stat_loggers: Sequence[StatLogger] = ()) -> None:
        self.config = config
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.model_config = model_config
        self.stat_loggers = list(stat_loggers)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.stats = SchedulerStatsMessage()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._loop = asyncio.get_running_loop()
        self._incoming: asyncio.Queue[EngineCoreOutputs] = asyncio.Queue()
        self.engine: MPClient | None = None
        self._output_task: asyncio.Task | None = None
        self.dead_reason: str | None = None

    @classmethod
    async def start(cls, config: EngineConfig,
                    stat_loggers: Sequence[StatLogger] = ()) -> AsyncLLM:
        """Loads the tokenizer and processors here and the model in the engine process."""
        model_dir = await asyncio.to_thread(resolve_model_path, config.model, config.revision)
        model_config = ModelConfig.from_model_dir(model_dir)
        processor = await asyncio.to_thread(
            InputProcessor, model_dir, model_config, chat_template=config.chat_template,
            allowed_local_media_paths=config.allowed_local_media_paths,
        )
        llm = cls(config, processor, model_config, stat_loggers)
        llm.engine = await asyncio.to_thread(
            MPClient, config, processor.tokenizer.eos_token_id, on_output=llm._on_output_thread
        )
        llm._output_task = asyncio.create_task(llm._output_loop(), name="caldera-outputs")
        return llm

    @property
    def max_model_len(self) -> int:
        assert self.engine is not None
        return self.engine.max_model_len

    @property
    def num_blocks(self) -> int:
        assert self.engine is not None
        return self.engine.num_blocks

    @property
    def is_healthy(self) -> bool:
        return self.dead_reason is None and self.engine is not None and self.engine.is_alive

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    # ---- requests -----------------------------------------------------------------------

    def check_prompt(self, processed: ProcessedPrompt, params: SamplingParams) -> None:
        """Refuses a prompt the engine would refuse, before it is sent."""
        limit = self.max_model_len
        if len(processed.token_ids) >= limit:
            raise PromptError(
                f"the prompt has {len(processed.token_ids)} tokens (images included); this "
                f"model's maximum context length is {limit}: shorten it or send fewer or "
                "smaller images"
            )
        if params.max_tokens is not None and len(processed.token_ids) + params.max_tokens > limit:
            raise PromptError(
                f"the prompt has {len(processed.token_ids)} tokens and max_tokens is "
                f"{params.max_tokens}, together over this model's maximum context length of "
                f"{limit}: lower max_tokens to at most {limit - len(processed.token_ids)}"
            )
        if params.min_tokens > limit - len(processed.token_ids):
            raise PromptError(
                f"min_tokens is {params.min_tokens}, more than the "
                f"{limit - len(processed.token_ids)} tokens this model's maximum context length "
                f"of {limit} leaves after the prompt: lower min_tokens"
            )

    async def generate(self, processed: ProcessedPrompt, params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they come; leaving the loop early aborts the request."""
        if not self.is_healthy:
            raise EngineDeadError(self.dead_reason or "the engine is not running")
        assert self.engine is not None
        self.check_prompt(processed, params)
        stream = _Stream()
        self._streams[request_id] = stream
        now = time.monotonic()
        child_ids = self.output_processor.add_request(
            request_id, processed.prompt, processed.token_ids, params, now)
        eos = self.tokenizer.eos_token_id
        try:
            for index, child_id in enumerate(child_ids):
                child = child_params(params, index) if params.n > 1 else params
                self.engine.add_request(to_core_request(child_id, processed, child, eos, now))
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    stream.finished = True
                yield item
                if stream.finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not stream.finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        child_ids = self.output_processor.abort_request(request_id)
        if child_ids:
            for stat_logger in self.stat_loggers:
                stat_logger.on_request_aborted(request_id)
        if child_ids and self.engine is not None and self.is_healthy:
            with contextlib.suppress(EngineDeadError):
                self.engine.abort_requests(child_ids)

    # ---- outputs ------------------------------------------------------------------------

    def _on_output_thread(self, outputs: EngineCoreOutputs) -> None:
        """Runs on the client's reader thread."""
        self._loop.call_soon_threadsafe(self._incoming.put_nowait, outputs)

    async def _output_loop(self) -> None:
        while True:
            outputs = await self._incoming.get()
            if outputs.error is not None:
                self._fail_all(outputs.error)
                return
            try:
                self._process(outputs)
            except Exception as exc:  # a bug here must not leave every client hanging
                logger.exception("processing engine outputs failed")
                self._fail_all(f"output processing failed: {exc}")
                return

    def _process(self, outputs: EngineCoreOutputs) -> None:
        now = time.monotonic()
        if outputs.stats is not None:
            self.stats = outputs.stats
        result = self.output_processor.process_outputs(outputs.outputs)
        if result.reqs_to_abort and self.engine is not None:
            self.engine.abort_requests(result.reqs_to_abort)
        for out in result.request_outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.queue.put_nowait(out)
        for stat_logger in self.stat_loggers:
            stat_logger.on_engine_step(outputs.stats, result.request_outputs, now)

    def _fail_all(self, reason: str) -> None:
        self.dead_reason = reason
        logger.error("engine failed: %s", reason)
        for stream in self._streams.values():
            stream.queue.put_nowait(EngineDeadError(reason))

    # ---- lifecycle ----------------------------------------------------------------------

    async def shutdown(self) -> None:
        if self._output_task is not None:
            self._output_task.cancel()
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown)
        self._fail_all("the server is shutting down")
