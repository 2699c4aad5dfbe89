"""Redis over TLS (``rediss://``), against real redis-server processes that
speak TLS only, with a CA and server certificates this module makes.

What can never work (a certificate refused, a TLS handshake with a server
that speaks none, a wrong or missing password) stops start-up with a clear
message, and the process exits non-zero so that a platform reports a crashed
dyno; a Redis that is merely down is the degraded mode. Checked on
``check_redis`` itself, and on real hypercorn processes started as the
Procfile starts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
import redis.asyncio as aioredis

from taskflow.broker import CHANNEL
from taskflow.config import Config, ConfigError
from taskflow.db import check_redis, create_redis
from taskflow.redis_gate import RedisGate

from .support import (
    PROJECT_ROOT,
    free_port,
    hypercorn,
    private_redis,
    private_tls_redis,
    register_user,
    web_command,
)

TLS_FAILED = "REDIS_URL: the TLS connection to Redis failed"
TLS_SETTINGS = ("TASKFLOW_REDIS_TLS_CA_FILE", "TASKFLOW_REDIS_TLS_VERIFY")
CREDENTIALS_REFUSED = "REDIS_URL: Redis refused the credentials (wrong or missing password)."
REDIS_PASSWORD = "a-password-of-this-test"
# A server that cannot start has had the time to say so and exit.
EXIT_SECONDS = 15.0


# Certificates.


@dataclass(frozen=True)
class Certificates:
    """A self-signed CA; a server certificate it signed for 127.0.0.1 and
    localhost, and one for another host name."""

    ca: Path
    server: Path
    server_key: Path
    elsewhere: Path
    elsewhere_key: Path


def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)


def server_certificate(directory: Path, name: str, ca: Path, ca_key: Path, names: str) -> None:
    """``name.crt`` and ``name.key`` in *directory*, signed by the CA, for the
    subject alternative *names*: a leaf that strict verification
    (Python 3.13's default) accepts too."""
    key, request = directory / f"{name}.key", directory / f"{name}.csr"
    extensions = directory / f"{name}.ext"
    extensions.write_text(
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth\n"
        "subjectKeyIdentifier = hash\n"
        "authorityKeyIdentifier = keyid\n"
        f"subjectAltName = {names}\n"
    )
    openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", request, "-subj", f"/CN={name}",
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
        "-days", "2", "-out", directory / f"{name}.crt", "-extfile", extensions,
    )  # fmt: skip


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    directory = tmp_path_factory.mktemp("tls")
    ca, ca_key = directory / "ca.crt", directory / "ca.key"
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=TaskFlow test CA",
        "-addext", "basicConstraints = critical, CA:TRUE",
        "-addext", "keyUsage = critical, keyCertSign, cRLSign",
    )  # fmt: skip
    server_certificate(directory, "server", ca, ca_key, "IP:127.0.0.1, DNS:localhost")
    server_certificate(directory, "elsewhere", ca, ca_key, "DNS:redis.elsewhere.example")
    return Certificates(
        ca=ca,
        server=directory / "server.crt",
        server_key=directory / "server.key",
        elsewhere=directory / "elsewhere.crt",
        elsewhere_key=directory / "elsewhere.key",
    )


# Redis servers of this module's own.


@pytest.fixture
async def tls_redis(certificates: Certificates) -> AsyncIterator[int]:
    """A TLS-only Redis with the certificate for 127.0.0.1; yields its port."""
    port = free_port()
    async with private_tls_redis(port, certificates.server, certificates.server_key):
        yield port


@pytest.fixture
async def password_redis(certificates: Certificates) -> AsyncIterator[int]:
    """A TLS-only Redis that asks for ``REDIS_PASSWORD``; yields its port."""
    port = free_port()
    async with private_tls_redis(
        port, certificates.server, certificates.server_key, password=REDIS_PASSWORD
    ):
        yield port


