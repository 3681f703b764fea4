"""Webhook signatures: HMAC-SHA256 of "<timestamp>.<body>" with the tenant's secret.

Headers sent with every delivery:
    X-Condenser-Timestamp: 1764300000                 (Unix seconds when this attempt was signed)
    X-Condenser-Signature: sha256=<hex digest>
A receiver recomputes the digest over the timestamp, a dot and the raw body, compares in constant time,
and refuses timestamps older than a few minutes (a replayed request). `verify` does exactly that.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-Condenser-Signature"
TIMESTAMP_HEADER = "X-Condenser-Timestamp"
EVENT_HEADER = "X-Condenser-Event"
DELIVERY_HEADER = "X-Condenser-Delivery"
DEFAULT_TOLERANCE_SECONDS = 300
MAX_TIMESTAMP_DIGITS = 20


def signature(secret: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def signed_headers(secret: str, body: bytes, now: float | None = None) -> dict[str, str]:
    timestamp = str(int(time.time() if now is None else now))
    return {TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: signature(secret, timestamp, body)}


def verify(secret: str, timestamp: str, signature_header: str, body: bytes,
           tolerance_seconds: float = DEFAULT_TOLERANCE_SECONDS, now: float | None = None) -> bool:
    """True if the body was signed with `secret` within `tolerance_seconds` of now."""
    # ASCII digits only: str.isdigit() also accepts "²" (int() refuses it) or fullwidth digits; and few enough
    # for int() (it refuses over 4300 digits). A header is untrusted input: anything malformed is simply False.
    if not (timestamp.isascii() and timestamp.isdigit()) or len(timestamp) > MAX_TIMESTAMP_DIGITS:
        return False
    if abs((time.time() if now is None else now) - int(timestamp)) > tolerance_seconds:
        return False
    # compare_digest raises TypeError on non-ASCII str; bytes it compares whatever they hold.
    return hmac.compare_digest(signature(secret, timestamp, body).encode(),
                               signature_header.encode("utf-8", "surrogatepass"))
