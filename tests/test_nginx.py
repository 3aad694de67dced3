"""deploy/nginx's configuration, for real: Debian's nginx on loopback in front of two `chargen serve`
replicas (tests/balancer.py renders it as the nginx image does, with loopback servers).

Requests spread over both replicas; a stream arrives incrementally and starts at once (how soon:
bench/load.py --nginx); the body-size limit is chargen's; a draining replica (SIGTERM) loses no request and a killed one
(SIGKILL) fails no new request. Skipped, saying why, when nginx is not installed (scripts/test
installs Debian's package as root).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests

from balancer import limits, nginx_binary, render, running_nginx
from polling import wait_for
from server import REQUEST_TIMEOUT, ROOT, Server, chargen_command, free_port, server_env, stop

pytestmark = [pytest.mark.slow,  # nginx and real gunicorn
              pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed: apt-get install nginx "
                                 "(scripts/test installs it when run as root)")]

LONG = 60_000  # characters of a stream that lasts a second or more here


# ---------------------------------------------------------------- the rendered configuration (no servers)


def test_the_limits_are_chargens():
    from service.config import Settings

    settings = Settings()
    server, _ = render(8080, ["127.0.0.1:1"])
    body = re.search(r"^\s*client_max_body_size (\d+);", server, re.M)
    assert body and int(body.group(1)) == settings.max_body_bytes
    read = re.search(r"^\s*proxy_read_timeout (\d+)s;", server, re.M)
    assert read and int(read.group(1)) >= settings.request_timeout + 5  # chargen's own 504 comes first
    # the entrypoint script follows CHARGEN_REQUEST_TIMEOUT, fractions rounded up
    assert limits({"CHARGEN_REQUEST_TIMEOUT": "42.5"})["CHARGEN_PROXY_READ_TIMEOUT"] == "53s"
    assert limits({"CHARGEN_MAX_BODY_BYTES": "4096"})["CHARGEN_MAX_BODY_BYTES"] == "4096"


def test_retries_only_what_was_not_sent_and_keeps_no_upstream_connections():
    server, upstream = render(8080, ["127.0.0.1:1", "127.0.0.1:2"])
    assert re.search(r"^\s*proxy_next_upstream error timeout;$", server, re.M)
    assert "non_idempotent" not in re.sub(r"#.*", "", server)
    assert re.search(r"^\s*proxy_buffering off;$", server, re.M)
    assert not re.search(r"^\s*keepalive\s", upstream, re.M)
    assert upstream.count("server 127.0.0.1:") == 2


# ---------------------------------------------------------------- two replicas behind nginx


class Replicas:
    """`chargen serve` processes on fixed loopback ports, so one can be stopped and started again."""

    def __init__(self, artifact: Path, count: int, env: dict):
        self.artifact, self.env = artifact, env
        self.ports = [free_port() for _ in range(count)]
        self.servers: list[Server | None] = [None] * count

    def start(self, i: int) -> Server:
        port = self.ports[i]
        log_path = Path(tempfile.mkstemp(prefix="chargen-replica-", suffix=".log")[1])
        with open(log_path, "wb") as log:
            process = subprocess.Popen(chargen_command() + ["serve", "--bind", f"127.0.0.1:{port}"], cwd=ROOT,
                                       env=server_env(self.artifact, self.env), stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        server = Server(f"http://127.0.0.1:{port}", process, log_path)
        server.wait_healthy()
        self.servers[i] = server
        return server

    def ensure_up(self) -> None:
        for i, server in enumerate(self.servers):
            if server is None or server.process.poll() is not None:
                self.start(i)

    def pids(self, i: int) -> set[int]:
        return set(self.servers[i].worker_pids())

    def stop_all(self) -> None:
        for server in self.servers:
            if server is not None:
                stop(server)
                server.log_path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def cluster(tiny_artifact, tmp_path_factory):
    # TMPDIR: a replica killed with SIGKILL leaves its snapshot and metrics directories behind
    replicas = Replicas(tiny_artifact, 2, {"CHARGEN_MAX_CHARS": LONG, "TMPDIR": tmp_path_factory.mktemp("replicas")})
    try:
        replicas.ensure_up()
        with running_nginx([f"127.0.0.1:{port}" for port in replicas.ports]) as nginx:
            yield replicas, nginx
    finally:
        replicas.stop_all()


def health_pids(url: str, count: int) -> list[int]:
    return [requests.get(url + "/health", timeout=REQUEST_TIMEOUT).json()["pid"] for _ in range(count)]


def refusing(url: str, timeout: float) -> bool:
    """The address refuses connections (nothing listens there any more)."""
    host, port = url.removeprefix("http://").split(":")

    def refused() -> bool:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
        except ConnectionRefusedError:
            return True
        except OSError:
            pass
        return False

    return wait_for(refused, timeout, interval=0.01)


def both_serving(replicas: Replicas, nginx) -> None:
    """Wait until nginx sends requests to both replicas again: one that refused a connection (a
    replica that was stopped and started) is skipped for fail_timeout (5 s), even when it is back."""
    def both() -> bool:
        seen = set(health_pids(nginx.url, 4))
        return all(seen & replicas.pids(i) for i in range(2))

    assert wait_for(both, timeout=20, interval=0.5), "nginx does not send requests to both replicas"


def test_requests_spread_over_both_replicas(cluster):
    replicas, nginx = cluster
    replicas.ensure_up()
    seen = health_pids(nginx.url, 20)
    for i in range(2):
        assert sum(pid in replicas.pids(i) for pid in seen) >= 5, (seen, replicas.pids(0), replicas.pids(1))
    answers = [requests.post(nginx.url + "/v1/generate", json={"prompt": "the", "max_chars": 20}, timeout=REQUEST_TIMEOUT)
               for _ in range(6)]
    assert [r.status_code for r in answers] == [200] * 6
    assert all(r.headers["X-Request-Id"].startswith("req-") for r in answers)  # chargen's answer, passed through


def first_byte_and_chunks(url: str, body: dict) -> tuple[float, list[tuple[float, bytes]]]:
    """Seconds from sending the request to the first byte of the body, and every chunk as it came
    (seconds since sending, bytes), over a plain socket: nothing buffers but what is measured."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    with socket.create_connection((host, int(port)), timeout=REQUEST_TIMEOUT) as sock:
        sent = time.perf_counter()
        sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
        received, head, first = [], b"", None
        while True:
            part = sock.recv(65536)
            if not part:
                break
            now = time.perf_counter() - sent
            if first is None:
                head += part
                if b"\r\n\r\n" not in head:
                    continue
                _, part = head.split(b"\r\n\r\n", 1)
                if not part:
                    continue
            if first is None:
                first = now
            received.append((now, part))
    return first, received


