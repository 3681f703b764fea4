"""Where the service may send webhooks: never to its own network.

A target must be https (http only when CONDENSER_WEBHOOK_ALLOW_HTTP is set, for local testing), carry no
credentials, and every address its host resolves to must be a public one: private, loopback, link-local,
multicast, reserved and unspecified addresses are refused unless they fall in
CONDENSER_WEBHOOK_ALLOWED_NETWORKS. The check runs when the URL is given (a 422) and again before each
delivery, whose connection then goes to the address just checked, so a DNS answer that changes in between
(DNS rebinding) cannot aim the service at an internal host.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from app.config import Settings
from app.errors import Invalid

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_URL_LENGTH = 2048


class RefusedTarget(Invalid):
    """A webhook URL the service will not call."""


def check_target(url: str, settings: Settings) -> list[IpAddress]:
    """The addresses `url` may be delivered to (at least one), or RefusedTarget saying why not."""
    host = _checked_host(url, settings)
    addresses = resolve(host)
    for address in addresses:
        _check_address(url, address, settings)
    return addresses


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
    except (socket.gaierror, UnicodeError) as exc:
        raise RefusedTarget(f"webhook host {host!r} does not resolve: {exc}") from None
    # Scope ids ("fe80::1%eth0") are not part of the address; the check must see the address alone.
    return list(dict.fromkeys(ipaddress.ip_address(str(answer[4][0]).split("%")[0]) for answer in answers))


def _check_address(url: str, address: IpAddress, settings: Settings) -> None:
    if any(address in network for network in settings.webhook_networks):
        return
    # An IPv4-mapped IPv6 address (::ffff:10.0.0.1) reaches the IPv4 host: judge that one.
    effective = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped else address
    # is_global alone would pass multicast (224.0.0.0/4 counts as global).
    if not effective.is_global or effective.is_multicast:
        raise RefusedTarget(f"webhook URL {url!r} resolves to {address}, a private, loopback, link-local, multicast "
                            "or reserved address; webhooks go to public addresses only")
