"""
The daemon's event-loop lag over one stretch of a benchmark run.

The daemon sets a 10 ms timer over and over and records how late each one
fires (``polystream.ops.health.run_lag_probe``): the histogram
``polystream_loop_lag_seconds`` on ``/metrics`` (buckets 0.5 ms .. 2.5 s,
then +Inf) and the largest lateness since start, ``/health``
``loop_lag_max_s``. Both only grow, so a stretch is measured by reading them
at its start and at its end (:func:`read_lag`) and subtracting
(:meth:`LagReading.since`).

Quantiles are per probe sample, not per second of wall time: a loop stalled
for 400 ms yields one sample of about 0.4 s, and none meanwhile.
:meth:`LagWindow.quantile` interpolates linearly inside the bucket that holds
the rank, as Prometheus' ``histogram_quantile`` does (the first bucket starts
at 0), and also gives that bucket's upper bound; :meth:`LagWindow.figures`
caps an interpolated value at the stretch's maximum when that is known
exactly (a few samples in a wide bucket). The stretch's maximum is
exact when ``loop_lag_max_s`` grew during it (the new maximum happened
then); otherwise the stretch stayed below the earlier maximum and only the
upper bound of its highest non-empty bucket (capped by that earlier maximum)
is known.
"""

from __future__ import annotations

import itertools
from typing import Any

import attrs
import httpx
import trio

from polystream.ops.daemon import DaemonProcess

__all__ = ["LAG_METHOD", "LagReading", "LagWindow", "read_lag"]

METRIC = "polystream_loop_lag_seconds"

LAG_METHOD = (
    "polystream_loop_lag_seconds (/metrics: lateness of a 10 ms timer, one sample per "
    "firing) read at the start and end of the stretch and subtracted; p50/p99 per sample, "
    "interpolated linearly inside the bucket holding the rank (Prometheus "
    "histogram_quantile; capped at the exact max), the bucket's upper bound beside it; "
    "max from /health "
    "loop_lag_max_s, exact when it grew during the stretch, else the upper bound of the "
    "highest non-empty bucket"
)


@attrs.frozen
class LagReading:
    """
    The histogram and ``loop_lag_max_s`` at one moment.

    Attributes:
        bounds: the finite bucket upper bounds, seconds, ascending.
        cumulative: samples at or below each bound, then the total (+Inf).
        total_s: sum of all samples, seconds.
        max_s: ``/health`` ``loop_lag_max_s``, seconds since the daemon started.
    """

    bounds: tuple[float, ...]
    cumulative: tuple[float, ...]
    total_s: float
    max_s: float

    @classmethod
    def parse(cls, metrics: str, max_s: float) -> LagReading:
        """
        Read :data:`METRIC` from Prometheus text.

        Raises:
            ValueError: the text has no such histogram.
        """
        from prometheus_client.parser import text_string_to_metric_families

        buckets: dict[float, float] = {}
        total = None
        for family in text_string_to_metric_families(metrics):
            if family.name != METRIC:
                continue
            for sample in family.samples:
                if sample.name == f"{METRIC}_bucket":
                    buckets[float(sample.labels["le"])] = float(sample.value)
                elif sample.name == f"{METRIC}_sum":
                    total = float(sample.value)
        if not buckets or total is None or float("inf") not in buckets:
            raise ValueError(
                f"the daemon's /metrics has no {METRIC} histogram (polystream.ops.metrics."
                "registry_of must register Stats.loop_lag)"
            )
        ordered = sorted(buckets)
        return cls(
            tuple(b for b in ordered if b != float("inf")),
            tuple(buckets[b] for b in ordered),
            total,
            max_s,
        )

    def since(self, earlier: LagReading) -> LagWindow:
        """What happened between ``earlier`` and this reading."""
        if earlier.bounds != self.bounds:
            raise ValueError("the histogram's buckets changed between two readings")
        cumulative = [a - b for a, b in zip(self.cumulative, earlier.cumulative, strict=True)]
        counts = [cumulative[0], *(b - a for a, b in itertools.pairwise(cumulative))]
        return LagWindow(
            self.bounds, tuple(counts), self.total_s - earlier.total_s, earlier.max_s, self.max_s
        )


