"""gzip for response bodies over 1 KiB, when the request's Accept-Encoding allows it.

One after-request hook, registered right after the access log's so that it
runs after every other hook: the stored idempotent responses and the CORS
headers are settled on the identity body, and only the bytes sent are gzip.
The ETag is left as it is: it names the task's version, not the bytes, and
with no byte ranges served the two forms' bytes can never be mixed.
"""

from __future__ import annotations

import asyncio
import re
import zlib

from quart import Quart, Response, request
from quart.wrappers.response import DataBody

# Level 1, from the benchmark (bench/README.md, "Compression: the level"). On
# the list's real 50-task page, 17,432 bytes: level 1 takes 27 µs and sends
# 2,755 bytes, level 6 66 µs and 2,446, level 9 86 µs and 2,364. Any level
# brings the page inside TCP's first flight (~14 KB), which identity is not;
# level 1 already saves 97 % of what level 9 does, and the 309 bytes level 6
# saves beyond it are 2.5 ms on a 1 Mbit/s phone link and no round trip,
# for 39 µs more CPU a page on the server, whose CPU bounds the list.
GZIP_LEVEL = 1
MIN_BYTES = 1024  # the contract: only bodies *over* 1 KiB are compressed
# Above this a body is compressed in a thread (zlib lets go of the GIL): a page
# of long descriptions runs to megabytes, 10-30 ms that would stall every other
# request on the worker. Below it the stall is under a millisecond at level 1
# (~0.6 ms for random text, ~0.1 ms for a task page's JSON), less than a list
# request's own CPU, and a thread's round trip would add ~0.15 ms to each.
THREAD_BYTES = 64 * 1024
GZIP_WBITS = 16 + zlib.MAX_WBITS  # a gzip header, not zlib's; mtime 0: the same bytes each time
# Statuses with no body to encode, or with a byte range of the identity form.
NOT_ENCODED = frozenset({204, 205, 206, 304})

# RFC 9110 §12.4.2: "0" to "1" with at most three decimals.
QVALUE = re.compile(r"0(?:\.\d{0,3})?|1(?:\.0{0,3})?")


def coding_weights(accept_encoding: str) -> dict[str, float]:
    """The weight of each content coding the header names (lower case).

    An element that cannot be read — a malformed or repeated ``q`` — is left
    out, so that nothing is taken as allowed that the client did not clearly
    allow; a coding named twice keeps its lower weight.
    """
    weights: dict[str, float] = {}
    for element in accept_encoding.split(","):
        coding, *parameters = element.split(";")
        coding = coding.strip().lower()
        qs = [value.strip() for name, _, value in (p.partition("=") for p in parameters)
              if name.strip().lower() == "q"]  # fmt: skip
        if not coding or len(qs) > 1 or (qs and not QVALUE.fullmatch(qs[0])):
            continue
        weight = float(qs[0]) if qs else 1.0
        weights[coding] = min(weight, weights.get(coding, weight))
    return weights


def allows_gzip(accept_encoding: str) -> bool:
    """Whether gzip is acceptable by RFC 9110 §12.5.3 and not ranked below identity.

    gzip (or its alias ``x-gzip``) takes its own weight if named, else that of
    ``*``; ``q=0`` refuses. Identity, unless named or covered by ``*``, is
    acceptable without a preference, so gzip wins whenever it is allowed and
    identity is not ranked above it. An empty header allows no coding.
    """
    weights = coding_weights(accept_encoding)
    star = weights.get("*")
    gzip = weights.get("gzip", weights.get("x-gzip", star or 0.0))
    identity = weights.get("identity", star)
    return gzip > 0 and (identity is None or gzip >= identity)


def vary_on_accept_encoding(response: Response) -> None:
    """Add Accept-Encoding to the response's Vary, keeping what is there."""
    fields = [
        field.strip()
        for line in response.headers.getlist("Vary")
        for field in line.split(",")
        if field.strip()
    ]
    if not any(field == "*" or field.lower() == "accept-encoding" for field in fields):
        response.headers["Vary"] = ", ".join([*fields, "Accept-Encoding"])


def gzip(body: bytes) -> bytes:
    return zlib.compress(body, GZIP_LEVEL, wbits=GZIP_WBITS)


async def compress_response(response: Response) -> Response:
    """gzip a buffered body over 1 KiB if the request allows it, with Vary
    whether or not it did.

    HEAD is treated as GET: its headers are GET's (Content-Encoding, Vary and
    the gzip length), and the server sends no body for it. A 304 carries
    Vary, which its 200 may have had. Streamed and file bodies, and bodies
    already encoded, are left alone.
    """
    if response.status_code == 304:
        vary_on_accept_encoding(response)
        return response
    if (
        response.status_code in NOT_ENCODED
        or not isinstance(response.response, DataBody)
        or "Content-Encoding" in response.headers
    ):
        return response
    body = await response.get_data(as_text=False)
    if len(body) <= MIN_BYTES:
        return response
    vary_on_accept_encoding(response)
    if not allows_gzip(",".join(request.headers.getlist("Accept-Encoding"))):
        return response
    if len(body) > THREAD_BYTES:
        response.set_data(await asyncio.to_thread(gzip, body))
    else:
        response.set_data(gzip(body))  # sets Content-Length too
    response.headers["Content-Encoding"] = "gzip"
    return response


def init_app(app: Quart) -> None:
    """Register the hook; call right after ``logs.init_app``, so that it runs
    after every other after-request hook (Quart runs them in reverse order of
    registration) and the access log alone after it."""
    app.after_request(compress_response)