@pytest.fixture
async def elsewhere_redis(certificates: Certificates) -> AsyncIterator[int]:
    """A TLS-only Redis on 127.0.0.1 whose certificate names another host."""
    port = free_port()
    async with private_tls_redis(port, certificates.elsewhere, certificates.elsewhere_key):
        yield port


@pytest.fixture
async def plain_redis() -> AsyncIterator[int]:
    """A Redis that speaks no TLS; yields its port once it answers."""
    port = free_port()
    async with private_redis(port):
        admin = aioredis.Redis(port=port)
        try:
            for _ in range(100):
                with contextlib.suppress(aioredis.ConnectionError):
                    if await admin.ping():
                        break
                await asyncio.sleep(0.05)
            else:
                raise RuntimeError("the private Redis did not start")
        finally:
            await admin.aclose()
        yield port


def admin_of(port: int, certificates: Certificates) -> aioredis.Redis:
    """The test's own client of a TLS Redis, trusting the CA."""
    return aioredis.Redis(port=port, ssl=True, ssl_ca_certs=str(certificates.ca))


# The settings.


def test_tls_settings_are_read_and_verification_is_the_default(
    environ: dict[str, str], certificates: Certificates
) -> None:
    with_ca = {**environ, "REDIS_URL": "rediss://127.0.0.1:6380/0"}
    with_ca["TASKFLOW_REDIS_TLS_CA_FILE"] = str(certificates.ca)
    config = Config.from_env(with_ca)
    assert config.redis_url == "rediss://127.0.0.1:6380/0"
    assert config.redis_tls_ca_file == str(certificates.ca)
    assert config.redis_tls_verify is True
    unverified = Config.from_env({**environ, "TASKFLOW_REDIS_TLS_VERIFY": "false"})
    assert unverified.redis_tls_verify is False
    with pytest.raises(ConfigError, match="TASKFLOW_REDIS_TLS_VERIFY"):
        Config.from_env({**environ, "TASKFLOW_REDIS_TLS_VERIFY": "maybe"})


@pytest.mark.parametrize("what", ["missing", "directory"])
def test_a_ca_file_that_is_not_a_file_is_a_config_error(
    environ: dict[str, str], tmp_path: Path, what: str
) -> None:
    path = tmp_path / "no-such-ca.pem" if what == "missing" else tmp_path
    with pytest.raises(ConfigError, match="TASKFLOW_REDIS_TLS_CA_FILE"):
        Config.from_env({**environ, "TASKFLOW_REDIS_TLS_CA_FILE": str(path)})


# The start-up check, on its own.


async def start_up_check(environ: Mapping[str, str], url: str, **settings: str) -> bool:
    """``check_redis`` as the app's lifespan runs it, with REDIS_URL *url*;
    then whether the app's client gets an answer from Redis. The client's
    connect timeout is 2 s unless *settings* say otherwise: on a busy machine
    a TLS handshake can take longer than the default 250 ms, and would pass
    for a Redis that does not answer."""
    settings = {"TASKFLOW_REDIS_TIMEOUT_MS": "2000", **settings}
    config = Config.from_env({**environ, "REDIS_URL": url, **settings})
    assert config.redis_url is not None
    client = create_redis(config.redis_url, config)
    try:
        await check_redis(RedisGate(client, 0.25, 1.0), config.redis_url)
        try:
            return bool(await client.ping())
        except (aioredis.RedisError, OSError):
            return False
    finally:
        await client.aclose()


async def test_a_self_signed_certificate_is_refused_by_default(
    environ: dict[str, str], tls_redis: int
) -> None:
    with pytest.raises(ConfigError) as refused:
        await start_up_check(environ, f"rediss://127.0.0.1:{tls_redis}/0")
    message = str(refused.value)
    assert message.startswith(TLS_FAILED), message
    assert "CERTIFICATE_VERIFY_FAILED" in message, message
    assert all(setting in message for setting in TLS_SETTINGS), message


