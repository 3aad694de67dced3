"""Load on the HTTP service, beside the in-process engine at the same number of streams, in one run.

    .venv/bin/python bench/load.py [--artifact artifacts/default] [--seconds 10] [--clients 1,8,32,64]

The server (gunicorn with the project's config, as `chargen serve` runs it) starts on a free
127.0.0.1 port (default configuration: one worker). Then for each mode (plain JSON, streamed
server-sent events) and each number N of clients, right after each other:
1. the engine alone, in this process: N streams stepped together for a fixed time, each stream
   replaced by a new one (new prompt, new seed) when it finishes, as the service's streams are;
2. the service: N clients that each send one request after another for the same time over a
   kept-alive connection. The clients are asyncio coroutines in this process with a minimal
   HTTP/1.1 reader, so that the load generator takes little of the CPU it measures.

Printed per row: requests/s, characters/s (generated characters received), the engine's
characters/s at the same N and the ratio, p50/p99 latency, p50/p99 time to first character
(streamed: the first event that carries text; plain: the whole answer), errors and 429s.
Goals (issue 5): ratio >= 0.70 at 1 and 32 clients, time to first character at 1 client < 20 ms,
no errors other than 429. Every request asks for --max-chars characters at temperature 0.8.

    .venv/bin/python bench/load.py --nginx [--replicas 1,2] [--workers 1] [--clients 8,32]

measures the load balancer instead (issue 12): R servers on loopback, nginx in front of them with
deploy/nginx's configuration (tests/balancer.py renders it; Debian's nginx must be installed), and
per mode and N the same N clients straight to the replicas (client c to replica c % R), then
through nginx. Printed per row: characters/s both ways and their ratio (nginx's cost), first
character and latency p50, errors; the rows with more replicas give the aggregate throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

PROMPTS = ["ROMEO:\n", "JULIET:\nO ", "First Citizen:\nBefore we proceed", "KING RICHARD III:\nNow is the ", "\n"]
TEMPERATURE = 0.8
MAX_REQUESTS_PER_CLIENT = 100_000  # a bound besides the time


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# ---------------------------------------------------------------- the engine alone


def engine_rate(artifact, streams: int, seconds: float, max_chars: int) -> float:
    """Characters per second of the in-process engine stepping `streams` streams together."""
    from model.runtime.engine import Engine, GenerationRequest
    from model.runtime.sampling import SamplingSettings

    engine = Engine(artifact, max_batch=streams)
    sampling = SamplingSettings(temperature=TEMPERATURE)
    count = 0

    def new():
        nonlocal count
        count += 1
        return engine.start(GenerationRequest(PROMPTS[count % len(PROMPTS)], max_chars=max_chars, sampling=sampling, seed=count))

    active = [new() for _ in range(streams)]
    chars, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for d in engine.step(active):
            chars += len(d.text)
        for i, s in enumerate(active):
            if s.finish_reason is not None:
                active[i] = new()
    elapsed = time.perf_counter() - started
    for s in active:
        engine.cancel(s)
    return chars / elapsed


# ---------------------------------------------------------------- the service


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(artifact: str, workers: int, batch: int | None, log_path: Path,
                 port: int | None = None) -> tuple[subprocess.Popen, str]:
    """gunicorn with the project's config (what `chargen serve` runs) on 127.0.0.1 and a free port
    unless `port`, in the default configuration except the artifact, the workers and, when given, a
    batch that holds every client (CHARGEN_* variables set in this shell are passed on, e.g.
    CHARGEN_STREAM_INTERVAL). Returns once every worker has loaded the model."""
    port = port or free_port()
    env = {**os.environ, "CHARGEN_ARTIFACT": str(Path(artifact).resolve()), "CHARGEN_BIND": f"127.0.0.1:{port}",
           "CHARGEN_WORKERS": str(workers), "TF_CPP_MIN_LOG_LEVEL": "3"}
    if batch:
        env.setdefault("CHARGEN_MAX_BATCH", str(batch))
    log = open(log_path, "w")
    process = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "python:service.gunicorn_conf"],
                               cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    url = f"http://127.0.0.1:{port}"
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited during start-up:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
                if f"chargen_workers_ready {float(workers)}" in r.read().decode():
                    return process, url
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.25)
    process.send_signal(signal.SIGINT)
    raise SystemExit(f"the server did not become ready:\n{log_path.read_text()[-3000:]}")


def stop_server(process: subprocess.Popen) -> None:
    """SIGINT (gunicorn's quick shutdown), then SIGKILL of the whole group after 30 s."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


class Client:
    """One kept-alive HTTP/1.1 connection sending POST requests, one at a time."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def post(self, path: str, data: bytes, content_type: str = "application/json",
                   on_chunk=None) -> tuple[int, bool, bytes]:
        """(status, chunked, body). `on_chunk(part)` sees each part of a chunked body as it arrives;
        when it returns True the client hangs up there and the body so far is returned."""
        if self.writer is not None and self.reader.at_eof():  # the server closed it while idle
            self.close()
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: %s\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (path.encode(), content_type.encode(), len(data), data))
        line = await self.reader.readline()
        if not line:
            raise ConnectionResetError("the server closed the connection without answering")
        status = int(line.split()[1])
        length, chunked, close = None, False, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value:
                chunked = True
            elif name == "connection" and value == "close":
                close = True
        if chunked:
            parts = []
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readline()
                    break
                part = (await self.reader.readexactly(size + 2))[:-2]
                parts.append(part)
                if on_chunk is not None and on_chunk(part):
                    close = True
                    break
            payload = b"".join(parts)
        else:
            payload = await self.reader.readexactly(length or 0)
        if close:
            self.close()
        return status, chunked, payload

    async def request(self, body: dict) -> tuple[int, float | None, float, int]:
        """POST /v1/generate: (status, seconds to the first character or None, seconds to the end, characters)."""
        data = json.dumps(body).encode()
        started = time.perf_counter()
        first = None

        def seen(part: bytes) -> bool:
            nonlocal first
            if first is None and b'"text"' in part:
                first = time.perf_counter() - started
            return False

        status, chunked, payload = await self.post("/v1/generate", data, on_chunk=seen)
        ended = time.perf_counter() - started
        chars = 0
        if status == 200:
            if chunked:
                last = json.loads(payload.rstrip().rsplit(b"\n\n", 1)[-1][len(b"data: "):])
                if "error" in last:
                    return 500, first, ended, 0
                chars = last["usage"]["completion_chars"]
            else:
                chars = json.loads(payload)["usage"]["completion_chars"]
                first = ended
        return status, first, ended, chars

    def close(self):
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def load(url: str | list[str], clients: int, seconds: float, stream: bool, max_chars: int) -> dict:
    """N clients for `seconds`; with several URLs, client c talks to url[c % len(url)]."""
    addresses = [u.removeprefix("http://").split(":") for u in ([url] if isinstance(url, str) else url)]
    results = []  # (status, first, latency, chars)
    errors: list[str] = []
    end = time.perf_counter() + seconds

    async def run(c: int):
        host, port = addresses[c % len(addresses)]
        client = Client(host, int(port))
        try:
            for i in range(MAX_REQUESTS_PER_CLIENT):
                if time.perf_counter() >= end:
                    return
                body = {"prompt": PROMPTS[(c + i) % len(PROMPTS)], "max_chars": max_chars, "temperature": TEMPERATURE,
                        "seed": c * MAX_REQUESTS_PER_CLIENT + i, "stream": stream}
                try:
                    result = await asyncio.wait_for(client.request(body), timeout=120)
                except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as e:
                    errors.append(type(e).__name__)
                    client.close()
                    client = Client(host, int(port))
                    continue
                results.append(result)
                if result[0] == 429:
                    await asyncio.sleep(0.05)
        finally:
            client.close()

    started = time.perf_counter()
    await asyncio.gather(*(run(c) for c in range(clients)))
    elapsed = time.perf_counter() - started
    ok = [r for r in results if r[0] == 200]
    return {
        "clients": clients, "mode": "stream" if stream else "plain", "seconds": round(elapsed, 2),
        "requests_per_second": len(ok) / elapsed,
        "chars_per_second": sum(r[3] for r in ok) / elapsed,
        "latency_p50_ms": _ms(percentile([r[2] for r in ok], 0.5)), "latency_p99_ms": _ms(percentile([r[2] for r in ok], 0.99)),
        "first_char_p50_ms": _ms(percentile([r[1] for r in ok if r[1] is not None], 0.5)),
        "first_char_p99_ms": _ms(percentile([r[1] for r in ok if r[1] is not None], 0.99)),
        "requests": len(results), "errors": len(errors) + sum(1 for r in results if r[0] not in (200, 429)),
        "rejected_429": sum(1 for r in results if r[0] == 429),
        "error_kinds": sorted(set(errors) | {str(r[0]) for r in results if r[0] not in (200, 429)}),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 2)


# ---------------------------------------------------------------- the run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", default=str(ROOT / "artifacts" / "default"))
    parser.add_argument("--clients", default="1,8,32,64", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each measurement")
    parser.add_argument("--max-chars", type=int, default=200, help="characters per request")
    parser.add_argument("--modes", default="plain,stream", help="plain, stream or both")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn workers")
    parser.add_argument("--json", dest="json_out", help="also write the rows to this JSON file")
    parser.add_argument("--nginx", action="store_true", help="instead of the engine comparison: the same clients "
                        "straight to the replicas, then through deploy/nginx's configuration in front of them")
    parser.add_argument("--replicas", default="1,2", help="with --nginx: comma-separated numbers of servers behind nginx")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    if args.nginx:
        return through_nginx(args, counts, modes, [int(r) for r in args.replicas.split(",")])

    from model.runtime.artifact import load as load_artifact

    artifact = load_artifact(args.artifact)
    c = artifact.config
    print(f"model {artifact.path}: {c.cell} {c.layers}x{c.units}, vocabulary {len(artifact.vocab)}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {args.seconds:g} s per row, "
          f"{args.max_chars} characters per request, temperature {TEMPERATURE}", flush=True)

    log_path = Path(tempfile.mkstemp(prefix="chargen-bench-", suffix=".log")[1])
    process, url = start_server(args.artifact, args.workers, max(64, max(counts)), log_path)
    rows = []
    try:
        for mode in modes:
            for n in counts:
                # side by side in time: the engine alone (the idle server waits on a condition), then
                # the service, so that a change in the machine's load hits both alike
                engine = engine_rate(artifact, n, args.seconds, args.max_chars)
                row = asyncio.run(load(url, n, args.seconds, mode == "stream", args.max_chars))
                row["engine_chars_per_second"] = engine
                row["ratio"] = row["chars_per_second"] / engine
                rows.append(row)
                print(f"  {mode:6} {n:3} clients: {row['chars_per_second']:,.0f} chars/s, engine alone {engine:,.0f} "
                      f"({row['ratio']:.0%})", flush=True)
    finally:
        stop_server(process)
        log_path.unlink(missing_ok=True)

    print()
    print("| mode | clients | req/s | chars/s | engine chars/s | service/engine | latency p50 / p99 ms | "
          "first char p50 / p99 ms | errors | 429 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['clients']} | {r['requests_per_second']:,.1f} | {r['chars_per_second']:,.0f} | "
              f"{r['engine_chars_per_second']:,.0f} | {r['ratio']:.0%} | {r['latency_p50_ms']} / {r['latency_p99_ms']} | "
              f"{r['first_char_p50_ms']} / {r['first_char_p99_ms']} | {r['errors']} | {r['rejected_429']} |")
    print()
    for r in rows:
        if r["clients"] in (1, 32):
            verdict = "ok" if r["ratio"] >= 0.70 else "BELOW GOAL"
            print(f"goal ratio >= 70% at {r['clients']} clients, {r['mode']}: {r['ratio']:.0%} {verdict}")
        if r["clients"] == 1 and r["mode"] == "stream" and r["first_char_p50_ms"] is not None:
            verdict = "ok" if r["first_char_p50_ms"] < 20 else "BELOW GOAL"
            print(f"goal first character at 1 client < 20 ms: p50 {r['first_char_p50_ms']} ms {verdict}")
    bad = [r for r in rows if r["errors"]]
    print("goal no errors other than 429: " + ("ok" if not bad else "FAILED: " + "; ".join(
        f"{r['mode']} {r['clients']}: {r['errors']} {r['error_kinds']}" for r in bad)))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1))


# ---------------------------------------------------------------- --nginx


def through_nginx(args, counts: list[int], modes: list[str], replica_counts: list[int]) -> None:
    """For each number of replicas R: R servers (each as above), nginx in front of them with
    deploy/nginx's configuration rendered for loopback (tests/balancer.py, as tests/test_nginx.py
    runs it); then for each mode and number of clients N, right after each other: N clients
    straight to the replicas (client c to replica c % R), and the same N clients through nginx."""
    sys.path.insert(0, str(ROOT / "tests"))
    from balancer import running_nginx

    print(f"model {args.artifact}; {args.seconds:g} s per row, {args.max_chars} characters per request, "
          f"{args.workers} worker(s) per replica, "
          f"{os.cpu_count()} CPUs shared by the replicas, nginx and the clients", flush=True)
    rows = []
    for replicas in replica_counts:
        servers, logs = [], []
        try:
            for _ in range(replicas):
                logs.append(Path(tempfile.mkstemp(prefix="chargen-bench-", suffix=".log")[1]))
                servers.append(start_server(args.artifact, args.workers, max(64, max(counts)), logs[-1]))
            urls = [url for _, url in servers]
            with running_nginx([url.removeprefix("http://") for url in urls]) as nginx:
                for mode in modes:
                    for n in counts:
                        direct = asyncio.run(load(urls, n, args.seconds, mode == "stream", args.max_chars))
                        proxied = asyncio.run(load(nginx.url, n, args.seconds, mode == "stream", args.max_chars))
                        rows.append({"replicas": replicas, "mode": mode, "clients": n, "direct": direct, "nginx": proxied})
                        print(f"  {replicas} replica(s) {mode:6} {n:3} clients: direct {direct['chars_per_second']:,.0f} "
                              f"chars/s, through nginx {proxied['chars_per_second']:,.0f}", flush=True)
        finally:
            for process, _ in servers:
                stop_server(process)
            for log in logs:
                log.unlink(missing_ok=True)

    print()
    print("| replicas | mode | clients | direct chars/s | nginx chars/s | nginx/direct | first char p50 ms direct / nginx | "
          "latency p50 ms direct / nginx | errors direct / nginx |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        d, x = r["direct"], r["nginx"]
        ratio = x["chars_per_second"] / d["chars_per_second"] if d["chars_per_second"] else float("nan")
        print(f"| {r['replicas']} | {r['mode']} | {r['clients']} | {d['chars_per_second']:,.0f} | {x['chars_per_second']:,.0f} | "
              f"{ratio:.0%} | {d['first_char_p50_ms']} / {x['first_char_p50_ms']} | {d['latency_p50_ms']} / {x['latency_p50_ms']} | "
              f"{d['errors']} / {x['errors']} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
