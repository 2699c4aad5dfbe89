"""Field types shared by the request models, and the page envelope."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, TypeVar

from email_validator import EmailNotValidError, validate_email
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

Documented = Field(json_schema_extra={"pattern": NO_NUL_PATTERN})

# What pydantic's strip_whitespace removes (Unicode White_Space, as Rust's
# str::trim has it), as a regex class; names and titles are trimmed of it.
WHITE_SPACE = (
    "\\t\\n\\x0b\\x0c\\r \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"
)


# Search text: words separated by that same white space; at least one word.
WORDS_PATTERN = f"^[^\\x00]*[^\\x00{WHITE_SPACE}][^\\x00]*$"
_WORD_SEPARATOR = re.compile(f"[{WHITE_SPACE}]+")


def words_of(text: str) -> list[str]:
    return [word for word in _WORD_SEPARATOR.split(text) if word]


def trimmed_pattern(max_length: int) -> str:
    """A regex for text of 1 to *max_length* characters once trimmed, without NUL.

    JSON Schema's minLength and maxLength count the untrimmed text, so the
    OpenAPI document states the rule as this pattern instead.
    """
    inner, edge = "[^\\x00]", f"[^\\x00{WHITE_SPACE}]"
    return f"^[{WHITE_SPACE}]*{edge}(?:{inner}{{0,{max_length - 2}}}{edge})?[{WHITE_SPACE}]*$"


def _exactly(pattern: str) -> Callable[[dict[str, Any]], None]:
    def document(schema: dict[str, Any]) -> None:
        schema.pop("minLength", None)
        schema.pop("maxLength", None)
        schema["pattern"] = pattern

    return document


def _trimmed(max_length: int) -> Any:
    return Field(json_schema_extra=_exactly(trimmed_pattern(max_length)))


Trimmed = StringConstraints(strip_whitespace=True, min_length=1)

# Characters that show nothing: controls, format characters (zero-width and
# direction marks), separators, unassigned code points, and the letters and
# symbols that render blank (Hangul fillers, the blank Braille pattern).
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp", "Cn"})
_BLANK_CHARACTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def has_visible_character(value: str) -> bool:
    return any(
        char not in _BLANK_CHARACTERS and unicodedata.category(char) not in _INVISIBLE_CATEGORIES
        for char in value
    )


def _visible(value: str) -> str:
    # Which code points render is no rule JSON Schema can state; the schema
    # fuzzer is told (tests/fuzz_checks.py).
    if not has_visible_character(value):
        raise ValueError("must contain a visible character")
    return value


Visible = AfterValidator(_visible)

# Names and titles: trimmed of surrounding white space, then 1 to N characters,
# at least one of them visible.
ProjectName = Annotated[
    str, Trimmed, StringConstraints(max_length=200), NoNul, Visible, _trimmed(200)
]
TokenName = Annotated[
    str, Trimmed, StringConstraints(max_length=100), NoNul, Visible, _trimmed(100)
]
TaskTitle = Annotated[
    str, Trimmed, StringConstraints(max_length=500), NoNul, Visible, _trimmed(500)
]
Description = Annotated[str, StringConstraints(max_length=10_000), NoNul, Documented]

MAX_EMAIL_LENGTH = 254


def normalize_email(value: str) -> str:
    """Lower-case and validate an email address (no DNS lookups); ValueError if invalid."""
    try:
        email = validate_email(value.strip(), check_deliverability=False).normalized
    except EmailNotValidError as error:
        raise ValueError(str(error)) from None
    email = email.lower()
    if len(email) > MAX_EMAIL_LENGTH:
        raise ValueError(f"at most {MAX_EMAIL_LENGTH} characters")
    return email


# Email addresses: white space around trimmed, then whatever email-validator's
# syntax rules accept (no DNS lookup), in its normalised form, lower-cased. That
# includes internationalised addresses (Unicode local parts and domains), as
# email-validator accepts them: a domain sent in Unicode or in its xn-- form is
# one address, stored in Unicode, and register, login and member additions all
# normalise through normalize_email, so each finds the others' spelling.
# No pattern: the product is not narrowed to what a schema tool can generate.
Email = Annotated[
    str,
    StringConstraints(max_length=MAX_EMAIL_LENGTH),
    AfterValidator(normalize_email),
    Field(
        json_schema_extra={
            "format": "email",
            "description": (
                "An email address of at most 254 characters. White space around it "
                "is trimmed; the rest must pass email-validator's syntax rules (no DNS "
                "lookup), internationalised addresses included. Stored lower-cased in "
                "email-validator's normalised form (a domain sent as xn-- in Unicode)."
            ),
        }
    ),
]


# A task list's assignee filter: a user id in canonical form, `me` or `none`.
ASSIGNEE_FILTER_PATTERN = (
    "^(me|none|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})$"
)

# An RFC 3339 timestamp with an offset (422 without one), normalised to UTC.
Timestamp = Annotated[AwareDatetime, BeforeValidator(_rfc3339), AfterValidator(_to_utc)]


class RequestModel(BaseModel):
    """A request body or query: unknown fields are refused, never ignored."""

    model_config = ConfigDict(extra="forbid")


Item = TypeVar("Item")


class Page(BaseModel, Generic[Item]):
    items: list[Item]
    next_cursor: str | None
