"""Whether hypercorn compresses WebSocket frames: the one adjustment of
hypercorn's internals that serves WebSocket speed.

hypercorn (0.18) accepts permessage-deflate whenever a client offers it, as
every browser does, in ``Handshake.accept``: it has no setting for it
(pgjones/hypercorn#307), and an ASGI app cannot take part in that
negotiation. Compressing a frame for each of a thousand subscribers costs
about twice the worker's CPU of sending it plain, which put the fan-out's p99
far beyond its 50 ms target (bench/README.md, "WebSocket fan-out (issue
17)"); plain frames are ~3.7x larger on the wire.

``install(compression=False)`` wraps ``Handshake.accept`` so that it answers
as for a client that offered no extension: no ``Sec-WebSocket-Extensions``
in the 101, and a connection that sends plain frames (which every client must
accept). ``install(compression=True)`` puts hypercorn's own method back.
``tests/test_ws_compression.py`` checks both against a real hypercorn and
that the installed hypercorn is the one this was written for, so an upgrade
fails a test rather than silently compressing again (or breaking the
handshake).
"""

from __future__ import annotations

from collections.abc import Iterable

from hypercorn.protocol.ws_stream import Handshake
from wsproto.connection import Connection

# The hypercorn release whose ``Handshake`` this adjusts.
WRITTEN_FOR = "0.18.0"

_hypercorns_accept = Handshake.accept


def _accept_plain(
    self: Handshake, subprotocol: str | None, additional_headers: Iterable[tuple[bytes, bytes]]
) -> tuple[int, list[tuple[bytes, bytes]], Connection]:
    # The client's offer is forgotten: hypercorn negotiates nothing.
    self.extensions = None
    return _hypercorns_accept(self, subprotocol, additional_headers)


def install(compression: bool) -> None:
    """Let hypercorn negotiate permessage-deflate (*compression*) or not,
    for this process."""
    if "extensions" not in vars(Handshake([], "1.1")):
        raise RuntimeError(
            f"hypercorn changed since {WRITTEN_FOR}: Handshake no longer keeps the offered"
            " extensions"
        )
    Handshake.accept = _hypercorns_accept if compression else _accept_plain  # type: ignore[method-assign]
