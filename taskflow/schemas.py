"""Field types shared by the request models, and the page envelope."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Generic, TypeVar

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
)


def _no_nul(value: str) -> str:
    # PostgreSQL text cannot hold NUL; refuse it up front rather than fail later.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)")


def _rfc3339(value: object) -> object:
    # Pydantic would also take a number as a Unix time, and a bare date.
    if not isinstance(value, str) or not RFC3339.fullmatch(value):
        raise ValueError("must be an RFC 3339 timestamp with an offset")
    return value


def _to_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("is out of range") from None


NoNul = AfterValidator(_no_nul)
NO_NUL_PATTERN = "^[^\\x00]*$"  # the same rule, for the OpenAPI document
Trimmed = StringConstraints(strip_whitespace=True, min_length=1)

Documented = Field(json_schema_extra={"pattern": NO_NUL_PATTERN})

# Names and titles are trimmed of surrounding white space, then must be non-empty.
ProjectName = Annotated[str, Trimmed, StringConstraints(max_length=200), NoNul, Documented]
TaskTitle = Annotated[str, Trimmed, StringConstraints(max_length=500), NoNul, Documented]
Description = Annotated[str, StringConstraints(max_length=10_000), NoNul, Documented]
Email = Annotated[
    str, StringConstraints(max_length=254), NoNul, Field(json_schema_extra={"format": "email"})
]

# An RFC 3339 timestamp with an offset (422 without one), normalised to UTC.
Timestamp = Annotated[AwareDatetime, BeforeValidator(_rfc3339), AfterValidator(_to_utc)]


class RequestModel(BaseModel):
    """A request body or query: unknown fields are refused, never ignored."""

    model_config = ConfigDict(extra="forbid")


Item = TypeVar("Item")


class Page(BaseModel, Generic[Item]):
    items: list[Item]
    next_cursor: str | None
