"""SessionOptions: what a client may choose for its own session, validated once, when it is made.

The one rule table (`SESSION_RULES`) holds each option's type and documented range. A `SessionOptions`
cannot exist with a value outside it (`__post_init__` checks every field), so whoever parses a request
builds one and hands it on as is: the server's POST /offer parser (server/routes/signaling.py, which adds its
video codec) and `Engine.open_session(options)` read the same object, with no dict in between and no
second check. A bad value raises `OptionError` (a ValueError) naming the option and its range.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Self


class OptionError(ValueError):
    """An option outside its rule; the message names it (`options.NAME ...`) and what is allowed."""


@dataclass(frozen=True)
class Choice:
    values: tuple[str, ...]

    def check(self, name: str, value: object) -> str:
        if not isinstance(value, str) or value.lower() not in self.values:
            raise OptionError(f"options.{name} must be one of {list(self.values)}")
        return value.lower()


@dataclass(frozen=True)
class Number:
    kind: type[int] | type[float]
    low: float
    high: float

    def check(self, name: str, value: object) -> float | int:
        ok_type = (int,) if self.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, ok_type):
            raise OptionError(f"options.{name} must be {'an integer' if self.kind is int else 'a number'}")
        if not math.isfinite(value) or not self.low <= value <= self.high:
            raise OptionError(f"options.{name} must be a finite number in [{self.low:g}, {self.high:g}], "
                              f"got {value!r}")
        return int(value) if self.kind is int else float(value)


@dataclass(frozen=True)
class Identifier:
    """A short id (an avatar's, from GET /avatars): letters, digits, '-' and '_'."""
    max_chars: int = 80

    def check(self, name: str, value: object) -> str:
        if not isinstance(value, str) or not 0 < len(value) <= self.max_chars \
                or not value.replace("-", "").replace("_", "").isalnum() or not value.isascii():
            raise OptionError(f"options.{name} must be an id (letters, digits, '-', '_'; at most "
                              f"{self.max_chars} characters), as GET /avatars lists them")
        return value


Rule = Choice | Number | Identifier

# Every engine option a client may set for its session, with its documented range (docs/api.md).
SESSION_RULES: dict[str, Rule] = {
    "avatar": Identifier(),
    "paste_mode": Choice(("feather", "official")),
    "vad_aggressiveness": Number(int, 0, 3),
    "energy_gate_dbfs": Number(float, -100.0, 0.0),
    "compute_budget_frames": Number(float, 0.0, 25.0),  # at most one second of frames at 25 fps
}


@dataclass(frozen=True)
class SessionOptions:
    """A session's own choices; None: the server's setting. `avatar`: an id from GET /avatars."""

    RULES: ClassVar[dict[str, Rule]] = SESSION_RULES

    avatar: str | None = None
    paste_mode: str | None = None
    vad_aggressiveness: int | None = None
    energy_gate_dbfs: float | None = None
    compute_budget_frames: float | None = None

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is not None:  # normalised in place: "H264" -> "h264", 3 -> 3.0
                object.__setattr__(self, name, self.RULES[name].check(name, value))

    @classmethod
    def from_mapping(cls, options: object) -> Self:
        """`options` from a JSON body: an object of known names (None values are left out)."""
        if options is None:
            return cls()
        if not isinstance(options, Mapping):
            raise OptionError("'options' must be a JSON object")
        unknown = sorted(set(options) - set(cls.RULES))
        if unknown:
            raise OptionError(f"unknown options {unknown}; known: {sorted(cls.RULES)}")
        return cls(**{name: value for name, value in options.items() if value is not None})

    def engine_overrides(self) -> dict[str, Any]:
        """The EngineConfig fields this session changes (`EngineConfig.with_overrides`)."""
        chosen = {"paste_mode": self.paste_mode, "vad_aggressiveness": self.vad_aggressiveness,
                  "energy_gate_dbfs": self.energy_gate_dbfs, "compute_budget_frames": self.compute_budget_frames}
        out: dict[str, Any] = {name: value for name, value in chosen.items() if value is not None}
        if self.compute_budget_frames is not None:
            # A client that chooses its compute budget gets exactly that one, not one fitted to the renderer.
            out["fit_budget_to_renderer"] = False
        return out
