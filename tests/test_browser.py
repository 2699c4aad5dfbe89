"""TaskFlow from a real browser on other origins: headless Chromium loads a
page from an allowed origin, which uses the REST API and the WebSocket as a
web app would, and a page from another origin, which the browser keeps from
reading anything. Each page posts what it saw to its own origin's server."""

import asyncio
import json
import os
import shutil
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import pytest

from .support import hypercorn, register_user

Report = dict[str, Any]

# A web app on the allowed origin: sign up, log in, create a project and a
# task, list, read the ETag, update with If-Match (fresh, then stale), and
# watch its own update arrive on the WebSocket. Every wait has a deadline.
APP_PAGE = """<!doctype html>
<title>TaskFlow from another origin</title>
<script type="module">
const {api, ws, email, password} = CONFIG;
const withDeadline = (promise, ms, what) => Promise.race([
  promise,
  new Promise((_, reject) => setTimeout(() => reject(new Error(`${what}: no answer`)), ms)),
]);

async function call(method, path, {token, body, headers = {}} = {}) {
  const init = {method, headers: {...headers}};
  if (token) init.headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await withDeadline(fetch(api + path, init), 5000, `${method} ${path}`);
  const text = await response.text();
  const header = (name) => response.headers.get(name);
  return {
    status: response.status, body: text ? JSON.parse(text) : null,
    etag: header("ETag"), location: header("Location"), requestId: header("X-Request-ID"),
    rateLimitRemaining: header("RateLimit-Remaining"),
  };
}

function watch(token, projectId, taskId) {
  return withDeadline(new Promise((resolve, reject) => {
    const frames = [];
    const socket = new WebSocket(`${ws}/ws`);
    let patched = null;  // the PATCH's answer, which may come after its event
    socket.onopen = () => socket.send(JSON.stringify({type: "auth", token}));
    socket.onerror = () => reject(new Error("the WebSocket failed"));
    socket.onclose = (event) => reject(new Error(`the WebSocket closed: ${event.code}`));
    socket.onmessage = async (message) => {
      const frame = JSON.parse(message.data);
      frames.push(frame);
      if (frame.type === "ready") {
        socket.send(JSON.stringify({type: "subscribe", project_id: projectId}));
      } else if (frame.type === "subscribed") {
        patched = call("PATCH", `/tasks/${taskId}`, {token, body: {status: "completed"}});
      } else if (frame.type === "event" && frame.event === "task.updated") {
        socket.onclose = null;
        socket.close();
        resolve({frames, patched: await patched});
      }
    };
  }), 5000, "the live event");
}

const report = {};
try {
  report.register = await call("POST", "/auth/register", {body: {email, password}});
  report.login = await call("POST", "/auth/login", {body: {email, password}});
  const token = report.login.body.access_token;
  report.project = await call("POST", "/projects", {token, body: {name: "From a browser"}});
  const projectId = report.project.body.id;
  report.task = await call(
    "POST", `/projects/${projectId}/tasks`, {token, body: {title: "Ship CORS"}});
  const taskId = report.task.body.id;
  report.list = await call("GET", `/projects/${projectId}/tasks`, {token});
  report.read = await call("GET", `/tasks/${taskId}`, {token});
  const etag = report.read.etag;
  report.update = await call("PATCH", `/tasks/${taskId}`,
    {token, body: {status: "in_progress"}, headers: {"If-Match": etag}});
  report.staleUpdate = await call("PATCH", `/tasks/${taskId}`,
    {token, body: {title: "A lost update"}, headers: {"If-Match": etag}});
  report.live = await watch(token, projectId, taskId);
} catch (error) {
  report.error = String(error);
}
await fetch("/report", {method: "POST", body: JSON.stringify(report)});
</script>
"""

# A page on an origin that is not allowed, holding a valid token.
OTHER_PAGE = """<!doctype html>
<title>Not allowed</title>
<script type="module">
const {api, token} = CONFIG;
async function attempt(path, init) {
  try {
    const response = await fetch(api + path, init);
    return {outcome: "read", status: response.status};
  } catch (error) {
    return {outcome: "refused", error: error.name};
  }
}
const report = {
  withToken: await attempt("/auth/me", {headers: {Authorization: `Bearer ${token}`}}),
  simple: await attempt("/healthz", {}),
};
await fetch("/report", {method: "POST", body: JSON.stringify(report)});
</script>
"""


