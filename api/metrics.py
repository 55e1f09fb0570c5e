"""Prometheus metrics of ``caldera serve`` (prometheus_client, one registry per app).

Names follow Prometheus conventions: ``caldera_`` prefix, base units (seconds), ``_total`` on
counters. Engine-side numbers (running/waiting requests, KV cache, prefix cache, preemptions,
vision encoder) arrive with each engine step; request-side ones (latencies, token counts,
finish reasons, image loading) are recorded here as requests progress. Beyond what other
engines export: images and image tokens per request, image fetch, decode and preprocessing
seconds, vision encoder seconds and encoder cache hits.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from caldera.engine.messages import SchedulerStatsMessage
from caldera.engine.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
            10.0, 20.0, 40.0, 80.0, 160.0)
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5,
        0.75, 1.0, 2.5)
_TOKENS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)
_IMAGES = (0, 1, 2, 3, 4, 6, 8, 16)
_MEDIA = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self.in_flight = 0
        r = self.registry
        labels = ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.running = gauge("caldera_num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("caldera_num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("caldera_kv_cache_usage_perc",
                              "Fraction of KV cache blocks in use (0-1).")
        self.prefix_queries = counter("caldera_prefix_cache_queries",
                                      "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("caldera_prefix_cache_hits",
                                   "Prompt tokens found in the prefix cache.")
        self.preemptions = counter("caldera_num_preemptions", "Requests preempted.")
        self.prompt_tokens = counter("caldera_prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("caldera_generation_tokens", "Tokens generated.")
        self.finished = Counter("caldera_request_success",
                                "Finished requests by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        self.ttft = histogram("caldera_time_to_first_token_seconds",
                              "Time from arrival to the first token.", _LATENCY)
        self.itl = histogram("caldera_inter_token_latency_seconds",
                             "Time between consecutive output tokens of a request.", _ITL)
        self.e2e = histogram("caldera_e2e_request_latency_seconds",
                             "Time from arrival to the last token.", _LATENCY)
        self.queue_time = histogram("caldera_request_queue_time_seconds",
                                    "Time from arrival to the first scheduling.", _LATENCY)
        self.prompt_len = histogram("caldera_request_prompt_tokens",
                                    "Prompt length of finished requests (image tokens "
                                    "included).", _TOKENS)
        self.generation_len = histogram("caldera_request_generation_tokens",
                                        "Generated tokens of finished requests.", _TOKENS)
        self.images = histogram("caldera_request_images", "Images per request.", _IMAGES)
        self.image_tokens = histogram("caldera_request_image_tokens",
                                      "Image tokens per request.", _TOKENS)
        self.image_fetch = histogram("caldera_image_fetch_seconds",
                                     "Time to fetch (or read) a request's images, all of "
                                     "them, concurrently.", _MEDIA)
        self.image_decode = histogram("caldera_image_decode_seconds",
                                      "Time to decode one image.", _MEDIA)
        self.image_preprocess = histogram("caldera_image_preprocess_seconds",
                                          "Time to preprocess one image (resize, tiles, "
                                          "normalisation, content hash).", _MEDIA)
        self.image_cache_hits = counter("caldera_image_cache_hits",
                                        "Images sent again and served decoded and "
                                        "preprocessed from the server's image cache.")
        self.encoder_time = counter("caldera_vision_encoder_seconds",
                                    "Time spent in the vision tower and projector.")
        self.encoder_runs = counter("caldera_vision_encoder_images",
                                    "Images run through the vision encoder.")
        self.encoder_hits = counter("caldera_encoder_cache_hits",
                                    "Images whose embeddings came from the encoder cache or "
                                    "the prefix cache instead of the encoder.")
        self.in_flight_gauge = gauge("caldera_num_requests_in_flight",
                                     "Requests the HTTP server has accepted and not finished.")
        self.in_flight_gauge.set_function(lambda: self.in_flight)
        self._last = SchedulerStatsMessage()
        self._last_token_time: dict[str, float] = {}
        self._seen_tokens: dict[str, int] = {}

    # ---- engine side --------------------------------------------------------------------

    def on_engine_step(self, stats: SchedulerStatsMessage | None,
                       outputs: Sequence[RequestOutput], now: float) -> None:
        if stats is not None:
            self._record_stats(stats)
        for out in outputs:
            self._record_output(out, now)

    def _record_stats(self, s: SchedulerStatsMessage) -> None:
        last = self._last
        self.running.set(s.num_running)
        self.waiting.set(s.num_waiting)
        self.kv_usage.set(s.kv_cache_usage)
        self.prefix_queries.inc(max(s.prefix_cache_queries - last.prefix_cache_queries, 0))
        self.prefix_hits.inc(max(s.prefix_cache_hits - last.prefix_cache_hits, 0))
        self.preemptions.inc(max(s.num_preemptions - last.num_preemptions, 0))
        self.encoder_time.inc(max(s.encoder_seconds - last.encoder_seconds, 0.0))
        self.encoder_runs.inc(max(s.encoder_runs - last.encoder_runs, 0))
        self.encoder_hits.inc(max(s.encoder_cache_hits - last.encoder_cache_hits, 0))
        self._last = s

    def _record_output(self, out: RequestOutput, now: float) -> None:
        rid = out.request_id
        total = sum(len(c.token_ids) for c in out.outputs)
        new = total - self._seen_tokens.get(rid, 0)
        m = out.metrics
        if new > 0:
            self.generation_tokens.inc(new)
            last = self._last_token_time.get(rid)
            if last is None:
                if m.first_token_time is not None:
                    self.ttft.observe(m.first_token_time - m.arrival_time)
                if m.first_scheduled_time is not None:
                    self.queue_time.observe(m.first_scheduled_time - m.arrival_time)
            else:
                # Several tokens in one update (n > 1) share the interval.
                for _ in range(new):
                    self.itl.observe((now - last) / new)
            self._last_token_time[rid] = now
            self._seen_tokens[rid] = total
        if out.finished:
            self._last_token_time.pop(rid, None)
            self._seen_tokens.pop(rid, None)
            self.prompt_tokens.inc(len(out.prompt_token_ids))
            self.e2e.observe((m.finished_time or now) - m.arrival_time)
            self.prompt_len.observe(len(out.prompt_token_ids))
            self.generation_len.observe(total)
            for c in out.outputs:
                reason = "error" if out.error else (c.finish_reason or "abort")
                self.finished.labels(self.model_name, reason).inc()

    # ---- request side -------------------------------------------------------------------

    def observe_request_images(self, count: int, tokens: int) -> None:
        self.images.observe(count)
        self.image_tokens.observe(tokens)

    def observe_image_fetch(self, seconds: float) -> None:
        self.image_fetch.observe(seconds)

    def observe_image_prepared(self, decode_seconds: float, preprocess_seconds: float,
                               cached: bool = False) -> None:
        if cached:
            self.image_cache_hits.inc()
            return
        self.image_decode.observe(decode_seconds)
        self.image_preprocess.observe(preprocess_seconds)

    def on_request_aborted(self, request_id: str) -> None:
        """A request that ended without finishing (client gone): forget its token state."""
        self._last_token_time.pop(request_id, None)
        self._seen_tokens.pop(request_id, None)
        self.finished.labels(self.model_name, "abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