async def test_with_its_ca_or_without_verification_the_check_passes(
    environ: dict[str, str], certificates: Certificates, tls_redis: int
) -> None:
    ca = {"TASKFLOW_REDIS_TLS_CA_FILE": str(certificates.ca)}
    for host in ("127.0.0.1", "localhost"):  # the certificate's two names
        assert await start_up_check(environ, f"rediss://{host}:{tls_redis}/0", **ca)
    unverified = {"TASKFLOW_REDIS_TLS_VERIFY": "false"}
    assert await start_up_check(environ, f"rediss://127.0.0.1:{tls_redis}/0", **unverified)


async def test_the_ca_does_not_vouch_for_another_hosts_certificate(
    environ: dict[str, str], certificates: Certificates, elsewhere_redis: int
) -> None:
    """The host name is checked too; only TASKFLOW_REDIS_TLS_VERIFY=false
    leaves it unchecked."""
    url = f"rediss://127.0.0.1:{elsewhere_redis}/0"
    with pytest.raises(ConfigError, match=TLS_FAILED) as refused:
        await start_up_check(environ, url, TASKFLOW_REDIS_TLS_CA_FILE=str(certificates.ca))
    assert "127.0.0.1" in str(refused.value)  # the name that did not match
    assert await start_up_check(environ, url, TASKFLOW_REDIS_TLS_VERIFY="false")


@pytest.mark.parametrize("password", ["wrong", None], ids=["wrong", "missing"])
async def test_a_wrong_or_missing_password_is_a_config_error(
    environ: dict[str, str], certificates: Certificates, password_redis: int, password: str | None
) -> None:
    ca = {"TASKFLOW_REDIS_TLS_CA_FILE": str(certificates.ca)}
    credentials = f":{password}@" if password else ""
    with pytest.raises(ConfigError) as refused:
        await start_up_check(environ, f"rediss://{credentials}127.0.0.1:{password_redis}/0", **ca)
    assert str(refused.value) == CREDENTIALS_REFUSED
    # The right one passes: the server was not refusing everyone.
    right = f"rediss://:{REDIS_PASSWORD}@127.0.0.1:{password_redis}/0"
    assert await start_up_check(environ, right, **ca)


async def test_tls_to_a_server_that_speaks_none_is_a_config_error(
    environ: dict[str, str], plain_redis: int
) -> None:
    """``rediss://`` to a plain port. A plain Redis takes the TLS ClientHello
    for the start of an inline command and waits for its end: the handshake
    gets no answer at all, where a Redis that is down refuses the connection;
    a plain PING then tells the two apart."""
    with pytest.raises(ConfigError, match="speaks Redis without TLS"):
        # The default deadline: the handshake that gets no answer waits it out.
        await start_up_check(
            environ, f"rediss://127.0.0.1:{plain_redis}/0", TASKFLOW_REDIS_TIMEOUT_MS="250"
        )


async def test_a_redis_that_is_down_is_only_a_warning(
    environ: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="taskflow.db"):
        assert not await start_up_check(environ, f"rediss://127.0.0.1:{free_port()}/0")
    assert "Redis does not answer at start-up" in caplog.text


# Real servers that must not start.


@dataclass
class Ended:
    """A server process that was expected not to start."""

    returncode: int | None  # None: still running after EXIT_SECONDS
    served: bool  # whether it answered /healthz meanwhile
    log: str  # its stderr

    def logged(self) -> str:
        """The messages and exceptions of its JSON log lines."""
        texts = []
        for line in self.log.splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    texts += [str(record.get("message")), str(record.get("exception"))]
        return "\n".join(texts)

    def describe(self) -> str:
        state = (
            f"still running after {EXIT_SECONDS:.0f} s"
            if self.returncode is None
            else f"exited with status {self.returncode}"
        )
        return f"{state}, {'serving' if self.served else 'serving nothing'}; stderr:\n{self.log}"


def log_file(path: Path) -> IO[bytes]:
    return path.open("wb")


def read_log(path: Path) -> str:
    return path.read_text(errors="replace")


