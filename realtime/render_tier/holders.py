"""Which avatar keys some front-end still holds: how render replicas learn that an avatar was deleted.

A replica prepares an avatar the first time a request names its key and would keep it (frames,
renderer caches) for its whole life. `DELETE /avatars/{id}` must free it on every replica, but a Serve
handle sends each call to one replica, and a replica may never hear from the deleting front-end again.

Why a registry that replicas poll (and not the alternatives):
- Idle eviction alone is wrong: a live session's silence never calls the renderer, so any timeout short
  enough to free memory promptly makes a long pause cost a re-prepare (seconds of held frames).
- Piggybacking forgotten keys on render requests reaches only the replicas that later get a request
  from that front-end, so it still needs idle eviction as a backstop, with the same trade-off.
- Serve's `user_config` does reach every replica (`reconfigure`), but only through a redeploy by the
  controller, and front-ends writing it concurrently would overwrite each other's state.
- So: one small named actor per render application (`AvatarHolders`, server/ray_render_tier.py) holds,
  per front-end, the set of keys it serves. Each replica asks it for the union every `poll_s` and drops
  the prepared avatars no front-end holds. The signal is explicit (a deletion, or a front-end leaving),
  so silence costs nothing, and several front-ends sharing one key (same content) keep it until the last
  lets go.

Bounds: a deleted avatar is freed on every replica within `poll_s` (+ one call) of its last holder
letting go. A front-end that dies without saying so stops renewing its lease (`lease_s`): its keys count
as released `lease_s` after its last renewal. Holdings are sent whole (idempotent), so a lost message
or a restarted registry heals with the next renewal; a registry younger than one lease answers "unknown"
(`live` returns None) and replicas drop nothing until it has heard from every live front-end.

Pure logic on an injected clock: the Ray actor wraps it; tests drive it directly.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

LEASE_S = 60.0          # a front-end's holdings lapse this long after its last renewal (a crash)
RENEW_S = 10.0          # front-ends renew this often (well inside a lease, so a slow call never lapses one)
POLL_S = 5.0            # replicas ask for the live keys this often: the bound on freeing after a delete
MAX_KEYS_PER_HOLDER = 10000  # a front-end's library is bounded far below this; a runaway one fails loudly


@dataclass
class _Holding:
    keys: frozenset[str]
    expires_at: float


class AvatarHolders:
    """Per front-end (`holder`), the avatar keys it holds, each front-end's set under a lease."""

    def __init__(self, lease_s: float = LEASE_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.lease_s = lease_s
        self.clock = clock
        self.started_at = clock()
        self._holders: dict[str, _Holding] = {}

    def set_holdings(self, holder: str, keys: Iterable[str]) -> None:
        """`holder` now holds exactly `keys` (an empty set: it holds nothing) for one more lease."""
        held = frozenset(keys)
        if len(held) > MAX_KEYS_PER_HOLDER:
            raise ValueError(f"front-end {holder!r} claims {len(held)} avatars (at most {MAX_KEYS_PER_HOLDER})")
        if held:
            self._holders[holder] = _Holding(held, self.clock() + self.lease_s)
        else:
            self._holders.pop(holder, None)

    def live(self) -> set[str] | None:
        """The keys some front-end holds; None while this registry is younger than a lease (after a
        restart it has not yet heard from every front-end, so it cannot tell that a key is free)."""
        now = self.clock()
        for holder in [h for h, held in self._holders.items() if held.expires_at <= now]:
            del self._holders[holder]
        if now - self.started_at < self.lease_s:
            return None
        return set().union(*(held.keys for held in self._holders.values()))

    def holders(self) -> dict[str, set[str]]:
        """For logs and tests: each front-end's keys."""
        return {h: set(held.keys) for h, held in self._holders.items()}
