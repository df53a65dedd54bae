"""The client a request limit counts: one IPv4 address, or one IPv6 /64 network.

A host on IPv6 is routinely given a whole /64 and can pick any address in it, so counting IPv6 addresses one by
one would let a single client register (or guess passwords) without limit. IPv4-mapped IPv6 addresses count as
their IPv4 address. Anything that is not an IP address (a test client's name) counts as it is.
"""
from __future__ import annotations

import ipaddress

IPV6_CLIENT_PREFIX = 64


def client_network(address: str | None) -> str:
    """The key the registration limits and the login throttle count `address` under."""
    text = str(address or "").strip()
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return text or "unknown"
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/{IPV6_CLIENT_PREFIX}", strict=False))
    return str(ip)
