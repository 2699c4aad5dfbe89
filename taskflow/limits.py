"""Rate limits: who a request is, and an atomic GCRA shared by every instance.

Routes declare their limits with quart-rate-limiter's decorators and are
refused with its 429; ``Limiter`` enforces them, each in one atomic step: a
Lua script in Redis (keys expire once the bucket is full again), or a dict in
process memory for the embedded default.
When Redis does not answer, limits fall back to process memory (logged once)
and return to Redis by themselves when it does.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from quart import Quart, Response, current_app, g, has_websocket_context, request, websocket
from quart_rate_limiter import (
    QUART_RATE_LIMITER_EXEMPT_ATTRIBUTE,
    QUART_RATE_LIMITER_LIMITS_ATTRIBUTE,
    RateLimit,
    RateLimitExceeded,
)
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from .config import Config
from .db import backends
from .errors import APIError
from .read_ahead import ReadAhead, read_ahead
from .redis_gate import RedisUnavailable
from .schemas import normalize_email
from .security import (
    accept_caller,
    request_caller,
    session_mark_key,
    unchecked_request_caller,
)

EXTENSION_KEY = "taskflow.limiter"

# A request's one round trip to Redis before its view runs: its caller's
# session mark, the GCRA of each of its limits, and the cache entries its view
# will read (``read_ahead``). KEYS: [the session mark,] the limits' buckets,
# the keys to read. ARGV[1]: 1 when KEYS[1] is a session mark, else 0;
# ARGV[2]: the number of buckets; then each bucket's emission interval and
# burst tolerance, in µs; then, optionally, the names of keys to read next,
# space separated, '{}' standing for the first word of the first value read
# after its generation (a task's cache entry: its project's id).
# Returns {mark} alone, nothing spent, when a session mark is not '1' (the
# session is then checked apart). Else {mark, then for each bucket: allowed,
# µs until a request would be allowed, µs until the bucket is full; then the
# values read; then the word found and the values read next}.
ADMISSION_SCRIPT = """
local marked = tonumber(ARGV[1])
local mark = false
if marked == 1 then
  mark = redis.call('GET', KEYS[1])
  if mark ~= '1' then return {mark} end
