"""The real server: gunicorn started by `chargen serve` on a free loopback port, tiny model.

Streams read over real sockets, the official openai client, concurrent clients, a client that
drops its stream, a full queue, a server still loading, bad artifacts, and a worker killed under load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest
import requests

from polling import wait_for
from server import REQUEST_TIMEOUT, ROOT, chargen_command, continuation, running_server, server_env, sse_payloads

pytestmark = pytest.mark.slow  # real gunicorn

LONG = 1_000_000  # max_chars of a request meant to run until it is dropped or cancelled


# ---------------------------------------------------------------- a normal server, two workers


@pytest.fixture(scope="class")
def server(tiny_artifact):
    # float32: seeded texts here do not depend on the streams stepped beside them, which an int8 graph's
    # batch-dependent quantization does not promise (README.md, "Precision"; tests/test_int8.py)
    env = {"CHARGEN_MAX_CHARS": LONG, "CHARGEN_MAX_BATCH": 32, "CHARGEN_PRECISION": "float32", "CHARGEN_CLIENT_TIMEOUT": 2}
    with running_server(tiny_artifact, workers=2, env=env) as s:
        yield s


class TestServer:
    def test_json(self, server):
        r = server.post("/v1/generate", json={"prompt": "the quick", "max_chars": 100, "temperature": 0})
        assert r.status_code == 200
        assert r.headers["Content-Type"] == "application/json"
        body = r.json()
        assert body["choices"][0]["text"] == continuation("the quick", 100)
        assert body["usage"]["completion_chars"] == 100

    def test_plain_text_curl_style(self, server, tmp_path):
        # what `curl -d 'the quick' URL` sends: the prompt with a form content type
        r = server.post("/v1/generate?temperature=0&max_chars=40", data=b"the quick",
                        headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        assert r.text == continuation("the quick", 40) + "\n"
        curl = shutil.which("curl")
        if curl:  # the real thing too, with --data-binary @file keeping the newline
            prompt = tmp_path / "prompt.txt"
            prompt.write_text("over the lazy dog.\n")
            out = subprocess.run([curl, "-sS", "--max-time", "30", "--data-binary", f"@{prompt}",
                                  f"{server.url}/v1/generate?temperature=0&max_chars=20"],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            assert out.stdout == continuation("over the lazy dog.\n", 20) + "\n"

    def test_stream_arrives_incrementally_and_a_dropped_stream_frees_its_slot(self, server):
        chars_before = server.metric("chargen_chars_generated_total")
        r = server.post("/v1/generate", json={"prompt": "the quick", "max_chars": LONG, "temperature": 0, "stream": True},
                        stream=True)
        assert r.status_code == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        received = ""
        payloads = sse_payloads(r)
        for _ in range(5):  # read a few events while the generation goes on
            event = json.loads(next(payloads))
            assert event["index"] == 0 and event["text"]
            received += event["text"]
        assert received == continuation("the quick", len(received))
        assert server.metric("chargen_active_streams") == 1  # still generating: far from a million characters
        r.close()  # the client goes away mid-stream
        assert wait_for(lambda: server.metric("chargen_active_streams") == 0), "the dropped stream kept its slot"
        generated = server.metric("chargen_chars_generated_total")
        assert server.post("/v1/generate", json={"prompt": "the", "max_chars": 10}).status_code == 200
        assert server.metric("chargen_chars_generated_total") == generated + 10  # nothing more is generated for nobody
        assert generated - chars_before < LONG

    def test_plain_text_stream_like_curl_n(self, server):
        r = server.post("/v1/generate?temperature=0&max_chars=1000000&stream=1", data=b"the quick",
                        headers={"Content-Type": "text/plain"}, stream=True)
        assert r.headers["Content-Type"].startswith("text/plain")
        received = b""
        for chunk in r.iter_content(chunk_size=None):
            received += chunk
            if len(received) > 500:
                break
        r.close()
        text = received.decode()
        assert text == continuation("the quick", len(text))
        assert wait_for(lambda: server.metric("chargen_active_streams") == 0)

    @pytest.mark.parametrize("path, ask", [("/v1/generate", {"prompt": "the", "max_chars": LONG}),
                                           ("/v1/completions", {"prompt": "the", "max_tokens": LONG})])
    def test_a_client_that_hangs_up_on_an_answer_that_is_not_streamed_is_499(self, server, path, ask):
        labels = {"route": path, "status": "499"}
        before = server.metric("chargen_requests_total", labels)
        body = json.dumps(ask).encode()
        head = f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=REQUEST_TIMEOUT) as sock:
            sock.sendall(head.encode() + body)
            assert wait_for(lambda: server.metric("chargen_active_streams") == 1)
        # closed: the loop sees the hang-up, cancels the job, and the request is logged as 499
        assert wait_for(lambda: server.metric("chargen_active_streams") == 0), "the abandoned request kept its slot"
        assert wait_for(lambda: server.metric("chargen_requests_total", labels) == before + 1)

    def test_openai_client(self, server):
        openai = pytest.importorskip("openai")
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed", timeout=REQUEST_TIMEOUT, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["run"]
        completion = client.completions.create(model="run", prompt="the quick", max_tokens=60, temperature=0)
        assert completion.choices[0].text == continuation("the quick", 60)
        assert completion.choices[0].finish_reason == "length"
        assert completion.usage.completion_tokens == 60 and completion.usage.prompt_tokens == 9
        stream = client.completions.create(model="run", prompt="the quick", max_tokens=60, temperature=0, stream=True)
        chunks = list(stream)
        assert len(chunks) >= 2
        assert "".join(c.choices[0].text for c in chunks if c.choices) == continuation("the quick", 60)
        assert chunks[-1].choices[0].finish_reason == "length"
        seeded = [client.completions.create(model="run", prompt="the", max_tokens=50, temperature=1.5, seed=3).choices[0].text
                  for _ in range(2)]
        assert seeded[0] == seeded[1]

    def test_16_concurrent_seeded_requests_give_the_texts_they_give_alone(self, server):
        """Sixteen seeded streams open at once give the texts they give alone. None ends on its own
        (LONG characters), so all sixteen hold batch slots together and one of the two workers steps
        eight or more of them at a time, which the batch-size histogram shows."""
        ask = {"prompt": "the", "temperature": 1.0}
        seeds = list(range(100, 116))
        alone = [server.post("/v1/generate", json={**ask, "max_chars": 2000, "seed": seed}).json()["choices"][0]["text"]
                 for seed in seeds]
        assert len(set(alone)) > 1

        def steps_of_eight_or_more() -> float:
            return server.metric("chargen_batch_size_count") - server.metric("chargen_batch_size_bucket", {"le": "4.0"})

        def first_chars(response: requests.Response, n: int) -> str:
            text = ""
            for payload in sse_payloads(response):
                text += json.loads(payload).get("text", "")
                if len(text) >= n:
                    break
            return text[:n]

        assert wait_for(lambda: server.metric("chargen_active_streams") == 0)
        assert server.metric("chargen_batch_size_bucket", {"le": "4.0"}) > 0  # the steps of the requests alone
        before = steps_of_eight_or_more()
        streams = [server.post("/v1/generate", json={**ask, "max_chars": LONG, "seed": seed, "stream": True}, stream=True)
                   for seed in seeds]
        try:
            assert [r.status_code for r in streams] == [200] * len(seeds)
            assert wait_for(lambda: server.metric("chargen_active_streams") == len(seeds)), "not all open at once"
            assert wait_for(lambda: steps_of_eight_or_more() > before)
            together = [first_chars(r, 2000) for r in streams]
        finally:
            for r in streams:
                r.close()
        assert together == alone
        assert wait_for(lambda: server.metric("chargen_active_streams") == 0), "the closed streams kept their slots"

    def test_errors_before_flask_are_json_too(self, server):
        too_long = server.post("/v1/generate?prompt=" + "x" * 5000)  # gunicorn refuses request lines over 4094 bytes
        assert too_long.status_code == 414
        assert too_long.json()["error"]["code"] == "uri_too_long"
        with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=REQUEST_TIMEOUT) as sock:
            sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400")
        assert json.loads(body)["error"]["type"] == "invalid_request_error"
        # a chunked body (no Content-Length) over CHARGEN_MAX_BODY_BYTES (1 MiB) is refused, not cut
        big = server.post("/v1/generate", data=(b"x" * 65536 for _ in range(24)), headers={"Content-Type": "text/plain"})
        assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
        # a malformed chunked body, which gunicorn finds as the app reads it: a 400 that says so
        head = b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        for body, says in ((b"zz\r\nabc\r\n0\r\n\r\n", "Invalid chunk size"), (b"3\r\nabcXX0\r\n\r\n", "terminator"),
                           (b"2\r\n{}\r\n0\r\nBad Trailer\r\n\r\n", "Bad Trailer")):
            with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=REQUEST_TIMEOUT) as sock:
                sock.sendall(head + body)
                answer = b""
                while chunk := sock.recv(4096):
                    answer += chunk
            status, _, rest = answer.partition(b"\r\n\r\n")
            assert status.startswith(b"HTTP/1.1 400"), answer[:200]
            error = json.loads(rest)["error"]
            assert error["code"] == "malformed_body" and says in error["message"], error

    def test_a_client_that_stops_sending_its_request_is_let_go(self, server):
        # each would hold a request thread for good; after CHARGEN_CLIENT_TIMEOUT (2 s here) the
        # body's is a 400 that says so and the headers' a closed connection, and the others are served
        head = b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        stalled = {"body": head + b"Content-Length: 100\r\n\r\n{\"prompt\":",
                   "chunk": head + b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"pro",
                   "headers": head + b"Content-"}
        answers, began = {}, time.monotonic()
        sockets = {k: socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=20) for k in stalled}
        try:
            for k, sock in sockets.items():
                sock.sendall(stalled[k])
            assert server.post("/v1/generate", json={"prompt": "the", "max_chars": 5}).status_code == 200
            for k, sock in sockets.items():
                answers[k] = b""
                while chunk := sock.recv(4096):  # the whole answer: its head and the Content-Length it gives
                    answers[k] += chunk
                    head_of, _, body = answers[k].partition(b"\r\n\r\n")
                    length = re.search(rb"Content-Length: (\d+)", head_of)
                    if length and len(body) >= int(length[1]):
                        break
        finally:
            for sock in sockets.values():
                sock.close()
        assert time.monotonic() - began < 15
        for k in ("body", "chunk"):
            status, _, body = answers[k].partition(b"\r\n\r\n")
            assert status.startswith(b"HTTP/1.1 400") and b"incomplete_body" in body, answers[k][:300]
        assert answers["headers"] == b""
        assert "a client stopped sending its request for CHARGEN_CLIENT_TIMEOUT (2 s)" in server.log()
        assert "BlockingIOError" not in server.log()

    def test_metrics_add_up_over_workers(self, server):
        text = server.get("/metrics").text
        assert "chargen_workers_ready 2.0" in text
        assert 'chargen_requests_total{method="POST",route="/v1/generate",status="200"}' in text
        assert server.metric("chargen_time_to_first_char_seconds_count") > 0

    def test_worker_killed_under_load_is_replaced(self, server):
        workers = server.worker_pids()
        assert len(workers) == 2
        results = []  # (started, status or error name)
        stop = threading.Event()

        def client():
            for _ in range(10_000):
                if stop.is_set():
                    return
                started = time.monotonic()
                try:
                    r = requests.post(server.url + "/v1/generate", json={"prompt": "the", "max_chars": 400}, timeout=REQUEST_TIMEOUT)
                    results.append((started, r.status_code))
                except requests.RequestException as e:
                    results.append((started, type(e).__name__))

        clients = [threading.Thread(target=client) for _ in range(4)]
        for t in clients:
            t.start()
        try:
            assert wait_for(lambda: len(results) >= 8, timeout=60)  # under load
            victim = workers[0]
            os.kill(victim, signal.SIGKILL)
            # gone: the master has reaped it (and forked its replacement), so it accepts nothing more
            assert wait_for(lambda: len(server.worker_pids()) == 2 and victim not in server.worker_pids(), timeout=30)
            gone = time.monotonic()
            replacement = (set(server.worker_pids()) - set(workers)).pop()
            assert wait_for(lambda: server.metric("chargen_workers_ready") == 2, timeout=180), server.log()[-3000:]
            assert wait_for(lambda: sum(started > gone for started, _ in list(results)) > 10, timeout=60)
        finally:
            stop.set()
            for t in clients:
                t.join(REQUEST_TIMEOUT + 5)
        assert "Perhaps out of memory" in server.log() or "SIGKILL" in server.log()
        after = [status for started, status in results if started > gone]
        assert len(after) > 10
        assert set(after) == {200}, f"requests after the kill: {sorted(set(map(str, after)))}"
        assert replacement in server.worker_pids()
        assert wait_for(lambda: server.metric("chargen_active_streams") == 0)


# ---------------------------------------------------------------- a small, slow-to-load server


@pytest.fixture(scope="class")
def busy_server(tiny_artifact):
    """Two batch slots, one queue place, and a load that takes 3 s longer (CHARGEN_LOAD_DELAY)."""
    env = {"CHARGEN_MAX_BATCH": 2, "CHARGEN_MAX_N": 2, "CHARGEN_MAX_QUEUE": 1, "CHARGEN_MAX_CHARS": LONG,
           "CHARGEN_LOAD_DELAY": 3}
    with running_server(tiny_artifact, env=env, wait_healthy=False) as s:
        yield s


class TestBusyServer:
    def test_503_before_the_model_is_loaded(self, busy_server):
        r = busy_server.get("/health")
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "model_loading"
        assert int(r.headers["Retry-After"]) > 0
        r = busy_server.post("/v1/generate", json={"prompt": "the"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        assert wait_for(lambda: busy_server.get("/health").status_code == 200, timeout=180)
        assert busy_server.post("/v1/generate", json={"prompt": "the", "max_chars": 5}).status_code == 200

    def test_429_once_the_queue_is_full(self, busy_server):
        assert wait_for(lambda: busy_server.get("/health").status_code == 200, timeout=180)
        ask = {"prompt": "the", "max_chars": LONG, "stream": True}
        running = [busy_server.post("/v1/generate", json=ask, stream=True) for _ in range(2)]  # both slots
        readers = [sse_payloads(r) for r in running]  # kept: closing a reader closes its connection
        for r, reader in zip(running, readers):
            assert r.status_code == 200
            next(reader)
        queued = {}

        def wait_in_queue():  # its headers come only once it has a slot
            queued["response"] = busy_server.post("/v1/generate", json={"prompt": "the", "max_chars": 5})

        waiter = threading.Thread(target=wait_in_queue)
        waiter.start()
        try:
            assert wait_for(lambda: busy_server.metric("chargen_queue_depth") == 1)
            refused = busy_server.post("/v1/generate", json={"prompt": "the", "max_chars": 5})
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "queue_full"
            assert int(refused.headers["Retry-After"]) >= 1
        finally:
            for r in running:
                r.close()
            waiter.join(REQUEST_TIMEOUT)
        assert queued["response"].status_code == 200  # served once the dropped streams freed their slots
        assert wait_for(lambda: busy_server.metric("chargen_active_streams") == 0)
        assert busy_server.metric("chargen_queue_depth") == 0
        assert busy_server.metric("chargen_requests_total", {"route": "/v1/generate", "status": "429"}) >= 1


# ---------------------------------------------------------------- start-up failures


def serve_and_wait(artifact, env=None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(chargen_command() + ["serve", "--bind", "127.0.0.1:0"], cwd=ROOT, env=server_env(artifact, env),
                          capture_output=True, text=True, timeout=timeout)


def corrupt_copy(artifact, tmp_path):
    bad = tmp_path / "corrupt"
    shutil.copytree(artifact, bad)
    data = (bad / "model.onnx").read_bytes()
    (bad / "model.onnx").write_bytes(data[: len(data) // 2])  # truncated: what serving reads
    return bad


@pytest.mark.parametrize("kind, message", [("missing", "no such artifact directory"), ("corrupt", "not an ONNX model")])
def test_a_bad_artifact_stops_the_server_at_once(tiny_artifact, tmp_path, kind, message):
    artifact = tmp_path / "nowhere" if kind == "missing" else corrupt_copy(tiny_artifact, tmp_path)
    done = serve_and_wait(artifact)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert message in output and str(artifact) in output, output[-3000:]
    assert "Booting worker" not in output  # refused before gunicorn starts a worker


def test_a_bad_setting_stops_the_server_before_it_starts(tiny_artifact):
    done = serve_and_wait(tiny_artifact, {"CHARGEN_MAX_QUEUE": "lots"}, timeout=60)
    assert done.returncode != 0
    assert "CHARGEN_MAX_QUEUE" in done.stdout + done.stderr
    assert "Booting worker" not in done.stdout + done.stderr
