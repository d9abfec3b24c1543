"""A histogram of durations for /metrics as plain counts, made into a metric family when scraped.

prometheus_client's Histogram takes a lock of its own and walks its buckets in Python on every
observation (a few µs, with the GIL held, on every store commit and every call). Its owners
already serialize their observations under a lock of theirs, so this one takes none; a scrape
reads the counts as they are (one observation may be half-counted in it, never lost)."""
from __future__ import annotations

import bisect
import itertools
import time

from prometheus_client.core import HistogramMetricFamily
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString


class Durations:
    def __init__(self, buckets_s: tuple[float, ...]) -> None:
        self.buckets_s = buckets_s
        self.counts = [0] * (len(buckets_s) + 1)  # in each bucket, not cumulative; the last is +Inf's
        self.total_s = 0.0
        self.created = time.time()

    def observe(self, seconds: float) -> None:
        """Count one duration (the caller serializes observations)."""
        self.counts[bisect.bisect_left(self.buckets_s, seconds)] += 1
        self.total_s += seconds

    def add_to(self, family: HistogramMetricFamily, labels: dict[str, str]) -> None:
        """Add these durations to `family` (made with `labels`' names, in their order) as its sample
        of `labels`, with its _created."""
        cumulative = list(itertools.accumulate(tuple(self.counts)))
        family.add_metric(list(labels.values()),
                          [(floatToGoString(bound), n) for bound, n in zip(self.buckets_s, cumulative)]
                          + [("+Inf", cumulative[-1])], self.total_s)
        family.samples.append(Sample(family.name + "_created", labels, self.created))
