"""Deploys that drop no request, with a real gunicorn (service/gunicorn_conf.py, service/lifecycle.py).

Drain: SIGTERM lets a long stream finish (finish_reason "length"), refuses new connections at
once, answers /health 503 on a connection still open, and the server exits 0. Reload: under a
steady stream of requests, SIGHUP after the served artifact (a symlink) is flipped to a model
trained on another sentence fails no request and later answers come from the new model; SIGHUP
after a flip to a broken artifact logs the loader's error and the service keeps serving the model
it had. With CHARGEN_MODELS, SIGHUP reads its directory again: a model added there is served by the
new workers (from their private copy), a broken one added with it is logged and left out, and the
others stay. The test clients open a connection per request, as nginx does in front of chargen
(deploy/nginx): a client that reuses a kept-alive connection to the worker itself can meet the
ordinary keep-alive race when a stopping worker closes it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import requests

from conftest import OTHER, PERIODIC
from polling import wait_for
from server import REQUEST_TIMEOUT, ROOT, running_server, server_env

pytestmark = pytest.mark.slow  # real gunicorn, reloaded and drained

LONG = 150_000  # characters of the streams that must outlive a signal (a few seconds here)
LOAD_DELAY = 2  # seconds added to every model load in the reload test


def flip(link: Path, target: Path) -> None:
    """Point `link` at `target` atomically (a new symlink renamed over the old one), as a deploy does."""
    tmp = link.with_name(link.name + ".new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def stream_text(response: requests.Response) -> tuple[str, dict]:
    """The text of a /v1/generate stream and its final event."""
    text, done = [], None
    buffer = b""
    for chunk in response.iter_content(chunk_size=None):
        buffer += chunk
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            event = json.loads(block.decode()[len("data: "):])
            if event.get("done"):
                done = event
            elif "text" in event:
                text.append(event["text"])
    return "".join(text), done


class _Rest:
    """A response-like object over a first chunk and the rest of an iterator (for stream_text)."""

    def __init__(self, first: bytes, rest):
        self.first, self.rest = first, rest

    def iter_content(self, chunk_size=None):
        yield self.first
        yield from self.rest


def test_graceful_timeout_is_the_setting(tmp_path):
    code = "import service.gunicorn_conf as c; print(c.graceful_timeout)"
    env = server_env("unused", {"CHARGEN_GRACEFUL_TIMEOUT": "17", "PROMETHEUS_MULTIPROC_DIR": tmp_path})
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "17", out.stderr


def test_sigterm_drains_a_long_stream_refuses_new_connections_and_exits_0(tiny_artifact):
    env = {"CHARGEN_MAX_CHARS": LONG, "CHARGEN_GRACEFUL_TIMEOUT": 25}
    with running_server(tiny_artifact, env=env) as server:
        kept = requests.Session()  # a connection opened before the signal (a load balancer's)
        assert kept.get(server.url + "/health", timeout=REQUEST_TIMEOUT).status_code == 200
        stream = server.post("/v1/generate", json={"prompt": "the", "max_chars": LONG, "temperature": 0, "stream": True},
                             stream=True)
        assert stream.status_code == 200
        chunks = stream.iter_content(chunk_size=None)
        first = next(chunks)
        # the stream is still being generated when the signal comes: it has to outlive it
        assert kept.get(server.url + "/info", timeout=REQUEST_TIMEOUT).json()["engine"]["active"] == 1

        server.process.send_signal(signal.SIGTERM)
        answers = []

        def draining() -> bool:
            answers.append(kept.get(server.url + "/health", timeout=REQUEST_TIMEOUT))
            return answers[-1].status_code == 503

        assert wait_for(draining, timeout=30), answers[-1].text
        health = answers[-1]
        assert health.json()["error"]["code"] == "draining"
        assert health.headers.get("Connection", "").lower() == "close"

        def refused() -> bool:  # a new connection fails; one accepted and left waiting raises ReadTimeout here
            try:
                requests.get(server.url + "/health", timeout=REQUEST_TIMEOUT)
            except requests.ConnectionError as e:
                return not isinstance(e, requests.Timeout)
            return False

        assert wait_for(refused, timeout=30), "new connections are still accepted while the worker drains"

        text, done = stream_text(_Rest(first, chunks))
        assert done is not None, "the stream ended without its final event"
        assert done["choices"][0]["finish_reason"] == "length"
        assert done["usage"]["completion_chars"] == LONG and len(text) == LONG

        assert server.process.wait(35) == 0
        log = server.log()
    assert "Shutting down: Master" in log and "Traceback" not in log and "WORKER TIMEOUT" not in log
    # the worker itself exits cleanly (ONNX Runtime loaded in the master before the fork made every
    # worker abort as it exited: "terminate called after throwing an instance of 'std::system_error'")
    assert "Worker exiting" in log and "terminate called" not in log and "SIGABRT" not in log, log[-2000:]


def test_requests_that_outlast_the_grace_period_are_told_to_retry_not_cut(tiny_artifact):
    """A drain gives requests CHARGEN_GRACEFUL_TIMEOUT; those still running then were cut without a
    word (a stream with no final event, an empty reply): they now end a little before it, with a 503
    shutting_down that a client or a load balancer can retry elsewhere."""
    endless = 1_000_000  # far more than the tiny model writes in the 3 s grace
    env = {"CHARGEN_MAX_CHARS": endless, "CHARGEN_GRACEFUL_TIMEOUT": 3}
    with running_server(tiny_artifact, env=env) as server:
        body = {"prompt": "the", "max_chars": endless, "temperature": 0}
        stream = server.post("/v1/generate", json={**body, "stream": True}, stream=True)
        assert stream.status_code == 200
        chunks = stream.iter_content(chunk_size=None)
        first = next(chunks)
        whole = {}
        waiting = threading.Thread(target=lambda: whole.update(r=requests.post(server.url + "/v1/generate", json=body,
                                                                               timeout=REQUEST_TIMEOUT)))
        waiting.start()
        assert wait_for(lambda: server.get("/info").json()["engine"]["active"] == 2, timeout=30)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)

        buffer = first + b"".join(chunks)
        ended = time.monotonic() - signalled
        waiting.join(REQUEST_TIMEOUT)
        last = json.loads(buffer.rstrip(b"\n").rsplit(b"\n\n", 1)[-1].decode()[len("data: "):])
        assert last["error"]["code"] == "shutting_down", last
        assert 2 < ended < 10, ended  # not before the cutoff, a little short of the 3 s the worker has
        r = whole["r"]
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down" and r.headers["Retry-After"] == "1"
        assert server.process.wait(15) == 0
        log = server.log()
    assert "Traceback" not in log


# ---------------------------------------------------------------- reload


def test_a_draining_worker_whose_loop_runs_on_stops_listening_for_good():
    """A reload's drain closes the worker's listeners from its main loop, which may go round again
    before the exit handler ends it: turning accepting back on then crashed the worker (exit 255,
    "'NoneType' object has no attribute 'setblocking'") instead of letting it drain."""
    import selectors
    import socket

    from gunicorn.workers.gthread import ThreadWorker

    from service.lifecycle import _stop_listening

    listener = socket.create_server(("127.0.0.1", 0))
    worker = ThreadWorker.__new__(ThreadWorker)  # the parts of a gthread worker its accept loop uses
    worker.sockets, worker.poller, worker._accepting = [listener], selectors.DefaultSelector(), False
    worker.nr_conns, worker.worker_connections = 0, 10
    worker.set_accept_enabled(True)
    _stop_listening(worker)
    assert listener.fileno() == -1  # closed: new connections are refused at once
    worker.set_accept_enabled(True)  # what the main loop does while the worker is alive and below its limit
    worker.set_accept_enabled(False)  # and as it ends
    assert worker.poller.get_map() == {}
    worker.poller.close()


def broken_copy(artifact: Path, where: Path) -> Path:
    """A copy whose files are all present and whose archives are damaged inside: only a real load
    finds out (the network files are a zip of nonsense and a truncated ONNX file)."""
    import shutil

    bad = where / "broken"
    shutil.copytree(artifact, bad)
    with zipfile.ZipFile(bad / "model.keras", "w") as z:
        z.writestr("config.json", "{}")
    onnx = bad / "model.onnx"
    if onnx.exists():
        onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])
    return bad


class Load:
    """Clients sending short greedy requests one after another, each on a new connection, until stopped."""

    def __init__(self, url: str, clients: int = 3):
        self.url = url
        self.results: list[tuple[float, object]] = []  # (sent, text or error)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client) for _ in range(clients)]

    def _client(self):
        for _ in range(100_000):
            if self._stop.is_set():
                return
            sent = time.monotonic()
            try:
                r = requests.post(self.url + "/v1/generate", json={"prompt": "\n", "max_chars": 30, "temperature": 0},
                                  timeout=REQUEST_TIMEOUT)
                outcome = r.json()["choices"][0]["text"] if r.status_code == 200 else f"HTTP {r.status_code}: {r.text[:200]}"
            except requests.RequestException as e:
                outcome = f"{type(e).__name__}: {e}"
            self.results.append((sent, outcome))

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(REQUEST_TIMEOUT + 5)

    def texts_since(self, t: float) -> list:
        return [outcome for sent, outcome in list(self.results) if sent >= t]


def test_sighup_swaps_the_model_without_a_failed_request_and_a_broken_one_changes_nothing(
        tiny_artifact, other_artifact, tmp_path):
    old_text, new_text = PERIODIC[:30], OTHER[:30]
    current = tmp_path / "current"
    flip(current, tiny_artifact)
    # Every load (the check's and each worker's) takes LOAD_DELAY longer, so the successor of the
    # first worker loads for that long at least while the first one has been told to stop.
    env = {"CHARGEN_MAX_CHARS": LONG, "CHARGEN_LOAD_DELAY": LOAD_DELAY}
    with running_server(current, env=env) as server:
        (first_worker,) = server.worker_pids()
        with Load(server.url) as load:
            assert wait_for(lambda: len(load.results) >= 10, timeout=60)
            long_stream = server.post("/v1/generate", json={"prompt": "the", "max_chars": LONG, "temperature": 0,
                                                            "stream": True}, stream=True)
            assert long_stream.status_code == 200
            kept = requests.Session()  # a connection to the first worker, open across the reload
            assert kept.get(server.url + "/health", timeout=REQUEST_TIMEOUT).json()["pid"] == first_worker

            flip(current, other_artifact)
            hup = time.monotonic()
            server.process.send_signal(signal.SIGHUP)
            # The master checks the new model in a subprocess, logs what the new workers serve, forks
            # the successor and sends SIGTERM to the first worker, which keeps accepting until its
            # successor has loaded, then drains: /health is 503 on the connection kept open to it.
            # A worker with nothing left to finish (the long stream may be in the sockets' buffers
            # already) exits at once and closes that connection: a request sent just then meets the
            # keep-alive race (a reset), the next one another worker. Either way it has stopped; the
            # drain's own 503 on a kept connection is held by
            # test_sigterm_drains_a_long_stream_refuses_new_connections_and_exits_0.
            seen = {}

            def first_worker_stopped() -> bool:
                if "forked" not in seen and "chargen: reload: new workers serve" in server.log() \
                        and set(server.worker_pids()) - {first_worker}:
                    seen["forked"] = time.monotonic()
                try:
                    health = kept.get(server.url + "/health", timeout=REQUEST_TIMEOUT)
                except requests.ConnectionError:
                    return True
                return health.status_code == 503 or health.json()["pid"] != first_worker

            assert wait_for(first_worker_stopped, timeout=120, interval=0.02), server.log()[-3000:]
            drained = time.monotonic()
            assert "forked" in seen, "the first worker drained as the reload began, without waiting for its successor"
            assert wait_for(lambda: len(load.texts_since(drained)) >= 10, timeout=60)  # answers for `later` below
            assert server.get("/info").json()["model"]["name"] == "current"  # the name of CHARGEN_ARTIFACT, not the copy's
            swapped_worker = set(server.worker_pids()) - {first_worker}

            flip(current, broken_copy(other_artifact, tmp_path))
            bad_hup = time.monotonic()
            server.process.send_signal(signal.SIGHUP)
            assert wait_for(lambda: "cannot be loaded, so the new workers load the previous one" in server.log(), timeout=120)
            assert wait_for(lambda: server.worker_pids() and set(server.worker_pids()).isdisjoint(swapped_worker), timeout=60)
            replaced = time.monotonic()
            assert wait_for(lambda: len(load.texts_since(replaced)) >= 10, timeout=60)  # answers from the new workers
            text, done = stream_text(long_stream)  # began before the first reload, on the first model
        assert server.get("/health").status_code == 200
        log = server.log()

    failures = [outcome for _, outcome in load.results if outcome not in (old_text, new_text)]
    assert not failures, failures[:5]
    before = [outcome for sent, outcome in load.results if sent < hup]
    assert set(before) == {old_text}
    later = [outcome for sent, outcome in load.results if sent > drained]
    assert later and set(later) == {new_text}, "answers after the reload must come from the new model"
    assert set(load.texts_since(bad_hup)) == {new_text}, "a broken deploy changes nothing"
    assert "Exception in worker process" not in log and "exited with code" not in log, log[-3000:]
    assert done["choices"][0]["finish_reason"] == "length" and len(text) == LONG

    # The first worker kept accepting while its successor loaded: requests sent after the fork (and
    # the SIGTERM that comes with it) were answered by the old model, not held until the new one.
    handed_over = [outcome for sent, outcome in load.results if seen["forked"] < sent < drained]
    assert handed_over.count(old_text) >= 3, f"{handed_over.count(old_text)} of {len(handed_over)} from the old model"
    assert f"{current}: " in log.split("cannot be loaded, so the new workers load the previous one again:", 1)[1].splitlines()[0]
    print(f"{len(load.results)} requests over two reloads, none failed; {handed_over.count(old_text)} answered by the "
          "first worker while its successor loaded")


def test_a_broken_default_of_a_models_directory_stays_the_default(tiny_artifact, other_artifact, tmp_path):
    """With no CHARGEN_DEFAULT_MODEL, a directory's first model is the default; a deploy that breaks
    its link keeps its previous copy, and its role: requests that name no model still reach it."""
    from service.config import Settings
    from service.lifecycle import Snapshots

    root = tmp_path / "models"
    root.mkdir()
    (root / "a").symlink_to(tiny_artifact)
    (root / "b").symlink_to(other_artifact)
    snapshots = Snapshots(Settings.from_env({"CHARGEN_MODELS": str(root)}))
    try:
        first, _ = snapshots.take(check=False)
        assert (first.names, first.default) == (["a", "b"], "a")
        (root / "next").symlink_to(tmp_path / "gone")
        (root / "next").replace(root / "a")
        current, failures = snapshots.take(check=True)
        assert (current.names, current.default) == (["a", "b"], "a")
        assert [(name, kept) for name, _, kept in failures] == [("a", True)]
    finally:
        snapshots.remove()


def test_sighup_serves_a_model_added_to_the_models_directory(tiny_artifact, other_artifact, tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    (root / "jugs").symlink_to(other_artifact)

    def answer(server, model):
        r = server.post("/v1/generate", json={"prompt": "\n", "max_chars": 30, "temperature": 0, "model": model})
        return r.json()["choices"][0]["text"] if r.status_code == 200 else r.json()["error"]["code"]

    def served(server):
        return [m["id"] for m in server.get("/v1/models").json()["data"]]

    # CHARGEN_ARTIFACT (`run`, the default) and the directory's `jugs`, each from a private copy
    with running_server(tiny_artifact, env={"CHARGEN_MODELS": root}) as server:
        assert served(server) == ["run", "jugs"]
        copy = Path(server.get("/info?model=jugs").json()["model"]["path"])
        assert copy.name == "jugs" and copy.parent.parent.name.startswith("chargen-models-")
        assert answer(server, "fox") == "model_not_found"
        before = server.worker_pids()

        (root / "fox").symlink_to(tiny_artifact)  # a deploy adds a model ...
        (root / "bad").symlink_to(broken_copy(other_artifact, tmp_path))  # ... and a broken one
        server.process.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "fox" in served(server), timeout=120), server.log()[-3000:]
        assert wait_for(lambda: server.worker_pids() and set(server.worker_pids()).isdisjoint(before), timeout=60)
        assert served(server) == ["run", "fox", "jugs"]
        assert (answer(server, "fox"), answer(server, "jugs"), answer(server, "run")) == (PERIODIC[:30], OTHER[:30], PERIODIC[:30])
        assert answer(server, "bad") == "model_not_found"
        new_copy = Path(server.get("/info?model=fox").json()["model"]["path"])
        assert new_copy.parent.parent == copy.parent.parent and new_copy.parent != copy.parent  # the reload's snapshot

        # a deploy flips jugs' link to nowhere: the model fails to load (logged), and keeps its previous copy
        swapped = set(server.worker_pids())
        (root / "next").symlink_to(tmp_path / "gone")
        (root / "next").replace(root / "jugs")
        server.process.send_signal(signal.SIGHUP)
        assert wait_for(lambda: server.worker_pids() and set(server.worker_pids()).isdisjoint(swapped), timeout=120), \
            server.log()[-3000:]
        assert sorted(served(server)) == ["fox", "jugs", "run"] and answer(server, "jugs") == OTHER[:30]
        assert server.get("/health").status_code == 200
        log = server.log()
    assert "the new model 'bad' cannot be loaded and is not served: " in log
    assert (f"the model 'jugs' cannot be loaded, so the new workers load the previous one again: {root / 'jugs'}: a link "
            f"to {tmp_path / 'gone'}, which does not exist") in log
    assert f"{root / 'bad'}: " in log.split("the new model 'bad' cannot be loaded and is not served: ", 1)[1].splitlines()[0]