end
local buckets = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {mark}
for i = 1, buckets do
  local key = KEYS[marked + i]
  local interval = tonumber(ARGV[1 + 2 * i])
  local tolerance = tonumber(ARGV[2 + 2 * i])
  local tat = math.max(tonumber(redis.call('GET', key) or now), now)
  if tat - tolerance > now then
    out[#out + 1] = 0
    out[#out + 1] = tat - tolerance - now
  else
    tat = tat + interval
    redis.call('SET', key, tat, 'PX', math.max(1, math.ceil((tat - now) / 1000)))
    out[#out + 1] = 1
    out[#out + 1] = 0
  end
  out[#out + 1] = tat - now
end
for i = marked + buckets + 1, #KEYS do
  out[#out + 1] = redis.call('GET', KEYS[i])
end
local next_names = ARGV[3 + 2 * buckets]
if next_names then
  local first = out[2 + 3 * buckets]
  local word = first and string.match(first, '^[^:]*:([%w-]+) ')
  out[#out + 1] = word or false
  if word then
    for name in string.gmatch(next_names, '%S+') do
      -- Named by a value, not declared in KEYS: one Redis, not a cluster.
      out[#out + 1] = redis.call('GET', (string.gsub(name, '{}', word)))
    end
  end
end
return out
"""


@dataclass(frozen=True)
class Decision:
    """One limit's verdict on one request."""

    allowed: bool
    limit: int
    remaining: int
    retry_after: float  # seconds until a request would be allowed
    reset: float  # seconds until the bucket is full again

    @classmethod
    def of(cls, limit: RateLimit, allowed: bool, wait_us: float, full_us: float) -> Decision:
        interval_us = limit.inverse * 1_000_000
        period_us = limit.period.total_seconds() * 1_000_000
        remaining = max(0, math.floor((period_us - full_us) / interval_us))
        return cls(allowed, limit.count, remaining, wait_us / 1e6, full_us / 1e6)


class MemoryBuckets:
    """GCRA in process memory: atomic within the process's event loop."""

    def __init__(self) -> None:
        self._tats: dict[str, float] = {}

    def acquire(self, key: str, limit: RateLimit) -> Decision:
        now = time.monotonic() * 1_000_000
        interval = limit.inverse * 1_000_000
        tolerance = limit.period.total_seconds() * 1_000_000 - interval
        tat = max(self._tats.get(key, now), now)
        if tat - tolerance > now:
            return Decision.of(limit, False, tat - tolerance - now, tat - now)
        self._tats[key] = tat + interval
        if len(self._tats) > 100_000:  # drop buckets that are full again
            self._tats = {k: v for k, v in self._tats.items() if v > now}
        return Decision.of(limit, True, 0, tat + interval - now)


@dataclass(frozen=True)
class Admission:
    """What a request's step in Redis decided and read."""

    decisions: list[Decision]
    read: list[bytes | None]  # the values of the keys asked for, in order


class Buckets:
    """The app's rate-limit buckets: in Redis when it answers, else in memory."""

    def __init__(self) -> None:
        self.memory = MemoryBuckets()
        self._script: AsyncScript | None = None

    async def acquire(self, key: str, limit: RateLimit) -> Decision:
        return (await self.acquire_all([(key, limit)]))[0]

    async def acquire_all(self, buckets: Sequence[tuple[str, RateLimit]]) -> list[Decision]:
        """One request spent in each of *buckets* (key and limit)."""
        try:
            admission = await self._step(buckets, None, None)
        except RedisUnavailable:
            return [self.memory.acquire(key, limit) for key, limit in buckets]
        assert admission is not None  # nosec B101: without a session mark, never None
        return admission.decisions

    async def admit(
        self, session_mark: str, buckets: Sequence[tuple[str, RateLimit]], reads: ReadAhead
    ) -> Admission | None:
        """If *session_mark* says the caller's session is live, one request
        spent in each of *buckets*, and *reads* read, in one round trip; None,
        nothing spent, when it does not or Redis does not answer."""
        try:
            return await self._step(buckets, session_mark, reads)
        except RedisUnavailable:
            return None

    async def _step(
        self,
        buckets: Sequence[tuple[str, RateLimit]],
        session_mark: str | None,
        reads: ReadAhead | None,
    ) -> Admission | None:
        keys = [session_mark] if session_mark is not None else []
        keys += [f"taskflow:limit:{key}" for key, _limit in buckets]
        args: list[int | str] = [int(session_mark is not None), len(buckets)]
        for _key, limit in buckets:
            interval = limit.inverse * 1_000_000
            args += [int(interval), int(limit.period.total_seconds() * 1_000_000 - interval)]
        if reads is not None:
            keys += reads.redis_keys()
            then = reads.then_template()
            if then is not None:
                args.append(then)
        out = await backends().redis.call(
            lambda redis: self._script_of(redis)(keys=keys, args=args)
        )
        if session_mark is not None and out[0] != b"1":
            return None
        decided = out[1 : 1 + 3 * len(buckets)]
        decisions = [
            Decision.of(limit, bool(decided[3 * i]), decided[3 * i + 1], decided[3 * i + 2])
            for i, (_key, limit) in enumerate(buckets)
        ]
        return Admission(decisions, out[1 + 3 * len(buckets) :])

    def _script_of(self, redis: Redis) -> AsyncScript:
        if self._script is None or self._script.registered_client is not redis:
            self._script = redis.register_script(ADMISSION_SCRIPT)
        return self._script


MINUTE = timedelta(minutes=1)


class Limiter:
    """Enforces the limits declared with quart-rate-limiter's decorators
    (``rate_limit``, ``limit_blueprint``, ``rate_exempt``) plus the default
    limit, each in one atomic step of ``Buckets``.

    quart-rate-limiter's own ``RateLimiter`` cannot keep the contract, through
    its public interface or a store behind it: its store API reads a bucket
    and then writes it, so concurrent requests slip past a limit on every
    instance; it skips requests to unknown routes; and it reads each bucket
    again for the headers. So this class takes its place, reading the limits
    the library's decorators leave on views and blueprints. Every request is
    counted, those to unknown routes included; the response carries the
    ``RateLimit-*`` headers of the tightest of its limits.
    """

    def __init__(self, config: Config) -> None:
        self.buckets = Buckets()
        self.enabled = config.rate_limit_enabled
        self.default = RateLimit(config.rate_limit_per_minute, MINUTE)
        self.auth_per_minute = config.auth_rate_limit_per_minute
        self._by_endpoint: dict[str, list[RateLimit]] = {}

    def limits_for(self, endpoint: str | None) -> list[RateLimit]:
        """The limits of the route *endpoint* (None: no route matched)."""
        name = endpoint or "unmatched"
        limits = self._by_endpoint.get(name)
        if limits is None:
            limits = self._by_endpoint[name] = self._declared(endpoint)
        return limits

    def _declared(self, endpoint: str | None) -> list[RateLimit]:
        view = current_app.view_functions.get(endpoint) if endpoint else None
        if getattr(view, QUART_RATE_LIMITER_EXEMPT_ATTRIBUTE, False):
            return []
        blueprint_name = endpoint.rpartition(".")[0] if endpoint else ""
        blueprint = current_app.blueprints.get(blueprint_name)
        declared = [
            *getattr(view, QUART_RATE_LIMITER_LIMITS_ATTRIBUTE, []),
            *getattr(blueprint, QUART_RATE_LIMITER_LIMITS_ATTRIBUTE, []),
        ]
        return [self._configured(limit) for limit in declared] + [self.default]

    def _configured(self, limit: RateLimit) -> RateLimit:
        # The login and registration limits are declared with their documented
        # default count; the app's configuration sets the count it enforces.
        if limit in AUTH_LIMITS:
            return dataclasses.replace(limit, count=self.auth_per_minute)
        return limit

    async def before_request(self) -> None:
        endpoint = request.endpoint or "unmatched"
        limits = []
        for limit in self.limits_for(request.endpoint) if self.enabled else []:
            if limit.skip_function is None or not await limit.skip_function():
                limits.append(limit)
        admission = await self._admit_caller(endpoint, limits)
        if admission is not None:
            decisions = admission.decisions
        else:
            buckets = []
            for limit in limits:
                key_function = limit.key_function or caller_key
                buckets.append((f"{endpoint}-{limit.key}-{await key_function()}", limit))
            decisions = await self.buckets.acquire_all(buckets)
        if decisions:
            g.rate_limit = min(decisions, key=lambda decision: decision.remaining)
        refused = [decision for decision in decisions if not decision.allowed]
        if refused:
            raise RateLimitExceeded(math.ceil(max(d.retry_after for d in refused)))

    async def _admit_caller(self, endpoint: str, limits: list[RateLimit]) -> Admission | None:
        """The request's caller, limits and cache reads in one round trip to
        Redis, when its token is valid, its session's mark in Redis says live
        and its limits are all per caller (the common case); else None, and
        the session is checked and the limits counted one by one."""
        caller = await unchecked_request_caller()
        if caller is None or any(limit.key_function not in (None, caller_key) for limit in limits):
            return None
        reads = read_ahead(caller)
        buckets = [(f"{endpoint}-{limit.key}-user:{caller.user_id}", limit) for limit in limits]
        admission = await self.buckets.admit(session_mark_key(caller.session_id), buckets, reads)
        if admission is not None:
            await accept_caller(caller)
            reads.keep(admission.read)
        return admission

    async def after_request(self, response: Response) -> Response:
        decision: Decision | None = g.get("rate_limit")
        if decision is not None:
            response.headers["RateLimit-Limit"] = str(decision.limit)
            response.headers["RateLimit-Remaining"] = str(decision.remaining)
            response.headers["RateLimit-Reset"] = str(math.ceil(decision.reset))
        return response


def rate_limiter() -> Limiter:
    limiter: Limiter = current_app.extensions[EXTENSION_KEY]
    return limiter


def client_address() -> str:
    """The client's address: the socket peer, or the ``X-Forwarded-For`` entry
    added by the outermost of the configured number of trusted proxies.

    Entries left of those are whatever the client sent, so they are never used.
    """
    config: Config = current_app.config["TASKFLOW"]
    source = websocket if has_websocket_context() else request
    peer = source.remote_addr or "unknown"
    hops = config.trusted_proxy_hops
    if hops == 0:
        return peer
    forwarded = [
        entry.strip()
        for header in source.headers.getlist("X-Forwarded-For")
        for entry in header.split(",")
        if entry.strip()
    ]
    if len(forwarded) < hops:
        return forwarded[0] if forwarded else peer
    return forwarded[-hops]


async def address_key() -> str:
    """The client's address; for IPv6, its network of the configured prefix."""
    address = client_address()
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return f"ip:{address}"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"ip:{ip.ipv4_mapped}"
        prefix = current_app.config["TASKFLOW"].ipv6_prefix_length
        return f"ip:{ipaddress.ip_network((ip, prefix), strict=False)}"
    return f"ip:{ip}"


async def caller_key() -> str:
    """The user when the request carries a valid access token of a live session,
    else the address (a revoked session's token cannot spend its user's limit)."""
    try:
        caller = await request_caller()
    except APIError:  # refused by require_auth; counted by address
        caller = None
    return f"user:{caller.user_id}" if caller else await address_key()


async def email_key() -> str:
    """The account a login or registration is for, whichever address it comes
    from: its email normalised as login normalises it, so that no spelling of
    one address (case, Unicode compatibility forms) has a bucket of its own."""
    body = await request.get_json(silent=True)
    email = body.get("email") if isinstance(body, dict) else None
    if not isinstance(email, str):
        return await address_key()
    try:
        return f"email:{normalize_email(email[:1024])}"
    except ValueError:  # not an address: no account either; one bucket per spelling
        return f"email:{email.strip().lower()[:320]}"


# Login and registration: per address and per email, on top of the default.
# 10 a minute is the default of TASKFLOW_AUTH_RATE_LIMIT_PER_MINUTE, which
# sets the count enforced (``Limiter._configured``).
AUTH_LIMITS: list[RateLimit] = [
    RateLimit(10, MINUTE, address_key),
    RateLimit(10, MINUTE, email_key),
]


def init_app(app: Quart, config: Config) -> None:
    limiter = app.extensions[EXTENSION_KEY] = Limiter(config)
    app.before_request(limiter.before_request)
    app.after_request(limiter.after_request)
