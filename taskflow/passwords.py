"""Password hashing with bcrypt, off the event loop and bounded under a flood.

bcrypt runs in threads, one per core, at the lowest CPU priority: under a
flood of logins the event loop, and with it every other request, keeps the
cores. Hashes beyond a short queue are refused with a 503 at once, and one
that the busy cores have not finished within a few seconds is given up: a
client is better told to come back than left hanging.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import secrets
import threading
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import bcrypt
from quart import Quart, current_app

from .errors import APIError

BCRYPT_MAX_BYTES = 72
BCRYPT_THREADS = os.cpu_count() or 1
BCRYPT_QUEUE = 4 * BCRYPT_THREADS
BCRYPT_DEADLINE_SECONDS = 5.0
BCRYPT_RETRY_AFTER_SECONDS = 1

EXTENSION_KEY = "taskflow.passwords"

# Control characters (Unicode's Cc): bcrypt reads a password as a C string,
# so a NUL would end it early; none has a place in a password.
NO_CONTROL_CHARACTERS = "^[^\\x00-\\x1f\\x7f-\\x9f]*$"
_CONTROL_CHARACTER = re.compile("[\\x00-\\x1f\\x7f-\\x9f]")


def has_control_characters(password: str) -> bool:
    return _CONTROL_CHARACTER.search(password) is not None


T = TypeVar("T")


def _lowest_priority() -> None:
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def _too_many_sign_ins() -> APIError:
    return APIError(
        503,
        "service_unavailable",
        "Too many sign-ins at once; try again shortly.",
        headers={"Retry-After": str(BCRYPT_RETRY_AFTER_SECONDS)},
    )


@functools.cache
def _dummy_hash(rounds: int) -> bytes:
    return bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(rounds=rounds))


class PasswordHasher:
    """The app's bcrypt threads, with their queue bound and deadline."""

    def __init__(self, rounds: int, deadline_seconds: float = BCRYPT_DEADLINE_SECONDS) -> None:
        self.rounds = rounds
        self.deadline_seconds = deadline_seconds
        self._threads = ThreadPoolExecutor(
            max_workers=BCRYPT_THREADS, thread_name_prefix="bcrypt", initializer=_lowest_priority
        )
        self._pending = 0

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def _in_thread(self, function: Callable[..., T], *args: Any) -> T:
        if self._pending >= BCRYPT_THREADS + BCRYPT_QUEUE:
            raise _too_many_sign_ins()
        self._pending += 1
        try:
            async with asyncio.timeout(self.deadline_seconds):
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(self._threads, function, *args)
        except TimeoutError:
            raise _too_many_sign_ins() from None
        finally:
            self._pending -= 1

    async def hash(self, password: str) -> str:
        salt = bcrypt.gensalt(rounds=self.rounds)
        hashed = await self._in_thread(bcrypt.hashpw, password.encode(), salt)
        return hashed.decode()

    async def check(self, password: str, password_hash: str | None) -> bool:
        """Whether *password* matches; the same bcrypt work is spent when there is
        no such user (``password_hash`` None) or the password is one that
        registration refuses (over-long, or with a control character)."""
        encoded = password.encode()
        if (
            password_hash is None
            or len(encoded) > BCRYPT_MAX_BYTES
            or has_control_characters(password)
        ):
            dummy = await self._in_thread(_dummy_hash, self.rounds)
            await self._in_thread(bcrypt.checkpw, encoded[:BCRYPT_MAX_BYTES], dummy)
            return False
        return await self._in_thread(bcrypt.checkpw, encoded, password_hash.encode())


def hasher() -> PasswordHasher:
    hasher_: PasswordHasher = current_app.extensions[EXTENSION_KEY]
    return hasher_


def init_app(app: Quart, rounds: int) -> None:
    @app.while_serving
    async def lifespan() -> AsyncGenerator[None, None]:
        app.extensions[EXTENSION_KEY] = PasswordHasher(rounds)
        yield
        app.extensions.pop(EXTENSION_KEY).close()
