"""Rate limits: who a request is, for the purpose of counting it."""

from __future__ import annotations

from datetime import timedelta

from quart import Quart, current_app, request
from quart_rate_limiter import RateLimit, RateLimiter

from .config import Config


def client_address() -> str:
    """The client's address: the socket peer, or the ``X-Forwarded-For`` entry
    added by the outermost of the configured number of trusted proxies.

    Entries left of those are whatever the client sent, so they are never used.
    """
    config: Config = current_app.config["TASKFLOW"]
    peer = request.remote_addr or "unknown"
    hops = config.trusted_proxy_hops
    if hops == 0:
        return peer
    forwarded = [
        entry.strip()
        for header in request.headers.getlist("X-Forwarded-For")
        for entry in header.split(",")
        if entry.strip()
    ]
    if len(forwarded) < hops:
        return forwarded[0] if forwarded else peer
    return forwarded[-hops]


async def address_key() -> str:
    return f"ip:{client_address()}"


def init_app(app: Quart, config: Config) -> None:
    RateLimiter(
        app,
        key_function=address_key,
        default_limits=[RateLimit(config.rate_limit_per_minute, timedelta(minutes=1))],
        enabled=config.rate_limit_enabled,
    )
