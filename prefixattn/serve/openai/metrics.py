"""``/metrics`` in the Prometheus text format (``prometheus_client``), one registry per app.

vLLM's metric names where one exists (``vllm:num_requests_running``,
``vllm:time_to_first_token_seconds``, ...: dashboards made for vLLM read them), with the
task as ``model_name``; ``prefixattn:requests_total`` counts every request by task and
outcome (``stop``, ``length``, ``cancelled``, ``error``, ``rejected``: 429, ``invalid``:
another 4xx). The decode path, read from the engine at each scrape:
``prefixattn:decode_steps_total{path}`` (``graph``: a CUDA graph replayed, ``eager``),
``prefixattn:cuda_graph_captures_total{bucket}``, ``prefixattn:cuda_graph_key_misses_total``,
``prefixattn:cuda_graph_recaptures_total``; the engine's step time by kind and quantile,
``prefixattn:step_time_seconds{kind="decode"|"prefill", quantile}``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["CONTENT_TYPE", "ServeMetrics"]

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0,
                    15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)  # fmt: skip


#: Distinct task names the per-task series carry; later tasks are counted under "other"
#: (a task folder may serve thousands of tasks: every labelled series costs memory in
#: the server and in every scraper, for as long as the process runs).
MAX_TASK_LABELS = 256
OTHER_TASKS = "other"


class ServeMetrics:
    """The server's Prometheus metrics; ``engine`` gives queue depth and running rows.

    Per-task series are labelled with the task's name for the first ``max_task_labels``
    distinct tasks seen (the base model and start-up tasks first, as they are served
    first in practice), then under ``"other"``: the label set stays bounded however many
    tasks a ``--task-dir`` serves."""

    def __init__(self, engine: Any, max_task_labels: int = MAX_TASK_LABELS) -> None:
        self.max_task_labels = max_task_labels
        self._labels: set[str] = set()
        self.registry = CollectorRegistry()
        r = self.registry
        running = Gauge("vllm:num_requests_running", "Rows in the batch in flight.", registry=r)
        running.set_function(lambda: float(getattr(engine, "running", 0)))
        waiting = Gauge("vllm:num_requests_waiting", "Requests waiting in the queue.", registry=r)
        waiting.set_function(lambda: float(engine.queue_depth))
        labels = ["model_name"]
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prompt tokens processed.", labels, registry=r
        )
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Tokens generated.", labels, registry=r
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Time to the first generated token.", labels,
            buckets=_TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "vllm:e2e_request_latency_seconds", "Request latency, arrival to last token.",
            labels, buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.success = Counter(
            "vllm:request_success", "Finished requests by finish reason.",
            ["model_name", "finished_reason"], registry=r,
        )  # fmt: skip
        self.requests = Counter(
            "prefixattn:requests", "Requests by task and outcome.", ["task", "outcome"],
            registry=r,
        )  # fmt: skip
        if hasattr(engine, "graph_stats"):
            r.register(_DecodePathCollector(engine))
        if hasattr(engine, "kv"):
            r.register(_KVCacheCollector(engine))

    def watch_tasks(self, stats: Any) -> None:
        """Export the task folder's counters (``stats()``: a TaskRegistry's):
        ``prefixattn:tasks_loaded``, ``prefixattn:task_loads_total``,
        ``prefixattn:task_evictions_total``, ``prefixattn:task_load_failures_total``."""
        self.registry.register(_TaskCollector(stats))

    def row_done(
        self, task: str, reason: str, prompt_tokens: int, tokens: int,
        ttft: float | None, latency: float,
    ) -> None:  # fmt: skip
        """One row (choice) finished with ``reason``."""
        task = self.label(task)
        self.prompt_tokens.labels(task).inc(prompt_tokens)
        self.generation_tokens.labels(task).inc(tokens)
        if ttft is not None:
            self.ttft.labels(task).observe(ttft)
        if reason in ("stop", "length"):
            self.latency.labels(task).observe(latency)
            self.success.labels(task, reason).inc()

    def request(self, task: str, outcome: str) -> None:
        """One HTTP request ended with ``outcome``."""
        self.requests.labels(self.label(task), outcome).inc()

    def label(self, task: str) -> str:
        """The label value of ``task``: its name, or ``"other"`` once ``max_task_labels``
        distinct names are in use."""
        if task in self._labels:
            return task
        if len(self._labels) < self.max_task_labels:
            self._labels.add(task)
            return task
        return OTHER_TASKS

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _TaskCollector:
    """The task registry's numbers, read at each scrape."""

    def __init__(self, stats: Any) -> None:
        self.stats = stats

    def collect(self) -> Any:
        s = self.stats()
        yield GaugeMetricFamily(
            "prefixattn:tasks_loaded", "Tasks from the task folder in memory.", value=s["loaded"]
        )
        for key, what in (
            ("loads", "Tasks loaded from the task folder."),
            ("evictions", "Tasks evicted (least recently used)."),
            ("load_failures", "Task loads that failed (unknown or bad artifact, all busy)."),
        ):
            yield CounterMetricFamily(f"prefixattn:task_{key}", what, value=s[key])


