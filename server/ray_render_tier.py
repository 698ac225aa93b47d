"""The render tier on Ray Serve (`--render-backend ray`): replicas hold the model, front-ends keep WebRTC.

A front-end (this server process) keeps the sessions' WebRTC peers, clocks, look-ahead, its own render
worker (deadline order, late-job skipping) and compositing. Rendering goes to a Ray Serve application
(`APP_NAME`, one deployment `RenderDeployment`) whose replicas each hold one renderer built from the
same `RendererSpec` (the built-in renderer or Wav2Lip, on CPU or GPU) and batch the due frames of every
front-end connected to them, earliest deadline first (realtime/render_tier/edf_batcher.py). Serve does
the rest: replicas placed on nodes with the GPUs and CPUs asked for, autoscaling between bounds by
ongoing requests, health checks, and a new replica when one dies.

Joining: the first front-end to reach a cluster deploys the application; later ones find it running
(same name) and use it, after checking it renders the same thing (`describe`). `--ray-address` (or
`RAY_ADDRESS`) joins an existing cluster (`ray start --head` on one machine, KubeRay on Kubernetes);
without one, `ray.init` starts a local cluster inside this process, which ends with it.

Authentication: whoever reaches a Ray cluster's ports can run code on it, and Ray's GCS listens beyond
loopback. A local cluster is therefore always started with Ray's token authentication
(`RAY_AUTH_MODE=token`) and, unless the operator gave one (`RAY_AUTH_TOKEN` / `RAY_AUTH_TOKEN_PATH`), a
fresh random token of this process (nothing written to ~/.ray). Joining an external cluster without
token authentication works but logs a warning at start.

Replicas import this project: every node needs it installed (the same version), like the front-ends.
The avatar travels once, through Ray's object store (`share_avatar`), never per frame.

Freeing (`DELETE /avatars/{id}`): Serve cannot send one call to every replica, so each front-end keeps
the set of avatar keys it serves in a small named actor per application (`AvatarHoldersActor`, named
`<app>-holders`, no CPU), renewed every `RENEW_S` as a lease; each replica polls it every
`holder_poll_s` and frees what no front-end holds (why this and not idle eviction or piggybacking:
realtime/render_tier/holders.py). A deleted avatar is gone from every replica within one poll.

Measured on the 2-core dev machine (bench/scale.py): a round trip through a Serve handle adds ~3 ms to a
render call.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import secrets
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from realtime.avatars.avatar import Avatar
from realtime.render_tier.holders import LEASE_S, POLL_S, RENEW_S, AvatarHolders
from realtime.render_tier.remote_renderer import RenderTierError
from realtime.render_tier.replica import RenderReplica, ReplicaStats
from realtime.render_tier.wire import (
    AvatarRef,
    RenderReply,
    RenderRequest,
    avatar_fingerprint,
    avatar_to_wire,
)
from realtime.renderers.factory import RendererSpec, build_renderer

log = logging.getLogger(__name__)

APP_NAME = "lipsync-render"
HOLDERS_NAMESPACE = "lipsync"   # the holders actor's (a driver's own namespace is anonymous)

# Ray reports usage statistics to its authors unless told not to: this server contacts nobody.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


import ray  # noqa: E402  (after the environment above: ray reads it at import)
from ray import serve  # noqa: E402


@dataclass(frozen=True)
class RayTierSettings:
    """How to reach the cluster and how Serve should size the deployment (ServerConfig's --ray-* flags)."""

    address: str | None = None       # None: RAY_ADDRESS, else a local cluster started here
    replicas: int = 1                # fixed replica count (when no autoscaling bounds are given)
    min_replicas: int | None = None  # autoscaling between these bounds by ongoing requests
    max_replicas: int | None = None
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    max_batch: int = 8               # frames per replica renderer call
    max_wait_ms: float = 4.0         # a replica's wait for other front-ends' frames
    local_cpus: int | None = None    # CPUs of a local cluster (None: all)
    app_name: str = APP_NAME
    holder_lease_s: float = LEASE_S  # a front-end's avatars count as held this long after its last renewal
    holder_renew_s: float = RENEW_S
    holder_poll_s: float = POLL_S    # replicas free avatars nobody holds within this

    @property
    def holders_name(self) -> str:
        return f"{self.app_name}-holders"

    def deployment_options(self) -> dict[str, Any]:
        actor = {"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica}
        if self.min_replicas is not None or self.max_replicas is not None:
            low = self.min_replicas if self.min_replicas is not None else 1
            high = self.max_replicas if self.max_replicas is not None else max(low, self.replicas)
            return {"ray_actor_options": actor,
                    "autoscaling_config": {"min_replicas": low, "max_replicas": high,
                                           "target_ongoing_requests": 4}}
        return {"ray_actor_options": actor, "num_replicas": self.replicas}


@serve.deployment(max_ongoing_requests=256, health_check_period_s=2.0, health_check_timeout_s=30.0,
                  graceful_shutdown_timeout_s=2.0)
class RenderDeployment:
    """One replica: a renderer (built here, on the replica's node and device) behind an EDF batcher."""

    def __init__(self, spec: RendererSpec, max_batch: int, max_wait_s: float, holders_name: str = "",
                 poll_s: float = POLL_S) -> None:
        self._spec = spec
        self._holders_name = holders_name
        self._holders: Any = None
        self._poll_s = poll_s
        self._sweeper: asyncio.Future[Any] | None = None
        try:
            name = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (never in production)
            name = f"replica-{os.getpid()}"
        self._replica = RenderReplica(build_renderer(spec), fetch_avatar=ray.get, max_batch=max_batch,
                                      max_wait_s=max_wait_s, name=str(name))

    async def render(self, request: RenderRequest) -> RenderReply:
        if self._sweeper is None and self._holders_name:  # started here: the replica's event loop runs
            self._sweeper = asyncio.ensure_future(self._replica.run_sweeps(self._live_keys, self._poll_s))
        return await self._replica.render(request)

    async def _live_keys(self) -> set[str] | None:
        if self._holders is None:
            self._holders = ray.get_actor(self._holders_name, namespace=HOLDERS_NAMESPACE)
        try:
            live: set[str] | None = await self._holders.live.remote()
            return live
        except Exception:
            self._holders = None  # look it up again next time (a restarted actor)
            raise

    def stats(self) -> ReplicaStats:
        return self._replica.stats()

    def describe(self) -> RendererSpec:
        return self._spec


class AvatarHoldersActor:
    """The Ray actor around `AvatarHolders` (one per application; calls from one caller run in order)."""

    def __init__(self, lease_s: float) -> None:
        self._holders = AvatarHolders(lease_s)

    def set_holdings(self, holder: str, keys: list[str]) -> None:
        self._holders.set_holdings(holder, keys)

    def live(self) -> set[str] | None:
        return self._holders.live()

    def holders(self) -> dict[str, set[str]]:
        return self._holders.holders()


class RayRenderTier:
    """The front-end's client of the Ray render tier (a `RenderTierClient`)."""

    def __init__(self, handle: Any, settings: RayTierSettings, started_cluster: bool,
                 holders: Any = None) -> None:
        self._handle = handle
        self.settings = settings
        self._started_cluster = started_cluster
        # This front-end's avatar keys, counted (two library avatars may have the same content), and the
        # registry they are declared in; a thread renews the declaration every holder_renew_s.
        self.holder_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._holders = holders
        self._held: Counter[str] = Counter()
        self._held_lock = threading.Lock()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        if holders is not None:
            self._renewer = threading.Thread(target=self._renew, name="ray-avatar-holdings", daemon=True)
            self._renewer.start()

    @classmethod
    def connect(cls, settings: RayTierSettings, spec: RendererSpec) -> RayRenderTier:
        """Join (or start) the cluster and the render application. RenderTierError, with what to do, when
        the cluster cannot be reached or runs a render tier for another model."""
        address = settings.address or os.environ.get("RAY_ADDRESS") or None
        started = False
        if not ray.is_initialized():
            where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
            try:
                if address:
                    host = _probe(address)
                    # A cluster on loopback: this node is 127.0.0.1 too (Ray would pick an interface address).
                    node_ip = "127.0.0.1" if host and ipaddress.ip_address(_resolve(host)).is_loopback else None
                    ray.init(address=address, log_to_driver=False, _node_ip_address=node_ip)
                    warn_unless_token_auth(address, token_auth_enabled())
                else:
                    # A cluster of this process alone: nothing outside this machine needs to reach it.
                    use_token_auth_for_local_cluster()
                    ray.init(num_cpus=settings.local_cpus, include_dashboard=False, log_to_driver=False,
                             _node_ip_address="127.0.0.1")
                    started = True
            except Exception as exc:
                hint = ("Start a cluster with `ray start --head` and pass its address with --ray-address"
                        if "InvalidAuthToken" not in str(exc) else
                        "The cluster uses token authentication: set RAY_AUTH_MODE=token and make its token "
                        "available (~/.ray/auth_token or RAY_AUTH_TOKEN)")
                raise RenderTierError(f"--render-backend ray: cannot reach {where}: {exc}. {hint}") from None
        t0 = time.monotonic()
        try:
            serve.start(http_options={"location": "NoServer"})
            handle = cls._existing(settings.app_name)
            if handle is None:
                log.info("deploying the render tier", extra={"app": settings.app_name, **settings.deployment_options()})
                # serve.deployment turns the class into a Deployment (its stubs still say "type").
                deployment = RenderDeployment.options(**settings.deployment_options())  # type: ignore[attr-defined]
                app = deployment.bind(spec, settings.max_batch, settings.max_wait_ms / 1000.0,
                                      settings.holders_name, settings.holder_poll_s)
                handle = serve.run(app, name=settings.app_name, route_prefix=None)
            else:
                running = handle.describe.remote().result(timeout_s=60)
                if running != spec:
                    raise RenderTierError(f"the Ray cluster already runs render tier {settings.app_name!r} for "
                                          f"{running}, not {spec}: use another --ray-app-name")
            # Detached: it outlives the front-end that made it (a shared cluster's others still need it).
            holders = ray.remote(num_cpus=0, max_restarts=-1)(AvatarHoldersActor).options(
                name=settings.holders_name, namespace=HOLDERS_NAMESPACE, lifetime="detached",
                get_if_exists=True).remote(settings.holder_lease_s)
        except RenderTierError:
            raise
        except Exception as exc:
            raise RenderTierError(f"--render-backend ray: the render tier did not start: {exc}") from None
        log.info("render tier ready", extra={"app": settings.app_name, "seconds": round(time.monotonic() - t0, 1),
                                             "cluster": address or "local"})
        return cls(handle, settings, started, holders)

    @staticmethod
    def _existing(app_name: str) -> Any | None:
        status = serve.status().applications.get(app_name)
        if status is None or status.status in ("DELETING", "DEPLOY_FAILED"):
            return None
        return serve.get_app_handle(app_name)

    def share_avatar(self, avatar: Avatar) -> AvatarRef:
        """Put the avatar in the object store and declare that this front-end holds its key (waited for,
        so no replica's sweep can miss it once the avatar is rendered)."""
        ref = AvatarRef(avatar_fingerprint(avatar), ray.put(avatar_to_wire(avatar)))
        with self._held_lock:
            self._held[ref.key] += 1
            declared = self._declare()
        if declared is not None:
            try:
                ray.get(declared, timeout=60)
            except Exception as exc:  # replicas keep everything while they cannot read the registry
                log.warning("the render tier did not record this front-end's avatar %s (%s)", ref.key[:8], exc)
        return ref

    def forget_avatar(self, ref: AvatarRef) -> None:
        """This front-end no longer serves `ref` (one of its `share_avatar`s): replicas free its key once
        no front-end holds it. Not waited for; a lost message is repaired by the next renewal."""
        with self._held_lock:
            if self._held[ref.key] <= 1:
                del self._held[ref.key]
            else:
                self._held[ref.key] -= 1
            self._declare()

    def held_keys(self) -> set[str]:
        with self._held_lock:
            return set(self._held)

    def _declare(self) -> Any:
        """Send this front-end's whole holdings (under _held_lock: so calls reach the actor in order)."""
        if self._holders is None:
            return None
        try:
            return self._holders.set_holdings.remote(self.holder_id, sorted(self._held))
        except Exception as exc:
            log.warning("cannot declare this front-end's avatars to the render tier (%s)", exc)
            return None

    def _renew(self) -> None:
        while not self._stop.wait(self.settings.holder_renew_s):
            with self._held_lock:
                self._declare()

    def render(self, request: RenderRequest, timeout_s: float) -> RenderReply:
        response = self._handle.render.remote(request)
        try:
            reply: RenderReply = response.result(timeout_s=timeout_s)  # Ray's handle: untyped
            return reply
        except Exception as exc:  # dead or restarting replica, timeout, serialisation: all mean "no patches"
            response.cancel()
            raise RenderTierError(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None

    def replica_stats(self, timeout_s: float = 5.0) -> ReplicaStats:
        """Statistics of one replica (Serve picks which)."""
        stats: ReplicaStats = self._handle.stats.remote().result(timeout_s=timeout_s)  # Ray's handle: untyped
        return stats

    def close(self) -> None:
        """Leave the cluster. A local cluster started here ends with it; a shared one keeps serving (and
        frees this front-end's avatars that no other front-end holds)."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
        with self._held_lock:
            self._held.clear()
            self._declare()
        if self._started_cluster:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()


def use_token_auth_for_local_cluster() -> None:
    """Ray token authentication for the cluster this process is about to start: RAY_AUTH_MODE=token
    (its head processes and workers inherit the environment) and a per-process token unless the operator
    set one. Ray reads the mode into its cached config once; `Config.initialize` re-reads it, as Ray's
    own `ray.init` does when it turns token mode on (ray/_private/authentication). Ray >= 2.52."""
    os.environ["RAY_AUTH_MODE"] = "token"
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    from ray._raylet import Config  # type: ignore[attr-defined]  # (a compiled module without stubs)

    Config.initialize("")


def token_auth_enabled() -> bool:
    """Whether this process talks to its cluster with Ray token authentication (a cluster that requires
    it refuses a client without it, so a joined cluster with this False has none)."""
    from ray._raylet import AuthenticationMode, get_authentication_mode  # type: ignore[attr-defined]

    return bool(get_authentication_mode() == AuthenticationMode.TOKEN)


def warn_unless_token_auth(address: str, enabled: bool) -> None:
    if not enabled:
        log.warning("the Ray cluster at %s runs without token authentication: anyone who can reach its "
                    "ports can run code on every node (and read the avatars and audio sent there). Start it "
                    "with RAY_AUTH_MODE=token and give this front-end its token (RAY_AUTH_TOKEN or "
                    "RAY_AUTH_TOKEN_PATH)", address)


def _resolve(host: str) -> str:
    return str(socket.getaddrinfo(host, None)[0][4][0])


def _probe(address: str, timeout_s: float = 3.0) -> str | None:
    """Fail fast on a `host:port` nobody listens on (ray.init would retry for minutes). Returns the host;
    None for the forms Ray resolves itself (`auto`, `ray://`)."""
    if address == "auto" or "://" in address:
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected host:port, not {address!r}")
    host = host.strip("[]")
    with socket.create_connection((host, int(port)), timeout=timeout_s):
        pass
    return host
