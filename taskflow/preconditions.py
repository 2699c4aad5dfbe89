"""Conditional requests on a task or a project: its ``ETag``, ``If-None-Match``
on a read (304), ``If-Match`` on a write (412).

An ETag names a version of the resource, which every write bumps; it is the
same for the identity and the gzip forms of a body (TaskFlow serves no byte
ranges, so no client can mix bytes of the two).
"""

from __future__ import annotations

from dataclasses import dataclass

from quart import Response, request

from .errors import APIError


def etag(version: int) -> str:
    return f'"{version}"'


def listed_tags(header: str) -> frozenset[str]:
    return frozenset(tag.strip() for tag in header.split(",") if tag.strip())


@dataclass(frozen=True)
class IfMatch:
    """An ``If-Match`` precondition: the ETags a write may proceed from (None: any)."""

    etags: frozenset[str] | None

    @classmethod
    def of_request(cls) -> IfMatch:
        header = request.headers.get("If-Match")
        if header is None or header.strip() == "*":
            return cls(None)
        # Strong comparison (RFC 9110, 13.1.1): a weak tag never matches.
        return cls(listed_tags(header))

    def check(self, version: int, what: str) -> None:
        if self.etags is not None and etag(version) not in self.etags:
            raise APIError(412, "precondition_failed", f"The {what} has changed since that ETag.")


def not_modified(current: str) -> Response | None:
    """A 304 with *current* when the request's ``If-None-Match`` names it (or
    is ``*``), else None. Weak comparison (RFC 9110, 13.1.2)."""
    header = request.headers.get("If-None-Match")
    if header is None:
        return None
    tags = listed_tags(header)
    if "*" in tags or current in {tag.removeprefix("W/") for tag in tags}:
        return Response(b"", 304, headers={"ETag": current})
    return None