async def failed_start(environ: Mapping[str, str], log_path: Path, workers: int = 1) -> Ended:
    """Start the web process as the ``hypercorn`` helper does (the Procfile's
    command) and wait up to EXIT_SECONDS for it to exit; then end whatever
    is left of its process group. Redis calls get 2 s unless *environ* says
    otherwise, as in ``start_up_check``: a handshake slower than the default
    250 ms would pass for a Redis that does not answer (the degraded mode)."""
    port = free_port()
    environ = {"TASKFLOW_REDIS_TIMEOUT_MS": "2000", **environ}
    with log_file(log_path) as stderr:
        process = await asyncio.create_subprocess_exec(
            *web_command(f"127.0.0.1:{port}", workers),
            env={**os.environ, **environ}, cwd=PROJECT_ROOT, start_new_session=True,
            stdout=asyncio.subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
    served = False
    try:
        async with httpx.AsyncClient(timeout=1) as http:
            deadline = time.monotonic() + EXIT_SECONDS
            while process.returncode is None and time.monotonic() < deadline:
                with contextlib.suppress(httpx.TransportError):
                    served |= (await http.get(f"http://127.0.0.1:{port}/healthz")).is_success
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.wait(), 0.2)
        returncode = process.returncode
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
    return Ended(returncode, served, read_log(log_path))


def assert_crashed(ended: Ended, *expected: str) -> None:
    """The server said why (in its JSON log lines), served nothing, and exited
    non-zero within EXIT_SECONDS: what a platform takes for a crashed process,
    and reports."""
    logged = ended.logged()
    for text in expected:
        assert text in logged, f"{text!r} not logged; {ended.describe()}"
    assert not ended.served, ended.describe()
    assert ended.returncode is not None, ended.describe()
    assert ended.returncode != 0, ended.describe()


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_refused_certificate_stops_the_server(
    environ: dict[str, str], tls_redis: int, tmp_path: Path, workers: int
) -> None:
    ended = await failed_start(
        {**environ, "REDIS_URL": f"rediss://127.0.0.1:{tls_redis}/0"},
        tmp_path / "server.log",
        workers,
    )
    assert_crashed(ended, TLS_FAILED, "CERTIFICATE_VERIFY_FAILED", *TLS_SETTINGS)


async def test_a_wrong_password_stops_the_server(
    environ: dict[str, str], certificates: Certificates, password_redis: int, tmp_path: Path
) -> None:
    wrong = {
        **environ,
        "REDIS_URL": f"rediss://:wrong@127.0.0.1:{password_redis}/0",
        "TASKFLOW_REDIS_TLS_CA_FILE": str(certificates.ca),
    }
    assert_crashed(await failed_start(wrong, tmp_path / "server.log"), CREDENTIALS_REFUSED)


async def test_a_missing_ca_file_stops_the_server(
    environ: dict[str, str], tls_redis: int, tmp_path: Path
) -> None:
    missing = {
        **environ,
        "REDIS_URL": f"rediss://127.0.0.1:{tls_redis}/0",
        "TASKFLOW_REDIS_TLS_CA_FILE": str(tmp_path / "no-such-ca.pem"),
    }
    # Refused by the master, before any worker starts.
    ended = await failed_start(missing, tmp_path / "server.log")
    assert_crashed(ended, "configuration error: TASKFLOW_REDIS_TLS_CA_FILE: no such file")


# Real servers that use Redis over TLS, or serve without it.

LIMIT = 10


async def in_turn(urls: list[str], total: int) -> Counter[int]:
    """*total* requests to an unknown route (limited like any other), one
    after the other, to each instance at *urls* in turn. (One at a time: each
    new TLS connection costs a worker tens of milliseconds, and a burst on a
    cold pool can miss the Redis deadline and fall back to memory.)"""
    async with httpx.AsyncClient() as http:
        responses = [await http.get(f"{urls[n % len(urls)]}/nowhere") for n in range(total)]
    return Counter(response.status_code for response in responses)


async def readiness(url: str) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{url}/readyz")
    body: dict[str, Any] = response.json()
    return response.status_code, body


