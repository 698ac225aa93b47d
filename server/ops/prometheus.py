"""Prometheus text exposition (format 0.0.4), written by hand: a histogram and a page builder."""
from __future__ import annotations

import bisect
import math
from typing import Iterable, Mapping, Sequence

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



# -- several processes' pages as one (--workers N, server/ops/metrics.py) -----------------------------------------

MERGE_RULES = ("sum", "max", "min", "mean", "per_process")


def merge_pages(pages: Sequence[tuple[str, str]], rules: Mapping[str, str], label: str = "process",
                overrides: Mapping[str, float] | None = None) -> str:
    """One page from several processes' pages of the same families: `pages` is (process name, page text).
    A family's samples with the same name and labels are combined by its rule (`rules[family]`, default
    "sum": counters, histogram buckets / sums / counts, additive gauges; "max" / "min" / "mean" for gauges
    that are not additive); "per_process" keeps each process's samples apart under `label`="<process>" (a
    family whose labels repeat in every process, e.g. render worker 0). `overrides`: the value of an
    unlabelled family computed by the caller (a server-wide figure no combination of pages gives).
    Families keep the order of their first appearance; a family only some processes render is combined
    over those."""
    families: dict[str, list[str]] = {}       # family -> its HELP and TYPE lines
    samples: dict[str, dict[str, list[float]]] = {}  # family -> sample key -> values, one per process
    for process, text in pages:
        family = ""
        for line in text.splitlines():
            if line.startswith("# HELP "):
                family = line.split(" ", 3)[2]
                families.setdefault(family, [line])
                samples.setdefault(family, {})
            elif line.startswith("# TYPE "):
                if len(families.get(family, ())) == 1:
                    families[family].append(line)
            elif line and not line.startswith("#") and family:
                key, _, number = line.rpartition(" ")
                if rules.get(family, "sum") == "per_process":
                    key = _with_label(key, label, process)
                samples[family].setdefault(key, []).append(_parse_number(number))
    lines: list[str] = []
    for family, head in families.items():
        lines.extend(head)
        rule = rules.get(family, "sum")
        for key, values in samples[family].items():
            if overrides is not None and key in overrides:
                value: float = overrides[key]
            elif rule == "max":
                value = max(values)
            elif rule == "min":
                value = min(values)
            elif rule == "mean":
                value = sum(values) / len(values)
            else:  # sum; per_process keys are one process's each
                value = sum(values)
            lines.append(f"{key} {_number(value)}")
    return "\n".join(lines) + "\n"


def _with_label(key: str, label: str, value: str) -> str:
    """`name{a="b"}` -> `name{process="1",a="b"}`; `name` -> `name{process="1"}`."""
    name, brace, rest = key.partition("{")
    extra = f'{label}="{_escape(value)}"'
    return f"{name}{{{extra},{rest}" if brace else f"{name}{{{extra}}}"


def _parse_number(text: str) -> float:
    """A sample value as written by `_number`: integers stay int (so they print back the same)."""
    try:
        return int(text)
    except ValueError:
        return float(text)
