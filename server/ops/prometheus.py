"""Prometheus text exposition (format 0.0.4), written by hand: a histogram and a page builder."""
from __future__ import annotations

import bisect
import math
from typing import Iterable, Mapping

from realtime.metrics import HistogramSnapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    def __init__(self, buckets: Iterable[float]) -> None:
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        if value is None or not math.isfinite(value):
            return
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.count += 1
        self.sum += value


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str] | None) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class Page:
    """Collects metric families and renders them; each family's HELP/TYPE is written once.

    Samples are kept per family and rendered family by family, so callers may add them in any order
    (e.g. session by session, several families each): the text format requires a family's lines to be
    contiguous, and strict parsers reject a page that splits them.
    """

    def __init__(self) -> None:
        self._families: dict[str, list[str]] = {}

    def _declare(self, name: str, kind: str, help_text: str) -> list[str]:
        """The family's lines (HELP and TYPE first), to append its samples to."""
        if name not in self._families:
            self._families[name] = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        return self._families[name]

    def gauge(self, name: str, help_text: str, value: float,
              labels: Mapping[str, str] | None = None) -> None:
        lines = self._declare(name, "gauge", help_text)
        lines.append(f"{name}{_labels(labels)} {_number(value)}")

    def counter(self, name: str, help_text: str, value: float,
                labels: Mapping[str, str] | None = None) -> None:
        lines = self._declare(name, "counter", help_text)
        lines.append(f"{name}{_labels(labels)} {_number(value)}")

    def histogram(self, name: str, help_text: str, hist: Histogram,
                  labels: Mapping[str, str] | None = None) -> None:
        lines = self._declare(name, "histogram", help_text)
        base = dict(labels or {})
        cumulative = 0
        for bound, count in zip(self.__bounds(hist), hist.counts, strict=True):
            cumulative += count
            lines.append(f"{name}_bucket{_labels({**base, 'le': bound})} {cumulative}")
        lines.append(f"{name}_sum{_labels(base)} {_number(hist.sum)}")
        lines.append(f"{name}_count{_labels(base)} {hist.count}")

    def cumulative_histogram(self, name: str, help_text: str, data: HistogramSnapshot,
                             labels: Mapping[str, str] | None = None) -> None:
        """A histogram as the engine reports it: cumulative counts by upper bound, sum and count."""
        lines = self._declare(name, "histogram", help_text)
        base = dict(labels or {})
        for bound, cumulative in data.buckets.items():
            lines.append(f"{name}_bucket{_labels({**base, 'le': bound})} {cumulative}")
        lines.append(f"{name}_sum{_labels(base)} {_number(data.sum)}")
        lines.append(f"{name}_count{_labels(base)} {data.count}")

    @staticmethod
    def __bounds(hist: Histogram) -> list[str]:
        return [_number(float(b)) for b in hist.buckets] + ["+Inf"]

    def render(self) -> str:
        return "\n".join(line for lines in self._families.values() for line in lines) + "\n"

