"""The OpenAPI document, with every route's errors described by construction.

Routes return plain data that orjson serialises (no model round trip on the
way out); ``responds`` documents the body's model, which the tests and the
schema fuzzer hold the route to. Each operation also lists the problem+json
statuses it can answer with: those its decorators imply (``require_auth`` →
401, a JSON body → 400/413/415/422, an id in the path → 404, …) plus those a
route declares with ``documents``. Success responses carry OpenAPI links
(``LINKS``) to the operations that take a value they return, so a client (and
the fuzzer's stateful phase) follows real ids, cursors and members rather than
made-up ones.
"""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus
from typing import Any, TypeVar

from pydantic import BaseModel
from quart_schema import OpenAPIProvider
from quart_schema.validation import (
    QUART_SCHEMA_QUERYSTRING_ATTRIBUTE,
    QUART_SCHEMA_REQUEST_ATTRIBUTE,
)
from werkzeug.routing import Rule

from .idempotency import KEY_HEADER, KEYED_METHODS, REPLAYED_HEADER, keeps_responses
from .security import LOGIN_ONLY_ATTRIBUTE, REQUIRES_AUTH_ATTRIBUTE

DOCUMENTED_ERRORS_ATTRIBUTE = "_taskflow_documented_errors"
RESPONSES_ATTRIBUTE = "_taskflow_responses"
EVERY_ROUTE = (429, 500, 503)
BEARER = "bearer"

F = TypeVar("F", bound=Callable[..., Any])


def link(
    operation_id: str, body: dict[str, str] | None = None, **parameters: str
) -> dict[str, Any]:
    """An OpenAPI link to *operation_id*, its parameters and body fields taken
    from this response (``$response.body#/…``) or request (``$request.path.…``)."""
    definition: dict[str, Any] = {"operationId": operation_id, "parameters": parameters}
    if body is not None:
        definition["requestBody"] = body
    return definition


THE_PROJECT = "$response.body#/id"
SAME_PROJECT = "$request.path.project_id"
THE_TASK = "$response.body#/id"
THE_TASK_ASSIGNEE = {"assignee_id": "$response.body#/assignee_id"}
PROJECT_LINKS = {
    "GetProject": link("get_get_project", project_id=THE_PROJECT),
    "ReplaceProject": link("put_replace_project", project_id=THE_PROJECT),
    "PatchProject": link("patch_patch_project", project_id=THE_PROJECT),
    "DeleteProject": link("delete_delete_project", project_id=THE_PROJECT),
    "ListMembers": link("get_list_members", project_id=THE_PROJECT),
    "AddMember": link("post_add_member", project_id=THE_PROJECT),
    "RemoveOwner": link(
        "delete_remove_member", project_id=THE_PROJECT, user_id="$response.body#/owner_id"
    ),
    "ListEvents": link("get_list_events", project_id=THE_PROJECT),
    "ListTasks": link("get_list_tasks", project_id=THE_PROJECT),
    # The owner is a member, so may be assigned.
    "CreateTask": link(
        "post_create_task", {"assignee_id": "$response.body#/owner_id"}, project_id=THE_PROJECT
    ),
    "ListWebhooks": link("get_list_webhooks", project_id=THE_PROJECT),
    "CreateWebhook": link("post_create_webhook", project_id=THE_PROJECT),
}
TASK_LINKS = {
    "GetTask": link("get_get_task", task_id=THE_TASK),
    "ReplaceTask": link("put_replace_task", THE_TASK_ASSIGNEE, task_id=THE_TASK),
    "PatchTask": link("patch_patch_task", THE_TASK_ASSIGNEE, task_id=THE_TASK),
    "DeleteTask": link("delete_delete_task", task_id=THE_TASK),
    "ListTasks": link("get_list_tasks", project_id="$response.body#/project_id"),
}
THE_WEBHOOK = "$response.body#/id"
WEBHOOK_LINKS = {
    name: link(operation, project_id=SAME_PROJECT, webhook_id=THE_WEBHOOK)
    for name, operation in (
        ("PatchWebhook", "patch_patch_webhook"),
        ("DeleteWebhook", "delete_delete_webhook"),
        ("RotateSecret", "post_rotate_secret"),
        ("ListDeliveries", "get_list_deliveries"),
        ("Replay", "post_replay"),
    )
}
# (endpoint, status) → the links of that response.
LINKS: dict[tuple[str, int], dict[str, Any]] = {
    ("projects.list_projects", 200): {
        "NextPage": link("get_list_projects", cursor="$response.body#/next_cursor")
    },
    ("projects.create_project", 201): PROJECT_LINKS,
    ("projects.get_project", 200): PROJECT_LINKS,
    ("projects.add_member", 201): {
        "RemoveMember": link(
            "delete_remove_member", project_id=SAME_PROJECT, user_id="$response.body#/user_id"
        ),
        "AssignTask": link(
            "post_create_task", {"assignee_id": "$response.body#/user_id"}, project_id=SAME_PROJECT
        ),
    },
    ("projects.list_events", 200): {
        "NextPage": link(
            "get_list_events", project_id=SAME_PROJECT, since="$response.body#/next_cursor"
        )
    },
    ("tasks.list_tasks", 200): {
        # A cursor belongs to its list and sort.
        "NextPage": link(
            "get_list_tasks",
            project_id=SAME_PROJECT,
            sort="$request.query.sort",
            cursor="$response.body#/next_cursor",
        )
    },
    ("webhooks.create_webhook", 201): WEBHOOK_LINKS,
    ("webhooks.patch_webhook", 200): WEBHOOK_LINKS,
    ("webhooks.list_deliveries", 200): {
        "NextPage": link(
            "get_list_deliveries",
            project_id=SAME_PROJECT,
            webhook_id="$request.path.webhook_id",
            cursor="$response.body#/next_cursor",
        )
    },
    ("tasks.create_task", 201): TASK_LINKS,
    ("tasks.get_task", 200): TASK_LINKS,
    ("tasks.replace_task", 200): TASK_LINKS,
    ("tasks.patch_task", 200): TASK_LINKS,
}


