"""Rate limits: who a request is, for the purpose of counting it."""

from __future__ import annotations

from datetime import timedelta

from quart import Quart, current_app, request
from quart_rate_limiter import KeyCallable, RateLimit, RateLimiter

from .config import Config
from .errors import APIError
from .security import bearer_claims


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


async def caller_key() -> str:
    """The user when the request carries a valid access token, else the address."""
    try:
        claims = bearer_claims()
    except APIError:  # a bad token: require_auth refuses it; count it by address
        claims = None
    return f"user:{claims.user_id}" if claims else await address_key()


async def email_key() -> str:
    """The email a login or registration is for, whichever address it comes from."""
    body = await request.get_json(silent=True)
    email = body.get("email") if isinstance(body, dict) else None
    if not isinstance(email, str):
        return await address_key()
    return f"email:{email.strip().lower()[:320]}"


class PerMinuteFromConfig(RateLimit):
    """A per-minute limit whose count is a setting of the running app's Config,
    so that route decorators, written at import, follow the configuration."""

    def __init__(self, setting: str, key_function: KeyCallable) -> None:
        self.setting = setting
        self.period = timedelta(minutes=1)
        self.key_function = key_function
        self.skip_function = None

    @property
    def count(self) -> int:  # type: ignore[override]
        count: int = getattr(current_app.config["TASKFLOW"], self.setting)
        return count


# Login and registration: per address and per email, on top of the default.
AUTH_LIMITS: list[RateLimit] = [
    PerMinuteFromConfig("auth_rate_limit_per_minute", address_key),
    PerMinuteFromConfig("auth_rate_limit_per_minute", email_key),
]


def init_app(app: Quart, config: Config) -> None:
    RateLimiter(
        app,
        key_function=caller_key,
        default_limits=[RateLimit(config.rate_limit_per_minute, timedelta(minutes=1))],
        enabled=config.rate_limit_enabled,
    )
