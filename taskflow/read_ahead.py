"""What a read's view will look up in the cache, read ahead in the request's
one round trip to Redis (``limits.Limiter``), so that the view needs none.

A project's routes look up the caller's role in the project. A task's route
looks up the task, and then the caller's role in the task's project, which
only the task names: the step reads the task's entry and, in the same script,
the role in the project that entry names (a task's entry names its project
first, and a task never moves to another project).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from quart import request

from . import cache
from .access import role_key
from .data.tasks import task_key
from .db import READ_METHODS
from .tokens import Caller

# Stands for the project id in the names of the keys read after a task's entry.
PLACEHOLDER = uuid.UUID(int=0)


@dataclass(frozen=True)
class ReadAhead:
    keys: Sequence[cache.CacheKey[Any]] = ()
    # The keys to read next, named after the project that the first key's
    # entry names.
    then: Callable[[uuid.UUID], Sequence[cache.CacheKey[Any]]] | None = None

    def redis_keys(self) -> list[str]:
        return cache.redis_keys(self.keys)

    def then_template(self) -> str | None:
        """The Redis names of the ``then`` keys, space separated, with ``{}``
        for the project id (the admission script fills it in)."""
        if self.then is None:
            return None
        names = cache.redis_keys(self.then(PLACEHOLDER))
        return " ".join(names).replace(str(PLACEHOLDER), "{}")

    def keep(self, values: Sequence[bytes | None]) -> None:
        """Keep what the script read for the view: the keys' values, then the
        project id it found and the ``then`` keys' values."""
        count = 2 * len(self.keys)
        cache.keep_read(self.keys, values[:count])
        project_id = values[count] if len(values) > count else None
        if self.then is not None and project_id is not None:
            cache.keep_read(self.then(uuid.UUID(project_id.decode())), values[count + 1 :])


def read_ahead(caller: Caller) -> ReadAhead:
    """What this request's view will look up in the cache, if it is a read."""
    if request.method not in READ_METHODS or not cache.enabled():
        return ReadAhead()
    arguments = request.view_args or {}
    project_id, task_id = arguments.get("project_id"), arguments.get("task_id")

    def role(project_id: uuid.UUID) -> list[cache.CacheKey[Any]]:
        return [role_key(project_id, caller.user_id)]

    if isinstance(project_id, uuid.UUID):
        return ReadAhead(role(project_id))
    if isinstance(task_id, uuid.UUID):
        return ReadAhead([task_key(task_id)], then=role)
    return ReadAhead()
