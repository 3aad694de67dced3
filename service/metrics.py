"""Prometheus metrics, correct with several gunicorn workers.

With PROMETHEUS_MULTIPROC_DIR set (the gunicorn config sets it before any worker imports this
module), every process writes its samples to files there and /metrics adds them up: counters and
histograms summed over all workers that ever ran, gauges summed over the workers alive now
("livesum"; a dead worker's files are dropped by the config's child_exit hook). Without it (Flask's
test client, `flask run`), the process's own registry is used.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import REGISTRY, multiprocess

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
FIRST_CHAR_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

requests_total = Counter("chargen_requests", "HTTP requests answered, by route, method and status",
                         ["route", "method", "status"])
request_seconds = Histogram("chargen_request_duration_seconds", "Time from a request's arrival to the end of its response "
                            "(the whole stream for streamed responses)", ["route"], buckets=LATENCY_BUCKETS)
workers_ready = Gauge("chargen_workers_ready", "Workers whose models are all loaded", multiprocess_mode="livesum")
# The generation metrics, by model (the name /v1/models lists).
first_char_seconds = Histogram("chargen_time_to_first_char_seconds", "Time from a generation request's arrival to "
                               "its first generated character", ["model"], buckets=FIRST_CHAR_BUCKETS)
queue_seconds = Histogram("chargen_queue_wait_seconds", "Time generation requests waited for batch slots",
                          ["model"], buckets=FIRST_CHAR_BUCKETS)
chars_generated = Counter("chargen_chars_generated", "Characters generated (emitted to clients)", ["model"])
batch_size = Histogram("chargen_batch_size", "Streams advanced together by one engine step", ["model"], buckets=BATCH_BUCKETS)
queue_depth = Gauge("chargen_queue_depth", "Requests waiting for batch slots", ["model"], multiprocess_mode="livesum")
active_streams = Gauge("chargen_active_streams", "Streams holding a batch slot", ["model"], multiprocess_mode="livesum")
# The prompt-state cache, by model (each worker has its own cache per model).
prompt_cache_hits = Counter("chargen_prompt_cache_hits", "Prompts that resumed from a cached prefix's state", ["model"])
prompt_cache_misses = Counter("chargen_prompt_cache_misses", "Prompts read from the start (no cached prefix)", ["model"])
prompt_cache_chars_saved = Counter("chargen_prompt_cache_chars_saved", "Prompt characters not fed thanks to the cache", ["model"])
prompt_cache_bytes = Gauge("chargen_prompt_cache_bytes", "Bytes the prompt caches hold (states and keys)", ["model"],
                           multiprocess_mode="livesum")


class ModelMetrics:
    """One model's generation metrics, its label bound once (every series exists from the start, at 0)."""

    def __init__(self, model: str):
        self.first_char_seconds = first_char_seconds.labels(model)
        self.queue_seconds = queue_seconds.labels(model)
        self.chars_generated = chars_generated.labels(model)
        self.batch_size = batch_size.labels(model)
        self.queue_depth = queue_depth.labels(model)
        self.active_streams = active_streams.labels(model)
        self.prompt_cache_hits = prompt_cache_hits.labels(model)
        self.prompt_cache_misses = prompt_cache_misses.labels(model)
        self.prompt_cache_chars_saved = prompt_cache_chars_saved.labels(model)
        self.prompt_cache_bytes = prompt_cache_bytes.labels(model)


def exposition() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST
