"""hypercorn's settings for every way TaskFlow is served: the Procfile's
``web:`` line (``python -m taskflow serve``: hypercorn's workers under
TaskFlow's master, ``supervisor.py``), ``python -m taskflow run``, the tests'
live servers and the benchmark (``hypercorn --config
file:taskflow/hypercorn_config.py``: read as a file, since a buildpack
installs the dependencies but not the project).

Read by hypercorn as module attributes; ``PORT`` and ``WEB_CONCURRENCY`` come
from the platform.
"""

from __future__ import annotations

import os

bind = [f"0.0.0.0:{os.environ.get('PORT', '8000')}"]
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "uvloop"
# Inside the 30 s a platform waits between SIGTERM and SIGKILL.
graceful_timeout = 20
# The contract's 64 KiB: a larger WebSocket message is closed with 1009 by
# hypercorn before it is buffered whole (its default is 16 MiB).
websocket_max_message_size = 64 * 1024
# A connection that sends nothing for this long is closed: a slow or idle
# client cannot hold one forever (an idle keep-alive connection goes after
# hypercorn's 5 s keep-alive timeout). A WebSocket client that only listens
# keeps its socket by answering pings, as every WebSocket client does by
# itself. Pinged every 5 s at most: hypercorn's pinger of a socket wakes only
# then to see it closed, and a stopping worker waits for it.
read_timeout = int(os.environ.get("TASKFLOW_READ_TIMEOUT_SECONDS", "30"))
websocket_ping_interval = min(read_timeout / 2, 5)
# TaskFlow logs one JSON line per request; hypercorn's own access log is off
# (its default), and responses do not name the server.
accesslog = None
include_server_header = False