class FieldError(BaseModel):
    field: str
    message: str


class Problem(BaseModel):
    """An RFC 9457 problem: the body of every 4xx and 5xx."""

    type: str
    title: str
    status: int
    code: str
    detail: str
    request_id: str | None
    errors: list[FieldError] | None = None


def documents(*statuses: int) -> Callable[[F], F]:
    """Declare error statuses a route answers with beyond those its decorators imply."""

    def decorator(view: F) -> F:
        documented = set(getattr(view, DOCUMENTED_ERRORS_ATTRIBUTE, ()))
        setattr(view, DOCUMENTED_ERRORS_ATTRIBUTE, documented | set(statuses))
        return view

    return decorator


def responds(
    model: type[BaseModel] | None, status: int = 200, *, headers: tuple[str, ...] = ()
) -> Callable[[F], F]:
    """Document that the route answers *status* with a body of *model* (None:
    no body) and the *headers* named (from ``RESPONSE_HEADERS``)."""

    def decorator(view: F) -> F:
        responses = dict(getattr(view, RESPONSES_ATTRIBUTE, {}))
        responses[status] = (model, headers)
        setattr(view, RESPONSES_ATTRIBUTE, responses)
        return view

    return decorator


def takes_idempotency_key(method: str) -> bool:
    return method.upper() in KEYED_METHODS


def error_statuses(view: Callable[..., Any], rule: Rule, method: str) -> set[int]:
    statuses = set(EVERY_ROUTE) | set(getattr(view, DOCUMENTED_ERRORS_ATTRIBUTE, ()))
    if getattr(view, REQUIRES_AUTH_ATTRIBUTE, False):
        statuses.add(401)
        if method.upper() not in ("GET", "HEAD"):
            statuses.add(403)  # a read-only API token
    if getattr(view, LOGIN_ONLY_ATTRIBUTE, False):
        statuses.add(403)
    if takes_idempotency_key(method):
        statuses.add(400)
    if keeps_responses(view, method):
        statuses |= {409, 422}
    if getattr(view, QUART_SCHEMA_REQUEST_ATTRIBUTE, None) is not None:
        statuses |= {400, 413, 415, 422}
    if getattr(view, QUART_SCHEMA_QUERYSTRING_ATTRIBUTE, None) is not None:
        statuses.add(422)
    if rule.arguments:
        statuses.add(404)
    return statuses


