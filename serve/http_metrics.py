"""A small Prometheus text-format registry: counters, gauges and histograms with labels, no dependency."""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

Labels = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Iterable[str], values: Iterable[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labelnames: Labels = ()) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = labelnames
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def render(self) -> list[str]:
        raise NotImplementedError

    def _series(self, values: dict[Labels, float]) -> list[str]:
        """The header and one line per label set, in label order."""
        return [
            *self.header(),
            *(
                f"{self.name}{_labels(self.labelnames, k)} {_num(v)}"
                for k, v in sorted(values.items())
            ),
        ]


class Counter(_Metric):
    """A monotonically increasing count per label set."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Labels = ()) -> None:
        super().__init__(name, help_text, labelnames)
        self.values: dict[Labels, float] = {}

    def inc(self, labels: Labels = (), amount: float = 1.0) -> None:
        """Add `amount` to the series of `labels`."""
        with self._lock:
            self.values[labels] = self.values.get(labels, 0.0) + amount

    def render(self) -> list[str]:
        with self._lock:
            values = dict(self.values)
        return self._series(values)


class Gauge(_Metric):
    """A value read at scrape time from a callback (or set directly)."""

    kind = "gauge"

    def __init__(
        self,
        name: str,
        help_text: str,
        read: Callable[[], float] | None = None,
        labelnames: Labels = (),
    ) -> None:
        super().__init__(name, help_text, labelnames)
        self.read = read
        self.values: dict[Labels, float] = {}

    def set(self, value: float, labels: Labels = ()) -> None:
        """Set the series of `labels`."""
        with self._lock:
            self.values[labels] = value

    def render(self) -> list[str]:
        if self.read is not None:
            return [*self.header(), f"{self.name} {_num(self.read())}"]
        with self._lock:
            values = dict(self.values)
        return self._series(values)


class CounterFrom(_Metric):
    """A counter whose value some other component keeps (the engine's own counters)."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        super().__init__(name, help_text)
        self.read = read

    def render(self) -> list[str]:
        return [*self.header(), f"{self.name} {_num(self.read())}"]


class GaugeSeries(_Metric):
    """Gauges whose label sets and values some other component knows, read at scrape time."""

    kind = "gauge"

    def __init__(
        self, name: str, help_text: str, labelnames: Labels, read: Callable[[], dict[Labels, float]]
    ) -> None:
        super().__init__(name, help_text, labelnames)
        self.read = read

    def render(self) -> list[str]:
        return self._series(self.read())


def one_two_five_buckets(low: float, high: float) -> tuple[float, ...]:
    """Bucket bounds 1, 2, 5 times each power of ten from `low` up to `high`, both included."""
    bounds: list[float] = []
    decade = low
    while decade <= high:
        bounds += [
            round(decade * step, 12) for step in (1, 2, 5) if decade * step <= high * (1 + 1e-9)
        ]
        decade *= 10
    return tuple(bounds)


class Histogram(_Metric):
    """Observations counted into cumulative buckets, with their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Iterable[float]) -> None:
        super().__init__(name, help_text)
        self.bounds = sorted(buckets)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Count one observation."""
        with self._lock:
            self.counts[bisect.bisect_left(self.bounds, value)] += 1
            self.sum += value
            self.count += 1

    def render(self) -> list[str]:
        lines = self.header()
        with self._lock:
            running = 0
            for bound, n in zip([*self.bounds, math.inf], self.counts, strict=True):
                running += n
                lines.append(f'{self.name}_bucket{{le="{_num(bound)}"}} {running}')
            lines.append(f"{self.name}_sum {_num(self.sum)}")
            lines.append(f"{self.name}_count {self.count}")
        return lines


M = TypeVar("M", bound=_Metric)


class Registry:
    """An ordered set of metrics rendered together."""

    def __init__(self) -> None:
        self.metrics: list[_Metric] = []

    def add(self, metric: M) -> M:
        """Register `metric` and return it."""
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        """The Prometheus text exposition of every metric."""
        lines: list[str] = []
        for metric in self.metrics:
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"