def test_a_stream_through_nginx_arrives_incrementally_and_starts_at_once(cluster):
    replicas, nginx = cluster
    replicas.ensure_up()
    ask = {"prompt": "the", "max_chars": LONG, "temperature": 0, "stream": True}
    for _ in range(2):  # one each for the replicas' first-call costs
        first_byte_and_chunks(nginx.url, {**ask, "max_chars": 50})
    runs = [first_byte_and_chunks(nginx.url, ask) for _ in range(3)]  # the best of three: the machine is shared
    first, chunks = runs[-1]
    body = b"".join(part for _, part in chunks)
    assert b'"finish_reason":"length"' in body
    assert len(chunks) >= 5, f"{len(chunks)} chunks"
    # Times as fractions of the stream's own length, so that they hold however fast this machine is:
    # nginx buffering the answer would deliver it at the end, or start it only once a buffer is full.
    ends = [t for t, _ in chunks]
    assert sum(1 for t in ends if t < 0.9 * ends[-1]) >= 3, "the chunks came all at once, at the end"
    starts = [first / chunks[-1][0] for first, chunks in runs]
    assert min(starts) < 0.1, f"the first body byte came {min(starts):.0%} into the stream"
    print(f"first body byte through nginx after {min(f for f, _ in runs) * 1e3:.1f} ms (best of 3); {len(chunks)} chunks "
          f"over {(ends[-1] - ends[0]) * 1e3:.0f} ms")


def test_the_body_limit_is_chargens_and_answered_in_its_shape(cluster):
    from service.config import Settings

    replicas, nginx = cluster
    replicas.ensure_up()
    limit = Settings().max_body_bytes
    over = requests.post(nginx.url + "/v1/generate", data=b"x" * (limit + 1), timeout=REQUEST_TIMEOUT)
    direct = replicas.servers[0].post("/v1/generate", data=b"x" * (limit + 1))
    assert over.status_code == direct.status_code == 413
    assert over.json()["error"]["code"] == direct.json()["error"]["code"] == "body_too_large"
    at = requests.post(nginx.url + "/v1/generate", data=b"x" * limit, timeout=REQUEST_TIMEOUT)
    assert at.status_code != 413 and "X-Request-Id" in at.headers  # through nginx, chargen decided


