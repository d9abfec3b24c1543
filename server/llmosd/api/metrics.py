"""`/metrics`: the kernel and its engine in Prometheus' text format (prometheus-client).

A custom collector computes the gauges at scrape time from the kernel's own tables (one pass
over the live processes under the kernel lock), so nothing is updated per event but the few
counters and histograms that must be: spawns and exits (kernel.py), syscalls and their times
(doors.py, every door), virtual CPU busy time (scheduler.py), store commits (store.py), and
the engine's token latencies and steps (engine/engine.py).

Labels stay bounded: processes by state, kind and namespace; exits by kind, state and the
kernel's own reasons (a Kill's reason text counts as "other"); syscalls by method and status.
Mailboxes are summed, with the distribution of their depths as a gauge histogram.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Any, Callable, Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import doors
from ..kernel.kernel import Kernel

MAILBOX_DEPTH_BUCKETS = (0, 1, 10, 100, 1000, 10_000)
RATE_WINDOW_S = 10.0  # tokens/s and batch size: over the engine's steps of this last while


class KernelCollector(Collector):
    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel

    def collect(self) -> Iterator[Metric]:
        yield from self._processes()
        yield from doors.CALL_STATS.collect()
        yield from self._scheduler()
        yield from self.kernel.store.commit_seconds()
        inference = self.kernel.inference
        if inference is not None and inference.engine is not None:
            yield from _engine(inference.engine)

    def _processes(self) -> Iterator[Metric]:
        k = self.kernel
        with k.lock:  # one pass, counting only: the lock is held a few ms for 10,000 processes
            by_labels = Counter((p.state, p.kind, p.namespace) for p in k.procs.values())
            depths = [(len(p.mailbox), p.mailbox.bytes) for p in k.procs.values()]
            spawns, exits = dict(k.spawns), dict(k.exits)
        tokens = k.namespaces.token_totals()
        live = GaugeMetricFamily("llmos_processes", "Live processes", labels=["state", "kind", "namespace"])
        for labels, n in sorted(by_labels.items()):
            live.add_metric(labels, n)
        yield live
        spawned = CounterMetricFamily("llmos_process_spawns", "Processes and ports started", labels=["kind"])
        for kind, n in sorted(spawns.items()):
            spawned.add_metric([kind], n)
        yield spawned
        ended = CounterMetricFamily("llmos_process_exits", "Processes and ports ended (reason: the kernel's; "
                                    "a Kill's own text is \"other\")", labels=["kind", "state", "reason"])
        for labels, n in sorted(exits.items()):
            ended.add_metric(list(labels), n)
        yield ended
        charged = CounterMetricFamily("llmos_namespace_inference_tokens", "Inference tokens (prompt + completion) "
                                      "charged to a namespace: its processes' and its clients' (Infer, OpenAI API)",
                                      labels=["namespace"])
        for namespace, n in sorted(tokens.items()):
            charged.add_metric([namespace], n)
        yield charged
        yield GaugeMetricFamily("llmos_mailbox_messages", "Messages waiting in all mailboxes",
                                value=sum(d for d, _ in depths))
        yield GaugeMetricFamily("llmos_mailbox_bytes", "Bytes waiting in all mailboxes",
                                value=sum(b for _, b in depths))
        buckets, counted = [], 0
        ordered = sorted(d for d, _ in depths)
        for bound in MAILBOX_DEPTH_BUCKETS:
            while counted < len(ordered) and ordered[counted] <= bound:
                counted += 1
            buckets.append((str(bound), counted))
        buckets.append(("+Inf", len(ordered)))
        yield GaugeHistogramMetricFamily("llmos_mailbox_depth", "Live processes by messages waiting in their mailbox",
                                         buckets=buckets, gsum_value=sum(ordered))

    def _scheduler(self) -> Iterator[Metric]:
        sched = self.kernel.scheduler
        yield GaugeMetricFamily("llmos_run_queue_length", "Processes waiting for a virtual CPU", value=sched.queued())
        yield GaugeMetricFamily("llmos_virtual_cpus", "Virtual CPUs running programs", value=sched.cpus)
        yield CounterMetricFamily("llmos_virtual_cpu_busy_seconds", "Time virtual CPUs spent running programs",
                                  value=sum(sched.busy_ns.copy().values()) / 1e9)


def _engine(engine: Any) -> Iterator[Metric]:
    stats = engine.stats()
    yield GaugeMetricFamily("llmos_engine_running_sequences", "Sequences in the last step",
                            value=stats["running"])
    yield GaugeMetricFamily("llmos_engine_waiting_sequences", "Sequences admitted or queued but not running",
                            value=stats["waiting"])
    now = time.monotonic()
    recent = [(batch, tokens) for at, batch, tokens in tuple(engine.recent_steps) if now - at <= RATE_WINDOW_S]
    yield GaugeMetricFamily("llmos_engine_batch_size", f"Mean sequences per step over the last {RATE_WINDOW_S:g} s",
                            value=sum(b for b, _ in recent) / len(recent) if recent else 0)
    yield GaugeMetricFamily("llmos_engine_tokens_per_second", f"Tokens generated per second over the last "
                            f"{RATE_WINDOW_S:g} s", value=sum(t for _, t in recent) / RATE_WINDOW_S)
    for name, key, text in (
        ("llmos_engine_generated_tokens", "generated_tokens", "Tokens generated"),
        ("llmos_engine_steps", "steps", "Engine steps (forward passes)"),
        ("llmos_engine_preemptions", "preemptions", "Running sequences left out of a step"),
        ("llmos_engine_prefix_cache_hits", "prefix_cache_hits", "Requests admitted with a cached prompt prefix"),
        ("llmos_engine_prefix_cache_hit_tokens", "prefix_cache_hit_tokens", "Prompt tokens served from the cache"),
    ):
        yield CounterMetricFamily(name, text, value=stats[key])
    kv = GaugeMetricFamily("llmos_engine_kv_blocks", "KV cache blocks", labels=["state"])
    kv.add_metric(["used"], stats["kv_blocks_used"])
    kv.add_metric(["free"], stats["kv_blocks_total"] - stats["kv_blocks_used"])
    yield kv
    yield from engine.ttft.collect()
    yield from engine.inter_token.collect()


def handler(kernel: Kernel) -> Callable[[web.Request], Any]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KernelCollector(kernel))
    registry.register(ProcessCollector(registry=None))  # the server process's own CPU and memory

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    return metrics