@attrs.frozen
class LagWindow:
    """
    The samples of one stretch, per bucket (``counts[i]`` in ``(bounds[i-1],
    bounds[i]]``, the last one above the last bound), their sum, and
    ``loop_lag_max_s`` before and after it (seconds).
    """

    bounds: tuple[float, ...]
    counts: tuple[float, ...]
    total_s: float
    max_before_s: float
    max_after_s: float

    @property
    def samples(self) -> int:
        """Probe samples in the stretch."""
        return round(sum(self.counts))

    def quantile(self, q: float) -> tuple[float, float | None] | None:
        """
        ``(interpolated, bucket upper bound)`` in seconds for ``q`` in [0, 1];
        None without samples. Past the last finite bound both are that bound
        and the upper bound is None (the sample is > 2.5 s).
        """
        n = sum(self.counts)
        if n <= 0:
            return None
        rank = q * n
        below = 0.0
        for index, count in enumerate(self.counts):
            if count > 0 and below + count >= rank:
                if index == len(self.bounds):
                    return self.bounds[-1], None
                lower = self.bounds[index - 1] if index else 0.0
                upper = self.bounds[index]
                return lower + (upper - lower) * (rank - below) / count, upper
            below += count
        return self.bounds[-1], None

    def maximum(self) -> tuple[float | None, bool]:
        """
        ``(seconds, exact)``: the new ``loop_lag_max_s`` if it grew in the
        stretch (exact), else the upper bound of the highest non-empty
        bucket, capped by the earlier maximum (None: above 2.5 s).
        """
        if self.max_after_s > self.max_before_s:
            return self.max_after_s, True
        highest = max((i for i, c in enumerate(self.counts) if c > 0), default=None)
        if highest is None:
            return 0.0, True
        bound = self.bounds[highest] if highest < len(self.bounds) else None
        if bound is None:
            return self.max_before_s, False
        return min(bound, self.max_before_s), False

    def figures(self) -> dict[str, Any]:
        """p50, p99 (interpolated, and the bucket's bound), max, mean, in ms (JSON-ready)."""

        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1000, 3)

        top, exact = self.maximum()
        p50, p99 = self.quantile(0.5), self.quantile(0.99)
        if exact and top is not None:  # interpolation must not pass the known maximum
            p50 = None if p50 is None else (min(p50[0], top), p50[1])
            p99 = None if p99 is None else (min(p99[0], top), p99[1])
        unit = "ms, interpolated in its bucket"
        return {
            "samples": self.samples,
            "p50": {"value": ms(p50[0]) if p50 else None, "unit": unit},
            "p99": {
                "value": ms(p99[0]) if p99 else None,
                "unit": unit,
                "bucket_upper_ms": ms(p99[1]) if p99 else None,
            },
            "max": {
                "value": ms(top),
                "unit": "ms" if exact else "ms (upper bound: below an earlier maximum)",
                "exact": exact,
            },
            "mean": {
                "value": ms(self.total_s / self.samples) if self.samples else None,
                "unit": "ms",
            },
            "over_100ms": round(
                sum(c for b, c in zip(self.bounds, self.counts[1:], strict=True) if b >= 0.1)
            ),
            "max_since_start_ms": ms(self.max_after_s),
            "buckets": {
                **{
                    f"le_{b * 1000:g}ms": round(c)
                    for b, c in zip(self.bounds, self.counts[:-1], strict=True)
                },
                "over": round(self.counts[-1]),
            },
        }


async def read_lag(daemon: DaemonProcess) -> LagReading:
    """
    The daemon's lag histogram (``/metrics``), then ``loop_lag_max_s``
    (``/health``, asked again while it does not answer: a stalled loop), now.

    Raises:
        PolystreamError: the daemon exited.
        httpx.HTTPError, ValueError: ``/metrics`` does not answer with the histogram.
    """
    url = f"http://127.0.0.1:{daemon.health_port}/metrics"

    def fetch() -> str:
        with httpx.Client(timeout=30.0) as client:
            response = client.get(url)
            response.raise_for_status()
            return response.text

    text = await trio.to_thread.run_sync(fetch)
    health = None
    while health is None:
        health = await daemon.try_health()
    return LagReading.parse(text, float(health["loop_lag_max_s"]))