RESPONSE_HEADERS: dict[str, dict[str, Any]] = {
    "ETag": {
        "description": "The resource's version: send it in `If-Match` or `If-None-Match`.",
        "schema": {"type": "string"},
    },
    "Location": {"description": "The path of the resource created.", "schema": {"type": "string"}},
    REPLAYED_HEADER: {
        "description": "`true` when this is the kept response of an earlier request "
        f"with the same `{KEY_HEADER}`.",
        "schema": {"type": "string", "enum": ["true"]},
    },
}
# The keys `idempotency.key_of_request` accepts: 1-255 visible ASCII characters
# (a value that starts and ends with `"` being the quoted form), or the quoted
# form: an RFC 8941 string of 1-255 of them, `"` and `\` escaped.
KEY_PATTERN = (
    r'^(?:[!-~]|[!#-~][!-~]{0,253}[!-~]|"[!-~]{0,253}[!#-~]|"(?:[!#-\[\]-~]|\\["\\]){1,255}")$'
)
KEY_PARAMETER = {
    "name": KEY_HEADER,
    "in": "header",
    "required": False,
    "schema": {"type": "string", "pattern": KEY_PATTERN},
}
IF_MATCH = {
    "name": "If-Match",
    "in": "header",
    "required": False,
    "description": "The `ETag` the write is based on: a stale one is a 412 and nothing changes.",
    "schema": {"type": "string"},
}
IF_NONE_MATCH = {
    "name": "If-None-Match",
    "in": "header",
    "required": False,
    "description": "The `ETag` the client holds: while it is current, a 304 with no body.",
    "schema": {"type": "string"},
}


class TaskFlowOpenAPIProvider(OpenAPIProvider):
    def build_paths(self, rule: Rule) -> tuple[dict[str, Any], dict[str, Any]]:
        paths, components = super().build_paths(rule)
        view = self._app.view_functions[rule.endpoint]
        problem = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(problem.pop("$defs", {}), Problem=problem)
        declared: dict[int, tuple[type[BaseModel] | None, tuple[str, ...]]]
        declared = getattr(view, RESPONSES_ATTRIBUTE, {})
        for operations in paths.values():
            for method, operation in operations.items():
                successes, models = self.success_responses(rule, view, declared, method)
                components.update(models)
                responses = {**operation["responses"], **successes}
                statuses = error_statuses(view, rule, method)
                for status in sorted(statuses):
                    responses[str(status)] = {
                        "description": HTTPStatus(status).phrase,
                        "content": {
                            "application/problem+json": {
                                "schema": {"$ref": "#/components/schemas/Problem"}
                            }
                        },
                    }
                operation = operations[method] = {**operation, "responses": responses}
                if "requestBody" in operation:
                    operation["requestBody"] = {**operation["requestBody"], "required": True}
                if getattr(view, REQUIRES_AUTH_ATTRIBUTE, False):
                    operation["security"] = [{BEARER: []}]
                parameters = list(operation.get("parameters", []))
                if takes_idempotency_key(method):
                    keeps = keeps_responses(view, method)
                    parameters.append({**KEY_PARAMETER, "description": key_description(keeps)})
                if 412 in statuses:
                    parameters.append(IF_MATCH)
                if 304 in declared:
                    parameters.append(IF_NONE_MATCH)
                if parameters:
                    operation["parameters"] = parameters
        return paths, components

    def success_responses(
        self,
        rule: Rule,
        view: Callable[..., Any],
        declared: dict[int, tuple[type[BaseModel] | None, tuple[str, ...]]],
        method: str,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        successes: dict[str, Any] = {}
        components: dict[str, Any] = {}
        for status, (model, headers) in declared.items():
            if model is None:
                response: dict[str, Any] = {"description": HTTPStatus(status).phrase}
            else:
                response, models = self.build_response_object(model, None)
                components.update(models)
            names = [*headers, *([REPLAYED_HEADER] if keeps_responses(view, method) else [])]
            if names:
                response = {**response, "headers": {name: RESPONSE_HEADERS[name] for name in names}}
            links = LINKS.get((rule.endpoint, status))
            if links:
                response = {**response, "links": links}
            successes[str(status)] = response
        return successes, components


def key_description(kept: bool) -> str:
    if kept:
        return (
            "Makes a retry safe: the response is kept for 24 hours, and a repeat with the "
            "same key, method, path and body gets it again (`Idempotent-Replayed: true`) "
            "and changes nothing. The same key for another request is a 422 "
            "`idempotency_key_reused`; while its first request runs, a 409. "
            'The quoted form `"…"` names the same key.'
        )
    return (
        "Checked (a malformed key is a 400) but not kept: this route's response is or "
        "makes a credential or a secret, which TaskFlow never stores; see the README."
    )