class _KVCacheCollector:
    """The paged KV cache and its prefix cache, read at each scrape (vLLM's names, counted
    in blocks of prompt tokens): ``vllm:kv_cache_usage_perc``, ``vllm:num_preemptions``,
    ``vllm:prefix_cache_queries``, ``vllm:prefix_cache_hits`` (the hit rate is their
    ratio), ``prefixattn:prefix_cache_evictions``."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        e = self.engine
        pool, s = e.kv.block_pool, e.kv.stats()
        yield GaugeMetricFamily(
            "vllm:kv_cache_usage_perc", "Fraction of KV blocks held by rows (1 = full).",
            value=pool.usage(),
        )  # fmt: skip
        yield CounterMetricFamily(
            "vllm:num_preemptions", "Rows preempted (recomputed later) when blocks ran out.",
            value=e.scheduler.num_preemptions,
        )  # fmt: skip
        yield CounterMetricFamily(
            "vllm:prefix_cache_queries", "Full prompt blocks looked up in the prefix cache.",
            value=s["queries"],
        )  # fmt: skip
        yield CounterMetricFamily(
            "vllm:prefix_cache_hits", "Prompt blocks found in the prefix cache.", value=s["hits"]
        )
        yield CounterMetricFamily(
            "prefixattn:prefix_cache_evictions", "Cached blocks evicted (least recently freed).",
            value=s["evictions"],
        )  # fmt: skip


class _DecodePathCollector:
    """The engine's decode-path counters (``Engine.graph_stats``), read at each scrape."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        g = self.engine.graph_stats()
        steps = CounterMetricFamily(
            "prefixattn:decode_steps", "Decode-only steps by path: a replayed CUDA graph, or "
            "eager (no graphs, no graph for the step's key, or more rows than the largest "
            "bucket).", labels=["path"],
        )  # fmt: skip
        steps.add_metric(["graph"], g["decode_steps"] - g["eager_decode_steps"])
        steps.add_metric(["eager"], g["eager_decode_steps"])
        yield steps
        captures = CounterMetricFamily(
            "prefixattn:cuda_graph_captures", "Decode graphs captured, by bucket (rows).",
            labels=["bucket"],
        )  # fmt: skip
        per_bucket: dict[str, int] = {}
        for key, n in g.get("captures", {}).items():  # "B4/L1024/bfloat16/in_place"
            b = key.split("/", 1)[0].lstrip("B")
            per_bucket[b] = per_bucket.get(b, 0) + n
        for b, n in per_bucket.items():
            captures.add_metric([b], n)
        yield captures
        yield CounterMetricFamily(
            "prefixattn:cuda_graph_key_misses", "Decode steps run eagerly although graphs "
            "were captured: the step's graph key (shapes, dtype, backend, KV pool, task "
            "bank) changed since.", value=g.get("key_misses", 0),
        )  # fmt: skip
        yield CounterMetricFamily(
            "prefixattn:cuda_graph_recaptures", "Decode graph captures after the first "
            "(the task bank changed: tasks added or removed).", value=g.get("recaptures", 0),
        )  # fmt: skip
        steps_now = self.engine.step_time_percentiles()
        times = GaugeMetricFamily(
            "prefixattn:step_time_seconds", "Engine step time over the last 4096 steps of "
            "each kind (decode: decode-only steps; prefill: steps with a prefill chunk), by "
            "quantile.", labels=["kind", "quantile"],
        )  # fmt: skip
        for kind, key in (("decode", "decode_time_s"), ("prefill", "prefill_time_s")):
            pct = steps_now.get(key) or {}
            for q, name in (("0.5", "p50"), ("0.9", "p90"), ("0.99", "p99")):
                if pct.get(name) is not None:
                    times.add_metric([kind, q], pct[name])
        yield times
