"""gunicorn configuration for chargen; `chargen serve` runs exactly

    gunicorn -c python:service.gunicorn_conf [--bind ADDR] [--workers N]

Why these settings:
- No preload. Each worker imports TensorFlow and loads the artifact itself, after the fork:
  TensorFlow is not fork-safe, so the master never imports it (it reads only service/config.py).
- gthread workers. A request holds a thread while it is generated (a stream for its whole length),
  so threads = max_batch + max_queue + 16: every batch slot and queue place has its thread, and a
  few more answer 429s, /health and /metrics at once. A slow client stalls only its own thread; the
  engine loop never waits for a socket.
- timeout only replaces a worker whose main loop hangs: a gthread worker's heartbeat comes from its
  main loop, not from request threads, so long streams are never killed by it.
- Start-up. A worker that cannot load the artifact logs the loader's message and exits with
  status 4; gunicorn then stops at once ("App failed to load") with status 4. The check is the
  loader's own (model/artifact.py), run in the worker, not a second, partial check in the master.
- Replacement workers (spawned after start-up: a worker was killed, or more were added) wait until
  their model is loaded before they accept connections, so the running workers keep answering
  everything meanwhile. Workers of the first start accept at once and answer 503 while loading.
- Errors gunicorn answers itself (unparsable HTTP) get the service's JSON error shape (post_fork).
- Metrics. Every worker writes its Prometheus samples to PROMETHEUS_MULTIPROC_DIR (a fresh
  temporary directory unless set; cleaned at start) so /metrics on any worker shows them all;
  the gauges of a dead worker are dropped in child_exit.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from service.config import Settings, SettingsError

try:
    settings = Settings.from_env()
except SettingsError as e:
    sys.stderr.write(f"Error: {e}\n")
    sys.exit(1)

wsgi_app = "service.app:create_app()"
bind = [settings.bind]
workers = settings.workers
worker_class = "gthread"
threads = settings.gunicorn_threads
worker_connections = max(1000, 2 * threads)
timeout = settings.timeout
graceful_timeout = 30
keepalive = 5
preload_app = False
proc_name = "chargen"
control_socket_disable = True  # several servers on one host would share its default path

# Before any worker imports prometheus_client (they inherit the environment at fork).
_own_metrics_dir = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _own_metrics_dir:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="chargen-metrics-")


def on_starting(server):
    metrics_dir = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    metrics_dir.mkdir(parents=True, exist_ok=True)
    for stale in metrics_dir.glob("*.db"):  # samples of an earlier run would be added to ours
        stale.unlink()
    server.log.info("chargen: serving %s with %d worker(s) x %d threads, batch %d, queue %d per worker",
                    settings.artifact, server.cfg.workers, server.cfg.threads, settings.max_batch, settings.max_queue)


def post_fork(server, worker):
    _json_framing_errors()


def _json_framing_errors() -> None:
    """gunicorn answers requests it cannot parse itself (a request line over 4094 bytes, broken
    headers or chunked framing), before Flask sees them, with an HTML page; give those answers the
    service's one JSON error shape too. util.write_error(sock, status, reason, message) has kept
    this signature through the gunicorn versions pyproject.toml allows."""
    import json

    from gunicorn import util

    codes = {400: "bad_request", 403: "forbidden", 414: "uri_too_long", 417: "expectation_failed",
             431: "headers_too_large", 501: "not_implemented"}

    def write_error(sock, status_int, reason, mesg):
        kind = "server_error" if status_int >= 500 and status_int != 501 else "invalid_request_error"
        body = json.dumps({"error": {"message": mesg or reason, "type": kind, "param": None,
                                     "code": codes.get(status_int, "internal_error")}}).encode()
        head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")
        util.write_nonblock(sock, head.encode("latin-1") + body)

    util.write_error = write_error


def post_worker_init(worker):
    chargen = worker.wsgi.extensions["chargen"]
    chargen.start()  # load the model now, not on the first request
    scheduler = chargen.scheduler

    def failed(error: BaseException, loaded: bool) -> None:
        if loaded:
            worker.log.error("chargen: the engine loop stopped: %s; exiting so that gunicorn replaces this worker", error)
        else:
            worker.log.error("chargen: cannot load the model: %s", error)
        for handler in worker.log.error_log.handlers:
            handler.flush()
        os._exit(1 if loaded else 4)  # 4: gunicorn's "App failed to load", which stops the server

    scheduler.on_failure(failed)
    if worker.age > worker.cfg.workers:  # a replacement: let the running workers answer meanwhile
        while worker.alive and not scheduler.wait_ready(1.0):
            worker.notify()


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if _own_metrics_dir:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