async def subscribers(admin: aioredis.Redis, expected: int) -> int:
    """How many connections listen to the event channel, once *expected* do
    (or after 5 s): each instance's broker subscribes as it starts."""
    count = 0
    for _ in range(100):
        ((_channel, count),) = await admin.pubsub_numsub(CHANNEL)
        if count >= expected:
            break
        await asyncio.sleep(0.05)
    return int(count)


async def test_with_its_ca_two_instances_share_redis_over_tls(
    environ: dict[str, str], certificates: Certificates, tls_redis: int
) -> None:
    trusting = {
        **environ,
        "REDIS_URL": f"rediss://127.0.0.1:{tls_redis}/0",
        "TASKFLOW_REDIS_TLS_CA_FILE": str(certificates.ca),
        "TASKFLOW_RATE_LIMIT_PER_MINUTE": str(LIMIT),
    }
    admin = admin_of(tls_redis, certificates)
    try:
        async with hypercorn(trusting) as (a, _a), hypercorn(trusting) as (b, _b):
            assert await readiness(a) == (200, {"database": "ok", "redis": "ok"})
            assert await readiness(b) == (200, {"database": "ok", "redis": "ok"})
            # One limit for both: each on its own would let LIMIT through.
            assert await in_turn([a, b], 4 * LIMIT) == {404: LIMIT, 429: 3 * LIMIT}
            # Kept in the Redis that has no plain port, and both brokers
            # listen to it: everything went over TLS.
            assert [key async for key in admin.scan_iter("taskflow:limit:unmatched-*")]
            assert await subscribers(admin, 2) == 2
    finally:
        await admin.aclose()


async def test_without_verification_the_server_uses_redis(
    environ: dict[str, str], certificates: Certificates, tls_redis: int
) -> None:
    unverified = {
        **environ,
        "REDIS_URL": f"rediss://127.0.0.1:{tls_redis}/0",
        "TASKFLOW_REDIS_TLS_VERIFY": "false",
        "TASKFLOW_RATE_LIMIT_PER_MINUTE": str(LIMIT),  # a bucket that lasts
    }
    admin = admin_of(tls_redis, certificates)
    try:
        async with hypercorn(unverified) as (url, _process):
            assert await readiness(url) == (200, {"database": "ok", "redis": "ok"})
            # The test spends the bucket in Redis; the server finds it spent.
            async with httpx.AsyncClient() as http:
                assert (await http.get(f"{url}/nowhere")).status_code == 404
                keys = [key async for key in admin.scan_iter("taskflow:limit:unmatched-*")]
                assert len(keys) == 1, keys
                an_hour_on = int((time.time() + 3600) * 1_000_000)  # the bucket's µs
                await admin.set(keys[0], an_hour_on, px=60_000)
                refused = await http.get(f"{url}/nowhere")
            assert refused.status_code == 429, refused.text
            assert await subscribers(admin, 1) == 1
    finally:
        await admin.aclose()


async def test_a_redis_that_is_down_at_start_is_the_degraded_mode(
    environ: dict[str, str],
    certificates: Certificates,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log_path = tmp_path / "server.log"
    monkeypatch.setenv("TASKFLOW_TEST_SERVER_LOG", str(log_path))
    down = {
        **environ,
        "REDIS_URL": f"rediss://127.0.0.1:{free_port()}/0",
        "TASKFLOW_REDIS_TLS_CA_FILE": str(certificates.ca),
    }
    async with hypercorn(down) as (url, _process):
        async with httpx.AsyncClient(base_url=url) as http:
            user = await register_user(http)  # registers and logs in
            me = await http.get("/auth/me", headers=user.headers)
            assert me.status_code == 200, me.text
        status, body = await readiness(url)
    assert status == 503, body
    assert "redis" in body["detail"] and "database" not in body["detail"], body
    warnings = [
        record
        for line in read_log(log_path).splitlines()
        if line.startswith("{") and (record := json.loads(line))["level"] == "WARNING"
    ]
    assert any("does not answer at start-up" in record["message"] for record in warnings)