class Origin:
    """A web server of its own origin: its page at ``/`` (with *config* in
    place of ``CONFIG``), and ``/report``, where the page posts what it saw."""

    def __init__(self, page: str) -> None:
        self.page = page
        self.config: dict[str, str] = {}
        self.reports: asyncio.Queue[Report] = asyncio.Queue()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                request_line, *lines = head.split("\r\n")
                method, path, _version = request_line.split(" ", 2)
                headers = {
                    name.strip().lower(): value.strip()
                    for name, _, value in (line.partition(":") for line in lines if line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                status, content = "404 Not Found", b""
                if method == "GET" and path == "/":
                    page = self.page.replace("CONFIG", json.dumps(self.config), 1)
                    status, content = "200 OK", page.encode()
                elif method == "POST" and path == "/report":
                    self.reports.put_nowait(json.loads(body))
                    status = "200 OK"
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\n"
                    f"Content-Length: {len(content)}\r\nConnection: close\r\n\r\n".encode()
                    + content
                )
                await writer.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    async def report(self, timeout: float) -> Report:
        async with asyncio.timeout(timeout):
            return await self.reports.get()


@asynccontextmanager
async def serving(origin: Origin) -> AsyncIterator[str]:
    """Serve *origin* on a free port of 127.0.0.1; yields its URL."""
    server = await asyncio.start_server(origin.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def chromium(profile: Path, url: str) -> AsyncIterator[None]:
    """Headless Chromium showing *url* (one page: headless mode opens no
    more), killed on the way out whatever happens."""
    browser = await asyncio.create_subprocess_exec(
        "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", url,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        yield
    finally:
        with suppress(ProcessLookupError):
            os.killpg(browser.pid, signal.SIGKILL)  # its own group: the browser and its children
        await asyncio.wait_for(browser.wait(), 10)


def access_lines(log: Path) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("logger") == "taskflow.access" and "method" in line]


# CI installs Chromium; there a missing browser is a failure, not a skip.
@pytest.mark.skipif(
    shutil.which("chromium") is None and not os.environ.get("CI"), reason="needs chromium"
)
async def test_a_web_app_on_an_allowed_origin_works_and_another_origin_is_refused(
    environ: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server_log = tmp_path / "server.log"
    monkeypatch.setenv("TASKFLOW_TEST_SERVER_LOG", str(server_log))
    app_origin, other_origin = Origin(APP_PAGE), Origin(OTHER_PAGE)
    async with serving(app_origin) as app_url, serving(other_origin) as other_url:
        allowed = {**environ, "TASKFLOW_CORS_ORIGINS": app_url}
        # A server that has had a WebSocket open waits out its graceful timeout.
        async with hypercorn(allowed, graceful_timeout=1) as (api, _process):
            async with httpx.AsyncClient(base_url=api) as http:
                stranger = await register_user(http)
            email = "browser@example.com"
            app_origin.config = {
                "api": api,
                "ws": api.replace("http://", "ws://", 1),
                "email": email,
                "password": "a long password",
            }
            other_origin.config = {"api": api, "token": stranger.access_token}
            async with (
                chromium(tmp_path / "app", f"{app_url}/"),
                chromium(tmp_path / "other", f"{other_url}/"),
            ):
                seen, refused = await asyncio.gather(
                    app_origin.report(timeout=30), other_origin.report(timeout=30)
                )
            log = access_lines(server_log)

    assert "error" not in seen, seen
    assert seen["register"]["status"] == 201 and seen["register"]["body"]["email"] == email
    assert seen["login"]["status"] == 200 and seen["login"]["body"]["token_type"] == "bearer"
    project_id = seen["project"]["body"]["id"]
    assert seen["project"]["status"] == 201
    assert seen["project"]["location"].endswith(f"/projects/{project_id}")
    task = seen["task"]["body"]
    assert seen["task"]["status"] == 201 and seen["task"]["etag"]
    assert [item["id"] for item in seen["list"]["body"]["items"]] == [task["id"]]
    # The headers a web app needs are exposed to it.
    read = seen["read"]
    assert read["status"] == 200 and read["etag"] == seen["task"]["etag"]
    assert read["requestId"] and read["rateLimitRemaining"]
    assert seen["update"]["status"] == 200
    assert seen["update"]["body"]["status"] == "in_progress"
    assert seen["update"]["etag"] not in (None, read["etag"])
    stale = seen["staleUpdate"]
    assert stale["status"] == 412 and stale["body"]["code"] == "precondition_failed"
    assert stale["requestId"] == stale["body"]["request_id"]
    frames = seen["live"]["frames"]
    assert [frame["type"] for frame in frames] == ["ready", "subscribed", "event"]
    event = frames[-1]
    assert (event["event"], event["project_id"]) == ("task.updated", project_id)
    assert event["data"]["status"] == "completed"
    assert event["changes"]["status"] == ["in_progress", "completed"]
    assert seen["live"]["patched"]["status"] == 200

    # The other origin's page reads nothing: its fetches reject, even with a
    # valid token, and the request behind the refused preflight never leaves
    # the browser.
    assert refused["withToken"] == {"outcome": "refused", "error": "TypeError"}
    assert refused["simple"] == {"outcome": "refused", "error": "TypeError"}
    answered = {(line["method"], line["path"], line["status"]) for line in log}
    assert ("OPTIONS", "/auth/me", 403) in answered
    assert not any(method == "GET" and path == "/auth/me" for method, path, _ in answered)
    assert ("OPTIONS", "/projects", 204) in answered
