"""A check schemathesis loads for tests/test_schema_fuzz.py (``hooks`` in
schemathesis.toml).

A few rules of the contract cannot be written in JSON Schema: a cursor must
be one the server signed, an assignee must be a member of the project, a
password may be 72 characters but at most 72 bytes in UTF-8, a timestamp must
fall within years 1 to 9999 once turned to UTC (0001-01-01T00:30:00+01:00 does
not), a name or title must have a character that shows (not only zero-width or
direction marks), an email must pass email-validator's syntax rules (the
schema says `format: email`, whose values schemathesis generates its own way:
quoted local parts, IP-literal domains, special-use domains such as `.test`,
which email-validator refuses), a webhook URL must be one TaskFlow delivers to
(httpx parses it; a host, no credentials, no fragment), an API token's
`project_ids` must be projects its user is a member of. Two more depend on
what came before: an `If-Match` that names no current version (412), and an
`Idempotency-Key` that an earlier, different request used (422
`idempotency_key_reused`). For the operations where they apply,
schemathesis.toml adds their 422 to the statuses a schema-valid request may
get; this check holds each such 422 to exactly those rules: every error it
reports must be on that field, for that reason (for emails, email-validator
itself is asked, not the server's code).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import schemathesis
from email_validator import EmailNotValidError, validate_email
from schemathesis.specs.openapi.checks import ensure_resource_availability

from taskflow.schemas import has_visible_character

Rule = Callable[[Any], bool]


def _sent(value: Any) -> bool:
    return value is not None


def _over_72_bytes(value: Any) -> bool:
    return isinstance(value, str) and len(value.encode()) > 72


def _invisible(value: Any) -> bool:
    return isinstance(value, str) and not has_visible_character(value)


def _refused_by_email_validator(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        validate_email(value.strip(), check_deliverability=False)
    except EmailNotValidError:
        return True
    return False


def _not_a_url_to_deliver_to(value: Any) -> bool:
    """A webhook URL httpx cannot parse, or with no host, credentials, a
    fragment or a NUL (the fuzzed server allows http:// and private
    addresses, so none is refused for where it leads: no DNS lookup)."""
    if not isinstance(value, str):
        return False
    try:
        url = httpx.URL(value)
    except httpx.InvalidURL:
        return True
    return (
        "\x00" in value
        or url.scheme not in ("http", "https")
        or not url.host
        or bool(url.userinfo)
        or bool(url.fragment)
    )


def _outside_utc_years(value: Any) -> bool:
    try:
        datetime.fromisoformat(value).astimezone(UTC)
    except OverflowError:
        return True
    except (TypeError, ValueError):
        return False
    return False


# operation → {field: whether the value sent breaks the unwritable rule}
UNWRITABLE: dict[str, dict[str, Rule]] = {
    "GET /projects": {"cursor": _sent},
    "POST /projects": {"name": _invisible},
    "PUT /projects/{project_id}": {"name": _invisible},
    "PATCH /projects/{project_id}": {"name": _invisible},
    "GET /projects/{project_id}/tasks": {
        "cursor": _sent,
        "due_before": _outside_utc_years,
        "due_after": _outside_utc_years,
    },
    "POST /projects/{project_id}/tasks": {
        "assignee_id": _sent,
        "due_date": _outside_utc_years,
        "title": _invisible,
    },
    "PUT /tasks/{task_id}": {
        "assignee_id": _sent,
        "due_date": _outside_utc_years,
        "title": _invisible,
    },
    "PATCH /tasks/{task_id}": {
        "assignee_id": _sent,
        "due_date": _outside_utc_years,
        "title": _invisible,
    },
    "POST /auth/register": {"email": _refused_by_email_validator, "password": _over_72_bytes},
    "POST /projects/{project_id}/members": {"email": _refused_by_email_validator},
    "POST /auth/tokens": {"project_ids": _sent, "name": _invisible},
    "POST /projects/{project_id}/webhooks": {"url": _not_a_url_to_deliver_to},
    "PATCH /projects/{project_id}/webhooks/{webhook_id}": {"url": _not_a_url_to_deliver_to},
    "GET /projects/{project_id}/webhooks/{webhook_id}/deliveries": {"cursor": _sent},
}


def _value(case: Any, field: str) -> Any:
    for container in (case.query, case.body):
        if isinstance(container, dict) and field in container:
            return container[field]
    return None


def _sent_header(case: Any, name: str) -> bool:
    return any(key.lower() == name.lower() for key in (case.headers or {}))


@schemathesis.check
def refusals_are_the_contracts(ctx: Any, response: Any, case: Any) -> bool | None:
    """A schema-valid request's 422 names only a rule the schema cannot state;
    a 412 answers only an If-Match; an `idempotency_key_reused` only a key."""
    if response.status_code == 412 and not _sent_header(case, "If-Match"):
        raise AssertionError("A 412 answered a request that sent no If-Match.")
    meta = case.meta
    if response.status_code != 422 or meta is None or not meta.generation.mode.is_positive:
        return None
    if response.json().get("code") == "idempotency_key_reused":
        if not _sent_header(case, "Idempotency-Key"):
            raise AssertionError("idempotency_key_reused answered a request that sent no key.")
        return None
    rules = UNWRITABLE.get(case.operation.label)
    if rules is None:
        return None
    errors = response.json().get("errors") or []
    unexplained = [
        error
        for error in errors
        if not rules.get(error.get("field"), lambda _: False)(_value(case, error.get("field")))
    ]
    if not errors or unexplained:
        raise AssertionError(
            f"A schema-valid request was refused for a reason the schema could state: {errors}"
        )
    return None


@schemathesis.check
def created_resources_are_there(ctx: Any, response: Any, case: Any) -> bool | None:
    """schemathesis' `ensure_resource_availability` (turned off in
    schemathesis.toml), except after a POST that sent an Idempotency-Key its
    earlier, identical request had used: the answer is that request's, replayed
    (`Idempotent-Replayed: true`), naming the resource it created, which a
    DELETE since may have removed. schemathesis credits that DELETE to the
    earlier POST only, and would call the 404 that follows a resource missing
    just after its creation. (The parent's response is read from the check's
    `internals`, the built-in check's own source of it.)"""
    parent = ctx.internals.find_parent(case_id=case.id)
    parent_response = ctx.internals.find_response(case_id=parent.id) if parent else None
    if parent_response is not None and parent_response.headers.get("idempotent-replayed"):
        return None
    return ensure_resource_availability(ctx, response, case)
