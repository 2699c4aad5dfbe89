"""Schema fuzzing: schemathesis against a live server's /openapi.json.

Every phase (examples, coverage, fuzzing, stateful) runs, authenticated, with
the configuration in schemathesis.toml and the check in tests/fuzz_checks.py;
any failure of its checks fails the test, with schemathesis' report.
"""

import asyncio
import os
import sys
from pathlib import Path

import httpx
import pytest
from quart import Quart

from .support import PROJECT_ROOT, live_server, register_user

# The users schemathesis.toml names: it logs in as the first and adds both as members.
FUZZ_EMAILS = ("fuzz-owner@example.com", "fuzz-member@example.com")
FUZZ_PASSWORD = "fuzz password, not a secret"
FUZZ_TIMEOUT = 600  # seconds: a hard stop well above the few minutes a run takes


@pytest.fixture
def environ(environ: dict[str, str]) -> dict[str, str]:
    """Webhook URLs taken without a DNS lookup, and nothing sent to the hosts
    the fuzzer makes up, by the server or by the app of the `app` fixture."""
    return {
        **environ,
        "TASKFLOW_WEBHOOK_ALLOW_PRIVATE": "true",
        "TASKFLOW_WEBHOOK_CONCURRENCY": "0",
    }


async def test_schemathesis_finds_nothing(app: Quart, environ: dict[str, str]) -> None:
    # `app` empties the tables afterwards; the server shares its database.
    environ = {
        **environ,
        "TASKFLOW_RATE_LIMIT_PER_MINUTE": "1000000",
        "TASKFLOW_AUTH_RATE_LIMIT_PER_MINUTE": "1000000",
        "TASKFLOW_WS_CONNECTIONS_PER_MINUTE": "1000000",
        "TASKFLOW_WS_MESSAGES_PER_SECOND": "1000000",
    }
    async with live_server(environ) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            users = [await register_user(http, email, FUZZ_PASSWORD) for email in FUZZ_EMAILS]
            # Something to find: a project of the fuzz user, with a task.
            headers = users[0].headers
            response = await http.post("/projects", json={"name": "Fuzzed"}, headers=headers)
            assert response.status_code == 201, response.text
            tasks = f"/projects/{response.json()['id']}/tasks"
            response = await http.post(tasks, json={"title": "A task"}, headers=headers)
            assert response.status_code == 201, response.text
        st = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "st"), "run", f"{url}/openapi.json",
            "--phases", "examples,coverage,fuzzing,stateful", "--no-color",
            cwd=PROJECT_ROOT,
            # Its hooks import taskflow, which is not installed (a build
            # installs the dependencies only, from the lock).
            env={
                **os.environ,
                "TASKFLOW_FUZZ_PASSWORD": FUZZ_PASSWORD,
                "PYTHONPATH": str(PROJECT_ROOT),
            },
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            output, _ = await asyncio.wait_for(st.communicate(), FUZZ_TIMEOUT)
        finally:
            if st.returncode is None:
                st.kill()
                await st.wait()
    report = output.decode(errors="replace")
    # A failed check makes st exit non-zero. A warning does not, nor should
    # it fail this test: schemathesis warns, now and then, that random ids
    # kept finding nothing (404) for an operation the stateful phase reached
    # too rarely.
    assert st.returncode == 0, report
    assert "FAILURES" not in report, report
