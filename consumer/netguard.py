"""SSRF guard: which hosts and addresses an image fetch may connect to.

The check runs on the *resolved* address, never on the URL's spelling (``http://2130706433/``
and ``http://0x7f.1/`` are both 127.0.0.1), once per redirect hop, and the fetcher then
connects to exactly the address that passed, so a DNS answer that changes between check and
connect (rebinding) cannot steer the connection elsewhere.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
    ip_network,
)

from clipguard.consumer.errors import SourceError

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
Resolver = Callable[..., list[tuple]]

#: Why an address is refused; shown in messages (the metric reason stays ``ssrf_refused``).
CATEGORIES = (
    "metadata",
    "loopback",
    "private",
    "link_local",
    "cgnat",
    "unspecified",
    "multicast",
    "reserved",
)


def _rules(pairs: Iterable[tuple[str, str]]) -> tuple[tuple[IPNetwork, str], ...]:
    return tuple((ip_network(net), category) for net, category in pairs)


# Order matters: specific metadata endpoints before the ranges that contain them.
_V4_RULES = _rules(
    [
        ("169.254.169.254/32", "metadata"),  # AWS, GCP, Azure, OCI, DigitalOcean, ...
        ("169.254.170.2/32", "metadata"),  # AWS ECS task credentials
        ("100.100.100.200/32", "metadata"),  # Alibaba Cloud
        ("168.63.129.16/32", "metadata"),  # Azure WireServer (a public address!)
        ("0.0.0.0/8", "unspecified"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "cgnat"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link_local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "reserved"),
        ("192.0.2.0/24", "reserved"),
        ("192.88.99.0/24", "reserved"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "reserved"),
        ("198.51.100.0/24", "reserved"),
        ("203.0.113.0/24", "reserved"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),  # includes 255.255.255.255
    ]
)
_V6_RULES = _rules(
    [
        ("fd00:ec2::254/128", "metadata"),  # AWS IMDS over IPv6
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/8", "reserved"),  # IPv4-compatible and other legacy forms
        ("64:ff9b:1::/48", "private"),  # local-use NAT64
        ("100::/64", "reserved"),  # discard
        ("2001::/23", "reserved"),  # IETF protocol assignments, Teredo included
        ("2001:db8::/32", "reserved"),
        ("3fff::/20", "reserved"),
        ("5f00::/16", "reserved"),
        ("fc00::/7", "private"),
        ("fe80::/10", "link_local"),
        ("fec0::/10", "private"),
        ("ff00::/8", "multicast"),
    ]
)
_GLOBAL_UNICAST_V6 = ip_network("2000::/3")
_NAT64 = ip_network("64:ff9b::/96")

#: Names of cloud metadata services; refused by name even when an allow-listed CIDR
#: would cover the address they resolve to.
METADATA_HOSTS = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
    }
)


def _embedded_v4(address: IPv6Address) -> IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, NAT64, 6to4), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def classify(address: IPAddress) -> str | None:
    """The reason ``address`` is not a public unicast address, or None when it is one.

    Own tables rather than ``ipaddress``'s ``is_private`` & co., whose answers changed
    between Python versions; IPv6 forms that embed an IPv4 address are judged by it.
    """
    if isinstance(address, IPv6Address):
        embedded = _embedded_v4(address)
        if embedded is not None:
            return classify(embedded)
        rules = _V6_RULES
    else:
        rules = _V4_RULES
    for network, category in rules:
        if address in network:
            return category
    if isinstance(address, IPv6Address) and address not in _GLOBAL_UNICAST_V6:
        return "reserved"
    return None


def parse_cidrs(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    """CIDRs from settings; raises ValueError naming the bad entry."""
    networks = []
    for value in values:
        try:
            networks.append(ip_network(value.strip(), strict=True))
        except ValueError as exc:
            raise ValueError(
                f"{value!r} is not a CIDR like 10.1.0.0/16 or fd00::/8: {exc}"
            ) from None
    return tuple(networks)


def normalize_host(host: str) -> str:
    """Lower case, no trailing dot, IDNA (ASCII) form; raises ValueError when impossible."""
    host = host.strip().rstrip(".").lower()
    if not host:
        raise ValueError("empty host name")
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise ValueError(f"host name {host!r} is not valid: {exc}") from None


def parse_host_patterns(values: Iterable[str]) -> tuple[str, ...]:
    """Host allow-list entries: ``cdn.example.com`` exactly or ``*.example.com`` subdomains."""
    patterns = []
    for value in values:
        wildcard = value.strip().startswith("*.")
        name = normalize_host(value.strip()[2:] if wildcard else value)
        if "*" in name or "/" in name or ":" in name:
            raise ValueError(f"{value!r} is not a host name or *.domain pattern")
        patterns.append("*." + name if wildcard else name)
    return tuple(patterns)


@dataclass(frozen=True)
class Resolved:
    """One address a host resolved to, with what ``socket.connect`` needs to reach it."""

    address: IPAddress
    family: int
    sockaddr: tuple


def _refused(message: str) -> SourceError:
    return SourceError(message, "ssrf_refused", permanent=True)


class AddressGuard:
    """Resolves a host once and returns only the addresses a fetch may connect to.

    ``allow_cidrs`` re-admits ranges refused by default (e.g. ``127.0.0.1/32`` in tests, an
    internal image store's subnet); ``allow_hosts``, when non-empty, narrows fetching to
    those hosts. Neither ever bypasses the other, and metadata host names stay refused.
    """

    def __init__(
        self,
        allow_cidrs: Sequence[str] = (),
        allow_hosts: Sequence[str] = (),
        resolver: Resolver = socket.getaddrinfo,
    ) -> None:
        self.allow_networks = parse_cidrs(allow_cidrs)
        self.allow_hosts = parse_host_patterns(allow_hosts)
        self.resolver = resolver

    def refusal(self, address: IPAddress) -> str | None:
        """Why the guard refuses ``address``, or None when a fetch may connect to it."""
        if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in network for network in self.allow_networks):
            return None
        return classify(address)

    def check_host(self, host: str) -> None:
        """Refuse metadata names and hosts outside the host allow list, before any DNS."""
        if host in METADATA_HOSTS:
            raise _refused(f"host {host} is a cloud metadata service")
        if self.allow_hosts and not any(_host_matches(host, p) for p in self.allow_hosts):
            raise _refused(f"host {host} is not in fetch_allow_hosts")

    def resolve(self, host: str, port: int) -> list[Resolved]:
        """The allowed addresses of ``host`` in resolver order; SourceError if there are none."""
        self.check_host(host)
        try:
            infos = self.resolver(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        except socket.gaierror as exc:
            temporary = exc.errno == getattr(socket, "EAI_AGAIN", None)
            raise SourceError(
                f"cannot resolve {host}: {exc.strerror or exc}", "dns_failed", not temporary
            ) from exc
        except (UnicodeError, ValueError) as exc:
            raise SourceError(f"cannot resolve {host}: {exc}", "bad_url") from exc
        allowed: list[Resolved] = []
        refused: list[str] = []
        for family, _type, _proto, _canon, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            address = ip_address(str(sockaddr[0]).split("%", 1)[0])
            category = self.refusal(address)
            if category is None:
                if all(r.address != address for r in allowed):
                    allowed.append(Resolved(address, family, tuple(sockaddr)))
            else:
                refused.append(f"{address} ({category})")
        if allowed:
            return allowed
        if refused:
            raise _refused(f"host {host} resolves only to refused addresses: {', '.join(refused)}")
        raise SourceError(f"host {host} has no IPv4 or IPv6 address", "dns_failed")


def _host_matches(host: str, pattern: str) -> bool:
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern
