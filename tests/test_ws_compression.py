"""permessage-deflate on the WebSocket: declined unless TASKFLOW_WS_COMPRESSION
is on (``taskflow/ws_compression.py``), against a real hypercorn, and the
hypercorn release that adjustment was written for."""

from __future__ import annotations

from collections.abc import Iterator
from importlib.metadata import version

import httpx
import pytest
from hypercorn.protocol.ws_stream import Handshake
from wsproto.events import TextMessage

from taskflow import ws_compression
from taskflow.config import Config

from .support import live_server, register_user, running
from .test_ws import Api, events_until, ready, subscribe

OFFER = (b"sec-websocket-extensions", b"permessage-deflate; client_max_window_bits")
HANDSHAKE = [
    (b"host", b"example.com"),
    (b"upgrade", b"websocket"),
    (b"connection", b"Upgrade"),
    (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
    (b"sec-websocket-version", b"13"),
    OFFER,
]


def test_written_for_the_installed_hypercorn() -> None:
    # An upgrade fails here: read the new Handshake.accept (does it still
    # accept permessage-deflate unasked? has pgjones/hypercorn#307 given it a
    # setting?), then move WRITTEN_FOR.
    assert version("hypercorn") == ws_compression.WRITTEN_FOR


@pytest.fixture
def restore_compression(config: Config) -> Iterator[None]:
    yield
    ws_compression.install(config.ws_compression)


@pytest.mark.parametrize("compression", [False, True], ids=["off", "on"])
def test_install_decides_the_handshakes_answer(
    restore_compression: None, compression: bool
) -> None:
    ws_compression.install(compression)
    status, headers, connection = Handshake(HANDSHAKE, "1.1").accept(None, [])
    assert status == 101
    answer = dict(headers).get(b"sec-websocket-extensions")
    if compression:
        assert answer is not None and answer.startswith(b"permessage-deflate")
    else:
        assert answer is None
    # The connection compresses exactly when the answer said so.
    frame = connection.send(TextMessage(data="x" * 2000))
    assert (len(frame) < 2000) is compression


def test_off_by_default(environ: dict[str, str]) -> None:
    assert Config.from_env(environ).ws_compression is False
    assert Config.from_env({**environ, "TASKFLOW_WS_COMPRESSION": "true"}).ws_compression is True


@pytest.mark.parametrize("setting", [None, "false", "true"], ids=["default", "off", "on"])
async def test_a_client_offering_deflate_gets_it_only_when_on(
    config: Config, environ: dict[str, str], setting: str | None
) -> None:
    server_environ = dict(environ)
    if setting is not None:
        server_environ["TASKFLOW_WS_COMPRESSION"] = setting
    async with running(config), live_server(server_environ) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            owner = Api(http, await register_user(http))
            project = await owner.project()
            # websockets offers permessage-deflate, as browsers do.
            async with await ready(url, owner, compression="deflate") as ws:
                assert ws.response is not None
                answer = ws.response.headers.get("Sec-WebSocket-Extensions")
                if setting == "true":
                    assert answer is not None and answer.startswith("permessage-deflate")
                else:
                    assert answer is None
                await subscribe(ws, project)
                task = await owner.task(project, "x" * 500, description="y" * 2000)
                (event,) = await events_until(ws, 1)
                assert event["data"] == task
