"""gunicorn configuration for chargen; `chargen serve` runs exactly

    gunicorn -c python:service.gunicorn_conf [--bind ADDR] [--workers N]

Why these settings:
- No preload. Each worker loads its models itself, after the fork (one engine and engine loop per
  model): the master never imports the engine (it reads only service/config.py and
  service/lifecycle.py), so nothing that is not fork-safe is ever forked.
- gthread workers. A request holds a thread while it is generated (a stream for its whole length),
  so threads = models x (max_batch + max_queue) + 16: every batch slot and queue place of every
  model has its thread, and a few more answer 429s, /health and /metrics at once. The count of
  models is that of the start: models a reload adds share these threads (set CHARGEN_THREADS to
  leave room). A slow client stalls only its own thread; an engine loop never waits for a socket.
- timeout only replaces a worker whose main loop hangs: a gthread worker's heartbeat comes from its
  main loop, not from request threads, so long streams are never killed by it.
- Start-up. A worker that cannot load one of its models logs the loader's message and exits with
  status 4; gunicorn then stops at once ("App failed to load") with status 4. The check is the
  loader's own (model/runtime/artifact.py), run in the worker, not a second, partial check in the master.
- Replacement workers (spawned after start-up: a worker was killed, or more were added, or a
  reload) wait until their model is loaded before they accept connections, so the running workers
  keep answering everything meanwhile. Workers of the first start accept at once and answer 503
  while loading.
- Errors gunicorn answers itself (unparsable HTTP) get the service's JSON error shape (post_fork).
- Metrics. Every worker writes its Prometheus samples to PROMETHEUS_MULTIPROC_DIR (a fresh
  temporary directory unless set; cleaned at start) so /metrics on any worker shows them all;
  the gauges of a dead worker are dropped in child_exit.

Drain (SIGTERM, what Docker and Kubernetes send; service/lifecycle.py). gunicorn's master closes
its listening socket, sends SIGTERM to every worker, waits graceful_timeout (CHARGEN_GRACEFUL_TIMEOUT,
30 s) and then kills what is left; it exits 0 either way. A gthread worker stops its main loop
and waits, up to graceful_timeout, for its open requests and streams to end; gunicorn 27 keeps its
idle kept-alive connections for at most 2 s meanwhile (a request arriving on one is answered, with
`Connection: close`), earlier versions close them at once.
Added here: /health answers 503 `draining` on the connections still open, and the worker closes its
copy of the listening socket at once (after taking what the kernel already queued): gunicorn >= 24
keeps it open until the worker exits, so new connections would be accepted by the kernel, wait, and
be reset at the end; closed, they are refused at once, which a load balancer retries on another
replica. Streams longer than graceful_timeout are cut when the master kills the worker.

Reload (SIGHUP; service/lifecycle.py). gunicorn re-reads this file (the module is cached: the
settings stay those of the start), calls on_reload, forks a new set of workers and sends SIGTERM
to the old ones at once; a worker that then exits with status 3 or 4 (cannot boot, cannot load)
halts the whole server, and an exception in on_reload ends the master. So:
- Workers never load the configured artifacts themselves but a private snapshot of every model that
  the master copied into a temporary directory (symlinks followed, a run directory's best/): at
  start, and in on_reload, which first lists the models again (a CHARGEN_MODELS directory may have
  gained or lost some) and loads each copy in a subprocess exactly as a worker loads it (artifact
  loader, engine, one short generation; all models at once, up to 180 s, the master waits
  meanwhile). A model whose copy loads is served from it by the new workers; one that does not is
  logged and keeps its previous copy (a model new to this reload is then not served), so the
  service keeps serving what it had. If the models cannot be listed (CHARGEN_MODELS names a
  directory gone missing, a name now clashes) or the default model has no copy that loads, the
  whole reload keeps the previous snapshot. A deploy therefore replaces or adds an artifact
  directory atomically (a symlink flip such as `ln -sfn v2 next && mv -T next current`, or a
  rename), then sends SIGHUP. A worker that crashes later is replaced by one loading the same
  snapshot, never by a half-copied deploy. The workers get the snapshot as CHARGEN_MODELS
  NAME=PATH pairs and CHARGEN_DEFAULT_MODEL (post_fork); /info's model.path names the copy, the
  model's name stays the configured one.
- An old worker told to stop by a reload keeps accepting until a worker of the new reload has
  loaded its model (or graceful_timeout has passed), then drains as above: no moment without a
  worker that accepts. For a while the old and the new workers (and, before, the check) run side by
  side: a reload needs memory for about twice the workers.
- The master handles no signal while it checks and while it waits (up to graceful_timeout) for
  the old workers to exit, so a SIGTERM right after a SIGHUP starts the drain that much later.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import struct
import sys
import tempfile
from pathlib import Path

from service import lifecycle
from service.config import Settings, SettingsError

try:
    settings = Settings.from_env()
    models = settings.models_to_serve()  # read again on every reload (Snapshots.take)
except SettingsError as e:
    sys.stderr.write(f"Error: {e}\n")
    sys.exit(1)

wsgi_app = "service.app:create_app()"
bind = [settings.bind]
workers = settings.workers
worker_class = "gthread"
threads = settings.gunicorn_threads(len(models.sources))
worker_connections = max(1000, 2 * threads)
timeout = settings.timeout
graceful_timeout = settings.graceful_timeout
keepalive = 5
preload_app = False
proc_name = "chargen"
control_socket_disable = True  # several servers on one host would share its default path

# Before any worker imports prometheus_client (they inherit the environment at fork).
_own_metrics_dir = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _own_metrics_dir:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="chargen-metrics-")

snapshots: lifecycle.Snapshots | None = None  # made in on_starting; workers inherit it at fork


def on_starting(server):
    metrics_dir = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    metrics_dir.mkdir(parents=True, exist_ok=True)
    for stale in metrics_dir.glob("*.db"):  # samples of an earlier run would be added to ours
        stale.unlink()
    server.log.info("chargen: serving %s (default %s) with %d worker(s) x %d threads, batch %d, queue %d per model "
                    "and worker", _described(models), models.default, server.cfg.workers, server.cfg.threads,
                    settings.max_batch, settings.max_queue)
    global snapshots
    snapshots = lifecycle.Snapshots(settings)
    try:
        snapshots.take(check=False)  # the first workers' own load is the check at start
    except lifecycle.SnapshotError as e:  # they will load the sources in place and report why it fails
        server.log.warning("chargen: cannot copy the models: %s", e)


def _described(models) -> str:
    return ", ".join(f"{m.name}={m.path}" for m in models.sources)


def on_reload(server):
    # Nothing may escape: an exception in this hook ends gunicorn's master, workers and all.
    server.log.info("chargen: reload: listing the models again and loading each in a subprocess before new workers use it")
    try:
        current, failures = snapshots.take(check=True)
        for name, reason, kept in failures:
            if kept:
                server.log.error("chargen: reload: the model %r cannot be loaded, so the new workers load the previous "
                                 "one again: %s", name, reason)
            else:
                server.log.error("chargen: reload: the new model %r cannot be loaded and is not served: %s", name, reason)
        server.log.info("chargen: reload: new workers serve %s (default %s)", _described(current), current.default)
    except Exception as e:  # noqa: BLE001 - SnapshotError, or a subprocess could not even start
        server.log.error("chargen: reload: the new models cannot be loaded, so the new workers load the previous "
                         "ones again: %s", e)
    try:
        snapshots.begin_reload()
    except OSError as e:  # the old workers then drain at once instead of waiting for the new ones
        server.log.error("chargen: reload: cannot record the reload: %s", e)


def when_ready(server):
    # A client that stops sending in the middle of its request (headers or body) holds the request
    # thread that reads it. The kernel ends each read that waits this long for the client
    # (SO_RCVTIMEO, which Linux gives every connection accepted on the listener); gunicorn then
    # closes the connection. Waiting for a new request on an idle connection is keepalive's.
    wait = struct.pack("ll", settings.client_timeout, 0)
    for listener in server.LISTENERS:
        listener.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, wait)


class _ClientTimeouts(logging.Filter):
    """gunicorn logs a client that stopped sending (the wait of when_ready ran out) as an error with a
    traceback: one line of info says what happened instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], BlockingIOError) and record.getMessage().startswith("Socket error"):
            record.msg, record.args, record.exc_info, record.exc_text = (
                "a client stopped sending its request for CHARGEN_CLIENT_TIMEOUT (%d s): connection closed", (settings.client_timeout,),
                None, None)
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def post_fork(server, worker):
    worker.log.error_log.addFilter(_ClientTimeouts())
    _json_framing_errors()
    if snapshots is not None and snapshots.current is not None:
        # read by create_app() in this worker: the copies under their configured names
        os.environ["CHARGEN_MODELS"] = snapshots.current.pairs()
        os.environ["CHARGEN_DEFAULT_MODEL"] = snapshots.current.default
        os.environ.pop("CHARGEN_ARTIFACT", None)
        os.environ.pop("CHARGEN_MODEL_NAME", None)


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
    chargen.start()  # load the models now, not on the first request

    def failed(served, error: BaseException, loaded: bool) -> None:
        if loaded:
            worker.log.error("chargen: the engine loop of the model %r stopped: %s; exiting so that gunicorn replaces "
                             "this worker", served.name, error)
        else:
            configured = next((m for m in models.sources if m.name == served.name), served.scheduler.source)
            worker.log.error("chargen: cannot load the model %r (%s): %s", served.name, configured.origin, error)
        for handler in worker.log.error_log.handlers:
            handler.flush()
        os._exit(1 if loaded else 4)  # 4: gunicorn's "App failed to load", which stops the server

    chargen.on_failure(failed)
    lifecycle.handle_sigterm(worker, chargen, snapshots)
    if worker.age > worker.cfg.workers:  # a replacement: let the running workers answer meanwhile
        while worker.alive and not chargen.wait_ready(1.0):
            worker.notify()
        if chargen.ready and snapshots is not None:
            snapshots.mark_ready()  # the workers this one replaces after a reload may stop now


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
    if snapshots is not None:
        snapshots.forget(worker.pid)


def on_exit(server):
    if _own_metrics_dir:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
    if snapshots is not None:
        snapshots.remove()
