"""Remote ICE candidates and credentials screened before `setRemoteDescription`.

Every `a=candidate` line of an offer is an address the server will send STUN connectivity checks to
(aioice pairs it with each local candidate and retries each pair), and `a=ice-ufrag` goes verbatim into
the USERNAME of those packets. Unscreened, one 58 KB offer made the server send thousands of packets to
hundreds of ports of any host it can reach, loopback and its private network included: a blind prober
of the server's own network and a reflector, for anyone who can POST /offer.

`screen_offer(sdp, policy)` is a pure function of the SDP text and the bind policy. It refuses (400):
- more than `MAX_CANDIDATES_PER_MLINE` candidates in one m-section (a browser gathers a handful per
  network interface; the cap is counted before any filtering, so it bounds what a stranger sends; with
  the server's one or two host candidates it keeps the check list under the 100 pairs RFC 8445 section
  6.1.2.5 recommends as a limit);
- a candidate line that does not parse, a candidate before the first m-line;
- an `ice-ufrag` / `ice-pwd` outside the ICE grammar (RFC 8839: ice-char = ALPHA / DIGIT / "+" / "/",
  ufrag 4-256 characters, pwd 22-256), so no attacker bytes (`|`, `:`, control characters) reach USERNAME.
It drops the candidates whose address the server must never probe and returns the SDP without them:
- always: unspecified, multicast, broadcast / reserved, link-local (169.254.0.0/16 holds the cloud
  metadata service), "this network" 0.0.0.0/8, the known cloud metadata and host-platform addresses,
  and host names other than mDNS `.local` names;
- loopback, unless the server itself is bound to loopback (a local server talks to a local browser);
- private and other non-global ranges (RFC 1918, ULA, CGNAT, documentation) and mDNS `.local` names
  (whose resolution would query, and reach, the local network), unless the server is bound to loopback
  or a private address, or `--ice-allow-private` says the public bind serves a private network too.
IPv4-mapped IPv6 addresses are judged by their IPv4 address. Peer-reflexive candidates, learned from
checks that really arrive, are aioice's and need no screening: they answer a peer that reached us.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from server.errors import ApiError

MAX_CANDIDATES_PER_MLINE = 32

_ICE_UFRAG = re.compile(r"[A-Za-z0-9+/]{4,256}")
_ICE_PWD = re.compile(r"[A-Za-z0-9+/]{22,256}")
_MDNS_NAME = re.compile(r"[A-Za-z0-9-]{1,63}\.local")  # browsers' obfuscated host candidates (uuid.local)

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Addresses that are never a peer: cloud metadata and platform endpoints outside link-local.
_METADATA = frozenset(ipaddress.ip_address(a) for a in (
    "100.100.100.200",   # Alibaba Cloud metadata
    "168.63.129.16",     # Azure host platform (wireserver, DNS)
    "fd00:ec2::254",     # AWS IPv6 metadata
    "fd00:ec2::23",      # AWS IPv6 DNS
))
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")


@dataclass(frozen=True)
class CandidatePolicy:
    """Which remote candidate addresses the server may send connectivity checks to."""

    allow_loopback: bool
    allow_private: bool
    max_per_mline: int = MAX_CANDIDATES_PER_MLINE

    @classmethod
    def for_bind(cls, host: str, allow_private: bool = False, public: bool = False) -> "CandidatePolicy":
        """The policy of a server bound to `host` (--host): loopback binds allow loopback and private
        candidates, private binds private ones, public and wildcard binds (0.0.0.0, ::, a global
        address, a name) only global ones unless `allow_private` (--ice-allow-private). `public`: the
        server is reached from the internet whatever its bind (behind a reverse proxy on loopback)."""
        address = _literal(host)
        loopback = not public and (host == "localhost" or (address is not None and address.is_loopback))
        private_bind = not public and address is not None and not address.is_unspecified \
            and not address.is_global
        return cls(allow_loopback=loopback, allow_private=loopback or private_bind or allow_private)


@dataclass(frozen=True)
class ScreenedOffer:
    sdp: str
    kept: int
    dropped: int
    dropped_reasons: dict[str, int] = field(default_factory=dict)


def _literal(host: str) -> IpAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def refusal(address: str, policy: CandidatePolicy) -> str | None:
    """Why the server must not send checks to `address` (a candidate's connection address), or None."""
    ip = _literal(address)
    if ip is None:
        if _MDNS_NAME.fullmatch(address):
            return None if policy.allow_private else "mdns"
        return "hostname"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in _METADATA:
        return "metadata"
    if ip.is_unspecified or ip.is_multicast or ip.is_link_local or (
            isinstance(ip, ipaddress.IPv4Address) and ip in _THIS_NETWORK):
        return "reserved"
    if ip.is_loopback:  # before is_reserved: ::1 lies in the reserved ::/8
        return None if policy.allow_loopback else "loopback"
    if ip.is_reserved or (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local):
        return "reserved"
    if not ip.is_global:
        return None if policy.allow_private else "private"
    return None


def _check_credential(line: str, name: str, grammar: re.Pattern[str], size: str) -> None:
    value = line.split(":", 1)[1] if ":" in line else ""
    if not grammar.fullmatch(value):
        raise ApiError(400, f"malformed SDP: a={name} must be {size} ICE characters (letters, digits, "
                            f"'+', '/'; RFC 8839)")


def _candidate_address(line: str) -> str:
    """The connection address of `a=candidate:foundation component transport priority address port typ
    type ...`; 400 for a line that does not have that shape."""
    parts = line.split()
    if len(parts) < 8 or parts[6] != "typ" or not parts[1].isdigit() or not parts[5].isdigit() \
            or not 0 < int(parts[5]) < 65536:
        raise ApiError(400, "malformed SDP: a candidate line must read 'a=candidate:foundation component "
                            "transport priority address port typ type'")
    return parts[4]


def screen_offer(sdp: str, policy: CandidatePolicy) -> ScreenedOffer:
    """`sdp` without the candidates `policy` refuses; ApiError 400 for an offer the server must not
    apply at all (see the module docstring). Line endings are kept as they were."""
    lines = sdp.splitlines(keepends=True)
    out: list[str] = []
    kept = dropped = 0
    reasons: dict[str, int] = {}
    in_media = False
    per_mline = 0
    for raw in lines:
        line = raw.rstrip("\r\n")
        if line.startswith("m="):
            in_media, per_mline = True, 0
        elif line.startswith("a=ice-ufrag"):
            _check_credential(line, "ice-ufrag", _ICE_UFRAG, "4 to 256")
        elif line.startswith("a=ice-pwd"):
            _check_credential(line, "ice-pwd", _ICE_PWD, "22 to 256")
        elif line.startswith("a=candidate"):
            if not in_media:
                raise ApiError(400, "malformed SDP: a candidate before the first m-line")
            per_mline += 1
            if per_mline > policy.max_per_mline:
                raise ApiError(400, f"too many ICE candidates: at most {policy.max_per_mline} per m-line")
            reason = refusal(_candidate_address(line), policy)
            if reason is not None:
                dropped += 1
                reasons[reason] = reasons.get(reason, 0) + 1
                continue
            kept += 1
        out.append(raw)
    return ScreenedOffer("".join(out), kept, dropped, reasons)
