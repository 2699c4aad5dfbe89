"""The web process: hypercorn's workers under a master of TaskFlow's own.

hypercorn's own master (``hypercorn.run.run``, 0.18) has two habits a
platform cannot live with: when one worker dies, it stops every other one and
exits, so a worker killed by the OOM killer takes the whole dyno down; and it
then reports status 0 even when a worker failed at start-up (a configuration
error reads as a clean exit: pgjones/hypercorn#269). This master runs the
same worker function (``hypercorn.asyncio.run.uvloop_worker``, the one
hypercorn's master runs) on the same shared sockets, from the same settings
file, and:

- replaces a worker killed by a signal, at once, while the others go on
  serving; more than ``MAX_REPLACEMENTS_PER_MINUTE`` in a minute is a crash
  loop, and it gives up with a non-zero status;
- stops everything and exits with a worker's status when the worker exits
  with an error of its own (such as a configuration error at start-up);
- on SIGTERM or SIGINT, passes SIGTERM on to every worker (its WebSockets
  close with 1012), asks each to finish (hypercorn's graceful timeout:
  in-flight requests complete) and exits 0.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import time
from collections import deque
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from hypercorn.asyncio.run import asyncio_worker, uvloop_worker
from hypercorn.config import Config as HypercornConfig

SETTINGS_FILE = Path(__file__).with_name("hypercorn_config.py")
MAX_REPLACEMENTS_PER_MINUTE = 5
# Beyond the graceful timeout, workers that have not finished are terminated.
STOP_MARGIN_SECONDS = 5

log = logging.getLogger(__name__)


def settings(bind: str | None = None, workers: int | None = None) -> HypercornConfig:
    """hypercorn's settings from ``hypercorn_config.py``, for TaskFlow's app."""
    config = HypercornConfig.from_pyfile(str(SETTINGS_FILE))
    config.application_path = "taskflow:create_app()"
    if bind is not None:
        config.bind = [bind]
    if workers is not None:
        config.workers = workers
    return config


def serve(config: HypercornConfig) -> int:
    """Serve until told to stop; the process's exit status."""
    worker = uvloop_worker if config.worker_class == "uvloop" else asyncio_worker
    context = multiprocessing.get_context("spawn")
    sockets = config.create_sockets()
    shutdown = context.Event()
    workers: list[BaseProcess] = []
    replaced: deque[float] = deque()
    status = 0
    stop_by: float | None = None

    def start_worker() -> None:
        # A worker ignores SIGINT (a terminal's Ctrl-C reaches the whole
        # group; this process decides) and handles SIGTERM itself.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        process = context.Process(
            target=worker,
            kwargs={"config": config, "sockets": sockets, "shutdown_event": shutdown},
        )
        process.start()
        signal.signal(signal.SIGINT, previous)
        workers.append(process)

    def stop(*_: Any) -> None:
        nonlocal stop_by
        if stop_by is None:
            stop_by = time.monotonic() + config.graceful_timeout + STOP_MARGIN_SECONDS
            shutdown.set()
            # Passed on, so that each worker closes its WebSockets with 1012
            # (clients reconnect elsewhere) even when only this process was
            # signalled, as `docker stop` does.
            for process in workers:
                if process.pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(process.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        for _ in range(config.workers):
            start_worker()
        while workers:
            wait([process.sentinel for process in workers], timeout=1)
            for process in [process for process in workers if process.exitcode is not None]:
                workers.remove(process)
                process.join()
                if stop_by is not None:
                    continue
                code = process.exitcode or 0
                if code > 0:
                    log.error("a web worker exited with status %d: stopping", code)
                    status = code
                    stop()
                    continue
                # Killed by a signal (a negative status), or ended by itself.
                now = time.monotonic()
                replaced.append(now)
                while replaced and replaced[0] < now - 60:
                    replaced.popleft()
                if len(replaced) > MAX_REPLACEMENTS_PER_MINUTE:
                    log.error("web workers keep dying (%d in a minute): stopping", len(replaced))
                    status = 1
                    stop()
                    continue
                log.warning("a web worker ended (status %d): replacing it", code)
                start_worker()
            if stop_by is not None and time.monotonic() > stop_by:
                for process in workers:
                    process.terminate()
    finally:
        for process in workers:
            process.kill()
            process.join()
        for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
            sock.close()
    return status
