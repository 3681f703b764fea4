"""Where the service may send webhooks: never to its own network.

A target must be https (http only when CONDENSER_WEBHOOK_ALLOW_HTTP is set, for local testing), carry no
credentials, and every address its host resolves to must be a public one: private, loopback, link-local,
multicast, reserved and unspecified addresses are refused unless they fall in
CONDENSER_WEBHOOK_ALLOWED_NETWORKS. So is an IPv6 address that embeds such an IPv4 address (IPv4-mapped and
-compatible, NAT64, 6to4, Teredo): it reaches, or is translated to, that IPv4 host. The check runs when the
URL is given (a 422) and again before each delivery, whose connection then goes to the address just checked,
so a DNS answer that changes in between (DNS rebinding) cannot aim the service at an internal host.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from core.errors import Invalid
from core.settings import Settings

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_URL_LENGTH = 2048


class RefusedTarget(Invalid):
    """A webhook URL the service will not call."""


def check_target(url: str, settings: Settings) -> list[IpAddress]:
    """The addresses `url` may be delivered to (at least one), or RefusedTarget saying why not."""
    host = _checked_host(url, settings)
    addresses = resolve(host)
    for address in addresses:
        _check_address(url, address, settings, resolved_from=None if _is_address(host) else host)
    return addresses


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _checked_host(url: str, settings: Settings) -> str:
    if len(url) > MAX_URL_LENGTH:
        raise RefusedTarget(f"webhook URL is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port out of range
    except ValueError as exc:
        raise RefusedTarget(f"webhook URL {url!r} is malformed: {exc}") from None
    allowed_schemes = ("https", "http") if settings.webhook_allow_http else ("https",)
    if parts.scheme not in allowed_schemes:
        raise RefusedTarget(f"webhook URL must use {' or '.join(allowed_schemes)}, not {parts.scheme or 'nothing'!r}")
    if parts.username is not None or parts.password is not None:
        raise RefusedTarget("webhook URL must not carry credentials (the signature authenticates the sender)")
    if not parts.hostname:
        raise RefusedTarget(f"webhook URL {url!r} has no host")
    return parts.hostname


def resolve(host: str) -> list[IpAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        answers = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        # The resolver's own words (and its configuration) are the operator's business, not the client's.
        raise RefusedTarget(f"webhook host {host!r} does not resolve") from None
    # Scope ids ("fe80::1%eth0") are not part of the address; the check must see the address alone.
    return list(dict.fromkeys(ipaddress.ip_address(str(answer[4][0]).split("%")[0]) for answer in answers))


def _check_address(url: str, address: IpAddress, settings: Settings, resolved_from: str | None) -> None:
    if _allowed(address, settings):
        return
    # An IPv6 address that carries an IPv4 one (::ffff:10.0.0.1, 64:ff9b::10.0.0.1, 2002:a00:1::, ...) reaches,
    # or is translated to, that IPv4 host: it is judged too, by the same rules. The IPv6 address itself is
    # judged as well, except an IPv4-mapped one, which is only a notation of the IPv4 address.
    embedded = embedded_ipv4(address) if isinstance(address, ipaddress.IPv6Address) else []
    own = [] if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped else [address]
    for judged in [*embedded, *own]:
        if not _allowed(judged, settings) and not _public(judged):
            raise RefusedTarget(_refusal(url, address, judged, resolved_from))


def _refusal(url: str, address: IpAddress, judged: IpAddress, resolved_from: str | None) -> str:
    kinds = "a private, loopback, link-local, multicast or reserved address; webhooks go to public addresses only"
    if resolved_from is not None:
        # Which internal address a name resolves to maps the service's network for whoever asks: not shown.
        return f"webhook host {resolved_from!r} resolves to {kinds}"
    reaching = f" (which reaches {judged})" if judged != address else ""
    return f"webhook URL {url!r} is {address}{reaching}, {kinds}"


def _allowed(address: IpAddress, settings: Settings) -> bool:
    return any(address in network for network in settings.webhook_networks)


def _public(address: IpAddress) -> bool:
    # is_global alone would pass multicast (224.0.0.0/4 counts as global).
    return address.is_global and not address.is_multicast


# NAT64 prefixes: a translator sends on to the IPv4 address in the last 32 bits (RFC 6052 /96 layout).
NAT64_PREFIXES = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated (RFC 4291): ::a00:1 is 10.0.0.1


def embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address embeds, where a connection to it may end up (none for most)."""
    if address.ipv4_mapped:
        return [address.ipv4_mapped]
    if address.sixtofour:  # 6to4, 2002::/16: relayed to the IPv4 address in bits 16-47
        return [address.sixtofour]
    if address.teredo:  # Teredo, 2001::/32: (server, client), the client's address de-obfuscated
        return list(dict.fromkeys(address.teredo))
    if address in IPV4_COMPATIBLE or any(address in prefix for prefix in NAT64_PREFIXES):
        return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    return []