class Traffic:
    """Clients sending requests through nginx one after another (short answers and streams), each
    on a new connection, until stopped; every outcome is kept."""

    def __init__(self, url: str, clients: int = 4):
        self.url = url
        self.outcomes: list[tuple[float, str]] = []  # (sent, "ok" or what went wrong)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(c,)) for c in range(clients)]

    def _client(self, c: int):
        for i in range(100_000):
            if self._stop.is_set():
                return
            stream = (c + i) % 2 == 0
            sent = time.monotonic()
            try:
                r = requests.post(self.url + "/v1/generate", json={"prompt": "the", "max_chars": 2000, "stream": stream},
                                  timeout=REQUEST_TIMEOUT)
                ok = r.status_code == 200 and (b'"finish_reason":"length"' in r.content if stream
                                               else r.json()["usage"]["completion_chars"] == 2000)
                outcome = "ok" if ok else f"HTTP {r.status_code}: {r.text[-200:]}"
            except requests.RequestException as e:
                outcome = f"{type(e).__name__}: {e}"
            self.outcomes.append((sent, outcome))

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(REQUEST_TIMEOUT + 5)

    def failures(self) -> list[str]:
        return [outcome for _, outcome in self.outcomes if outcome != "ok"]

    def answered_since(self, t: float, count: int, timeout: float = 60) -> bool:
        """Wait until `count` requests sent after `t` (time.monotonic()) have their outcome."""
        return wait_for(lambda: sum(1 for sent, _ in list(self.outcomes) if sent > t) >= count, timeout)


def open_stream(url: str) -> requests.Response:
    r = requests.post(url + "/v1/generate", json={"prompt": "the", "max_chars": LONG, "temperature": 0, "stream": True},
                      stream=True, timeout=REQUEST_TIMEOUT)
    assert r.status_code == 200
    return r


def test_a_draining_replica_loses_no_request(cluster):
    replicas, nginx = cluster
    replicas.ensure_up()
    both_serving(replicas, nginx)
    draining = replicas.servers[0]
    started = time.monotonic()
    with Traffic(nginx.url) as traffic:
        assert traffic.answered_since(started, 8)
        # two long streams at once: least_conn gives the draining replica one of them
        streams = [open_stream(nginx.url) for _ in range(2)]
        signalled = time.monotonic()
        draining.process.send_signal(signal.SIGTERM)
        bodies = [r.content for r in streams]
        assert draining.process.wait(40) == 0
        assert traffic.answered_since(time.monotonic(), 10)  # once the replica is gone too
    assert all(b'"finish_reason":"length"' in body for body in bodies), "a stream was cut"
    assert not traffic.failures(), traffic.failures()[:5]
    assert sum(1 for sent, _ in traffic.outcomes if sent > signalled) > 10
    assert "Shutting down: Master" in draining.log()


def test_after_one_replica_is_killed_every_new_request_succeeds_on_the_other(cluster):
    replicas, nginx = cluster
    replicas.ensure_up()
    both_serving(replicas, nginx)
    victim, survivor = replicas.servers[1], replicas.servers[0]
    os.killpg(victim.process.pid, signal.SIGKILL)  # master and worker, without a word
    victim.process.wait(10)
    # "New" requests are those sent once the replica is gone: while its worker is still exiting,
    # the kernel can complete a connection on its socket and reset it after nginx sent the POST.
    assert refusing(victim.url, timeout=10)
    # Until past the 5 s fail_timeout, when nginx tries the dead one again, and at least 20 requests
    # (however long those take here).
    outcomes = []
    retried = time.monotonic() + 8
    while len(outcomes) < 20 or time.monotonic() < retried:
        r = requests.post(nginx.url + "/v1/generate", json={"prompt": "the", "max_chars": 50}, timeout=REQUEST_TIMEOUT)
        outcomes.append(r.status_code)
    assert set(outcomes) == {200}, outcomes[:10]
    assert set(health_pids(nginx.url, 5)) <= set(survivor.worker_pids())
