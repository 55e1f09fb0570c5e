"""Which network addresses a server may fetch user-named URLs from.

A URL a client sends must not make the server reach inside its own network (SSRF): loopback,
private and link-local ranges (where cloud metadata services live, 169.254.169.254 and
fd00:ec2::254), carrier-grade NAT, multicast and the special-purpose blocks. IPv6 forms that
carry an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::a.b.c.d``, 6to4
``2002:aabb:ccdd::``) are judged by the IPv4 address inside them, since that is where the packets
go. The ranges are listed here rather than taken from ``ipaddress.is_global``, whose answers
change between Python versions and miss multicast, NAT64 and site-local addresses.
"""

from __future__ import annotations

import ipaddress

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_V4_BLOCKS = tuple((ipaddress.IPv4Network(net), kind) for net, kind in (
    ("0.0.0.0/8", "unspecified"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),  # incl. cloud metadata at 169.254.169.254
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "reserved"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "reserved"),  # the retired 6to4 relay anycast block
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),  # incl. the broadcast address 255.255.255.255
))

_V6_BLOCKS = tuple((ipaddress.IPv6Network(net), kind) for net, kind in (
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("64:ff9b:1::/48", "private"),  # local-use NAT64
    ("::/8", "reserved"),  # incl. the deprecated IPv4-compatible ::a.b.c.d
    ("100::/64", "reserved"),  # discard-only
    ("2001::/23", "reserved"),  # IETF protocol assignments, incl. Teredo tunnels 2001::/32
    ("2001:db8::/32", "documentation"),
    ("fc00::/7", "private"),  # unique local, incl. cloud metadata at fd00:ec2::254
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
))

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def private_address_kind(address: str | Address) -> str | None:
    """``None`` for a public address; otherwise what it is, e.g. ``"loopback"`` or
    ``"link-local (IPv4 169.254.169.254 inside an IPv4-mapped IPv6 address)"``.

    ``address`` is an IP address (an IPv6 zone such as ``%eth0`` is allowed); raises
    ValueError for anything else.
    """
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            inner, form = embedded
            kind = private_address_kind(inner)
            return None if kind is None else f"{kind} (IPv4 {inner} inside {form})"
        blocks: tuple = _V6_BLOCKS
    else:
        blocks = _V4_BLOCKS
    plain = ipaddress.ip_address(str(ip).split("%", 1)[0])
    for network, kind in blocks:  # the first match names it
        if plain in network:
            return kind
    if not plain.is_global:  # a block added to the registries after this table was written
        return "reserved"
    return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, "an IPv4-mapped IPv6 address"
    if ip.sixtofour is not None:
        return ip.sixtofour, "a 6to4 IPv6 address"
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "a NAT64 IPv6 address"
    return None
