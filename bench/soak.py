"""Soak: many concurrent clients of every kind for minutes against a real gunicorn, optionally
losing a worker halfway; does the service stay correct, and do its workers stop growing?

    .venv/bin/python bench/soak.py [--clients 64] [--minutes 2 | --seconds S] [--workers 1] [--kill-worker]
                                   [--artifact artifacts/default] [--port P] [--seed 0]

The server is gunicorn with the project's config (bench/load.py starts it; default configuration
apart from the artifact, the address and the workers). Each client is an asyncio coroutine with one
kept-alive connection (bench/load.py's minimal HTTP/1.1 client, so that the load generator takes
little of the CPU it loads) sending one request after another, drawn from a seeded mix: JSON and
plain-text /v1/generate, native server-sent events and streamed plain text, OpenAI /v1/completions
streamed and not, n > 1, logprobs, and streams that the client hangs up after a few chunks. Every
request has a timeout; clients stop starting requests at the end of the run and by a count.

--kill-worker SIGKILLs one worker halfway. Its requests are lost by design: a failed request counts
as lost with it when its connection was one the worker held at the kill (read from /proc), and as
an error otherwise.

Printed: requests by kind and outcome; every 10 s, each worker's RSS and threads (from /proc: the
gunicorn master's children) and the requests it has served (its own file of the service's
multiprocess metrics), and the active-streams and queue gauges; RSS growth per 10,000 requests over
the intervals in which a serving worker added no threads (gthread adds pool threads as concurrency
peaks, up to CHARGEN_THREADS: a bounded one-off cost; the figure with those intervals is printed
too); whether the gauges are back to 0 once the clients are gone; error lines of the server's log;
PASS or FAIL against the goals (issue 10): no error other than 429 and the killed worker's
requests, RSS growth at most 5 MB per 10,000 requests, gauges at 0. Exit status 1 on FAIL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load import MAX_REQUESTS_PER_CLIENT, PROMPTS, ROOT, Client, start_server, stop_server  # noqa: E402


@dataclass(frozen=True)
class Kind:
    """One kind of client request in the mix."""

    name: str
    weight: int  # share of the mix
    api: str  # "json" (/v1/generate), "text" (/v1/generate, plain text) or "openai" (/v1/completions)
    stream: bool = False
    n: int = 1
    logprobs: int = 0
    hang_up: bool = False  # the client closes the connection after 1-4 chunks of a long stream


MIX = (Kind("json", 3, "json"), Kind("json n=4", 1, "json", n=4), Kind("json logprobs", 1, "json", logprobs=3),
       Kind("text", 2, "text"), Kind("text stream", 2, "text", stream=True), Kind("sse", 3, "json", stream=True),
       Kind("sse n=2 logprobs", 1, "json", stream=True, n=2, logprobs=3), Kind("openai", 2, "openai"),
       Kind("openai stream n=2 logprobs", 2, "openai", stream=True, n=2, logprobs=1),
       Kind("hang-up sse", 1, "json", stream=True, hang_up=True),
       Kind("hang-up text stream", 1, "text", stream=True, hang_up=True),
       Kind("hang-up openai stream", 1, "openai", stream=True, hang_up=True))
TEMPERATURES = (0.0, 0.5, 0.8, 1.0)
SAMPLE_EVERY = 10.0  # seconds between RSS and gauge samples
LOST_WINDOW = 5.0  # seconds after the kill in which the killed worker's connections fail
GAUGES = ("chargen_active_streams", "chargen_queue_depth")
GOAL_MB_PER_10K = 5.0
OUTCOMES = ("200", "429", "hung up", "lost", "error")


@dataclass
class Record:
    kind: str
    outcome: str  # one of OUTCOMES
    detail: str  # what went wrong, for errors
    start: float
    end: float


@dataclass
class Worker:
    rss_mb: float
    threads: int
    served: float  # /v1/ requests it has answered (its own counter file)


@dataclass
class Sample:
    t: float  # seconds since the load started
    answered: int  # requests the clients have finished
    ready: float | None  # chargen_workers_ready
    gauges: dict[str, float | None]
    workers: dict[int, Worker]  # by pid


@dataclass
class Run:
    url: str
    master: int
    metrics_dir: Path  # the service's PROMETHEUS_MULTIPROC_DIR
    started: float = 0.0
    records: list[Record] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    killed: int | None = None  # pid
    killed_at: float | None = None
    killed_ports: set[int] = field(default_factory=set)  # client ports of the killed worker's connections


# ---------------------------------------------------------------- the requests


def build(kind: Kind, rng: random.Random) -> tuple[str, bytes, str]:
    """(path, body, content type) of one request of `kind`."""
    prompt, seed, temperature = rng.choice(PROMPTS), rng.randrange(2**32), rng.choice(TEMPERATURES)
    max_chars = 2000 if kind.hang_up else rng.randint(20, 300)
    if kind.api == "text":
        stream = "&stream=true" if kind.stream else ""
        return (f"/v1/generate?max_chars={max_chars}&temperature={temperature}&seed={seed}{stream}",
                prompt.encode(), "text/plain; charset=utf-8")
    body = {"prompt": prompt, "temperature": temperature, "seed": seed, "n": kind.n, "stream": kind.stream}
    if kind.logprobs:
        body["logprobs"] = kind.logprobs
    if kind.api == "openai":
        body["max_tokens"] = max_chars  # no `model`: the server's default
        if kind.stream:
            body["stream_options"] = {"include_usage": True}
        return "/v1/completions", json.dumps(body).encode(), "application/json"
    body["max_chars"] = max_chars
    return "/v1/generate", json.dumps(body).encode(), "application/json"


def check(kind: Kind, payload: bytes) -> str | None:
    """What is wrong with a complete 200 answer of `kind`, or None."""
    if kind.api == "text":
        last = payload.decode().rstrip("\n").rsplit("\n", 1)[-1]  # a stream's error comes as a last line
        return "error at the end of the text" if last.startswith('{"error"') else None
    if kind.stream:
        events = payload.rstrip().rsplit(b"\n\n", 2)
        last = events[-1].removeprefix(b"data: ")
        if last == b"[DONE]":
            return None if b'"usage"' in events[-2] else "no usage before [DONE]"
        last = json.loads(last)
        if "error" in last:
            return "error event: " + last["error"]["code"]
        if kind.api == "openai":
            return "no [DONE]"
        return None if last.get("done") and len(last["choices"]) == kind.n else "no final event"
    answer = json.loads(payload)
    choices = answer["choices"]
    if len(choices) != kind.n:
        return f"{len(choices)} choices, not {kind.n}"
    used = answer["usage"]["completion_chars" if kind.api == "json" else "completion_tokens"]
    if used != sum(len(c["text"]) for c in choices):
        return "the usage is not the length of the text"
    if kind.logprobs and any(len(c["logprobs"]) != len(c["text"]) for c in choices):
        return "not one logprob per character"
    return None


def failure(e: Exception) -> str:
    """A request that got no complete answer, in words."""
    if isinstance(e, asyncio.TimeoutError):
        return "timeout"
    if isinstance(e, asyncio.IncompleteReadError):
        return "cut off"
    if isinstance(e, (ValueError, IndexError)):  # the client's reader met the end of the connection or garbage
        return "cut off or malformed"
    return type(e).__name__


def error_detail(status: int, payload: bytes) -> str:
    try:
        return f"HTTP {status} {json.loads(payload)['error']['code']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}"


async def client(run: Run, c: int, end: float, seed: int, timeout: float) -> None:
    host, port = run.url.removeprefix("http://").split(":")
    rng = random.Random(seed * 1_000_003 + c)
    weights = [k.weight for k in MIX]
    conn = Client(host, int(port))
    try:
        for _ in range(MAX_REQUESTS_PER_CLIENT):
            if time.monotonic() >= end:
                return
            kind = rng.choices(MIX, weights)[0]
            hang_up_after = rng.randint(1, 4) if kind.hang_up else 0
            path, data, content_type = build(kind, rng)
            chunks = 0

            def seen(part: bytes, after: int = hang_up_after) -> bool:
                nonlocal chunks
                chunks += 1
                return chunks == after

            start = time.monotonic()
            try:
                status, _, payload = await asyncio.wait_for(conn.post(path, data, content_type, on_chunk=seen), timeout)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, IndexError) as e:
                ended = time.monotonic()
                local = conn.writer.get_extra_info("sockname")[1] if conn.writer is not None else None
                lost = (run.killed_at is not None and local in run.killed_ports
                        and run.killed_at <= ended <= run.killed_at + LOST_WINDOW)
                run.records.append(Record(kind.name, "lost" if lost else "error", failure(e), start, ended))
                conn.close()  # the next request opens a new connection
                continue
            outcome, detail = "200", ""
            if status == 429:
                outcome = "429"
            elif status != 200:
                outcome, detail = "error", error_detail(status, payload)
            elif hang_up_after and chunks == hang_up_after:
                outcome = "hung up"
            else:
                try:
                    problem = check(kind, payload)
                except (ValueError, KeyError, TypeError, IndexError) as e:
                    problem = f"unreadable answer ({type(e).__name__})"
                if problem:
                    outcome, detail = "error", problem
            run.records.append(Record(kind.name, outcome, detail, start, time.monotonic()))
            if status == 429:
                await asyncio.sleep(rng.uniform(0.05, 0.2))
    finally:
        conn.close()


# ---------------------------------------------------------------- the server, from outside


def worker_pids(master: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{master}/task/{master}/children").read_text().split()]
    except OSError:
        return []


def rss_and_threads(pid: int) -> tuple[float, int] | None:
    """The resident set in MB and the number of threads of process `pid` (None once it is gone)."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    except OSError:
        return None
    if "VmRSS" not in fields:  # a killed worker not reaped yet
        return None
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"])


def served(metrics_dir: Path, pid: int) -> float:
    """The /v1/ requests worker `pid` has answered, from its own file of the service's
    multiprocess metrics (/metrics only shows the sum over workers)."""
    from prometheus_client.multiprocess import MultiProcessCollector

    path = metrics_dir / f"counter_{pid}.db"
    if not path.exists():
        return 0.0
    return sum(sample.value for metric in MultiProcessCollector.merge([str(path)]) for sample in metric.samples
               if sample.name == "chargen_requests_total" and sample.labels["route"].startswith("/v1/"))


def client_ports(pid: int) -> set[int]:
    """The peer ports of the TCP connections process `pid` holds (its clients' local ports)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[9] in inodes:
            ports.add(int(fields[2].split(":")[1], 16))
    return ports


def read_metrics(url: str) -> dict[str, float]:
    """The samples of /metrics, each name's summed over its labels (the gauges this bench reads: over
    every model)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name and not name.startswith("#"):
            name = name.partition("{")[0]
            values[name] = values.get(name, 0.0) + float(value)
    return values


async def sample(run: Run) -> Sample:
    try:
        values = await asyncio.to_thread(read_metrics, run.url)
    except (OSError, ValueError):
        values = {}
    workers = {pid: Worker(*st, served(run.metrics_dir, pid))
               for pid in worker_pids(run.master) if (st := rss_and_threads(pid)) is not None}
    s = Sample(time.monotonic() - run.started, len(run.records), values.get("chargen_workers_ready"),
               {g: values.get(g) for g in GAUGES}, workers)
    run.samples.append(s)
    print(f"  {s.t:5.0f} s  {s.answered:7,} answered  ready {_num(s.ready)}  active {_num(s.gauges['chargen_active_streams'])}  "
          f"queue {_num(s.gauges['chargen_queue_depth'])}  workers "
          + ", ".join(f"{pid}: {w.rss_mb:.1f} MB, {w.threads} threads, {w.served:,.0f} served" for pid, w in workers.items()),
          flush=True)
    return s


async def sampler(run: Run, end: float) -> None:
    while (wait := min(SAMPLE_EVERY, end - time.monotonic())) > 1:
        await asyncio.sleep(wait)
        await sample(run)


async def killer(run: Run, at: float) -> None:
    await asyncio.sleep(at - time.monotonic())
    victim = worker_pids(run.master)[0]
    run.killed_ports = client_ports(victim)
    run.killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    run.killed = victim
    print(f"  {run.killed_at - run.started:5.0f} s  SIGKILL worker {victim} ({len(run.killed_ports)} client connections)", flush=True)


async def soak(run: Run, clients: int, seconds: float, seed: int, timeout: float, kill: bool) -> None:
    run.started = time.monotonic()
    end = run.started + seconds
    await sample(run)
    tasks = [client(run, c, end, seed, timeout) for c in range(clients)]
    tasks.append(sampler(run, end))
    if kill:
        tasks.append(killer(run, run.started + seconds / 2))
    await asyncio.gather(*tasks)
    await sample(run)  # the clients are done and their connections closed


async def settled_gauges(run: Run, within: float = 10.0) -> tuple[Sample, float]:
    """The first sample with both gauges at 0, or the last one after `within` seconds; and the
    seconds waited for it."""
    started = time.monotonic()
    while True:
        s = await sample(run)
        if all(v == 0 for v in s.gauges.values()) or time.monotonic() - started >= within:
            return s, time.monotonic() - started
        await asyncio.sleep(1.0)


# ---------------------------------------------------------------- the report


def _num(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"


def kind_table(records: list[Record]) -> list[str]:
    counts = Counter((r.kind, r.outcome) for r in records)
    lines = ["| kind | requests | " + " | ".join(OUTCOMES) + " |", "|---|" + "---:|" * (len(OUTCOMES) + 1)]
    for kind in [k.name for k in MIX] + ["all"]:
        row = [sum(n for (k, o), n in counts.items() if o == outcome and kind in (k, "all")) for outcome in OUTCOMES]
        lines.append(f"| {kind} | {sum(row):,} | " + " | ".join(f"{n:,}" for n in row) + " |")
    return lines


def growth(run: Run) -> tuple[list[str], float | None]:
    """Lines per worker, and RSS growth per 10,000 requests over the intervals that count (None
    when none does).

    An interval between two samples counts for a worker that had served requests before it (a
    replacement loads its model first) and whose number of threads did not change in it: gthread
    adds pool threads as concurrency peaks, up to CHARGEN_THREADS, and each new thread's stack and
    malloc arena is a bounded one-off cost, not growth per request. The figure with those intervals
    too is printed beside it."""
    lines, grown, answered, grown_all, answered_all = [], 0.0, 0.0, 0.0, 0.0
    for pid in dict.fromkeys(pid for s in run.samples for pid in s.workers):
        mine = [(s.t, s.workers[pid]) for s in run.samples if pid in s.workers]
        mb = count = 0.0
        for (_, a), (_, b) in pairwise(mine):
            if a.served > 0:
                grown_all, answered_all = grown_all + b.rss_mb - a.rss_mb, answered_all + b.served - a.served
                if a.threads == b.threads:
                    mb, count = mb + b.rss_mb - a.rss_mb, count + b.served - a.served
        grown, answered = grown + mb, answered + count
        shown = mine[::max(1, len(mine) // 12)]  # a long run: about a dozen samples, and the last
        shown += mine[-1:] if shown[-1] is not mine[-1] else []
        trail = " -> ".join(f"{w.rss_mb:.1f}" for _, w in shown)
        rate = f"{mb / count * 1e4:+.2f} MB per 10,000" if count >= 500 else "too few for a rate of its own"
        lines.append(f"  worker {pid} ({mine[0][0]:.0f}-{mine[-1][0]:.0f} s, {mine[0][1].threads}-{mine[-1][1].threads} "
                     f"threads, {mine[-1][1].served:,.0f} served): {trail} MB; {mb:+.1f} MB over {count:,.0f} requests "
                     f"in the intervals that count ({rate})")
    if answered_all:
        lines.append(f"  with the intervals in which threads were added: {grown_all / answered_all * 1e4:+.2f} MB per 10,000 "
                     f"requests ({grown_all:+.1f} MB over {answered_all:,.0f})")
    return lines, (grown / answered * 1e4 if answered else None)


def log_errors(log_path: Path, killed: int | None) -> list[str]:
    """The server log's error lines, less the ones a deliberate kill is expected to cause."""
    expected = ("was sent SIGKILL", "Perhaps out of memory") if killed else ()
    lines = log_path.read_text(errors="replace").splitlines()
    return [line for line in lines if ("ERROR" in line or "Traceback" in line or "CRITICAL" in line)
            and not any(e in line for e in expected)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", default=str(ROOT / "artifacts" / "default"))
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients")
    duration = parser.add_mutually_exclusive_group()
    duration.add_argument("--minutes", type=float, help="length of the run (default 2)")
    duration.add_argument("--seconds", type=float, help="length of the run")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn workers")
    parser.add_argument("--kill-worker", action="store_true", help="SIGKILL one worker halfway")
    parser.add_argument("--port", type=int, help="127.0.0.1 port to serve on (default: a free one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds one request may take")
    args = parser.parse_args()
    seconds = args.seconds if args.seconds is not None else 60 * (args.minutes if args.minutes is not None else 2)
    if args.clients < 1 or seconds <= 0 or args.workers < 1:
        parser.error("--clients, the duration and --workers must be positive")

    log_path = Path(tempfile.mkstemp(prefix="chargen-soak-", suffix=".log")[1])
    metrics_dir = Path(tempfile.mkdtemp(prefix="chargen-soak-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)  # the server's, so that its files can be read
    try:
        process, url = start_server(args.artifact, args.workers, None, log_path, port=args.port)
        try:
            run = Run(url, process.pid, metrics_dir)
            print(f"soak: {url}, {args.workers} worker(s), {args.clients} clients for {seconds:g} s, seed {args.seed}"
                  f"{', one worker killed halfway' if args.kill_worker else ''}; {os.cpu_count()} CPUs, load average "
                  f"{os.getloadavg()[0]:.1f}", flush=True)
            asyncio.run(soak(run, args.clients, seconds, args.seed, args.timeout, args.kill_worker))
            final, waited = asyncio.run(settled_gauges(run))
            errors = log_errors(log_path, run.killed)
        finally:
            stop_server(process)
    finally:
        log_path.unlink(missing_ok=True)
        shutil.rmtree(metrics_dir, ignore_errors=True)

    records = run.records
    elapsed = max(r.end for r in records) - run.started if records else seconds
    cpu = sum(os.times()[:2])
    print(f"\n{len(records):,} requests in {elapsed:.0f} s ({len(records) / elapsed:.1f}/s); the clients used {cpu:.0f} s "
          f"of CPU ({cpu / elapsed:.0%} of one core); load average now {os.getloadavg()[0]:.1f}\n")
    print("\n".join(kind_table(records)))
    details = Counter((r.kind, r.detail) for r in records if r.outcome in ("error", "lost"))
    for (kind, detail), n in details.most_common():
        print(f"  {kind}: {detail} x {n}")
    if run.killed:
        in_flight = sum(1 for r in records if r.outcome == "lost" and r.start < run.killed_at)
        print(f"  lost: failed on a connection worker {run.killed} held at the kill ({in_flight} of them in flight)")

    print("\nworker RSS by sample; growth over the 10-s intervals in which a serving worker added no threads:")
    lines, rate = growth(run)
    print("\n".join(lines))
    print(f"  overall: {'?' if rate is None else f'{rate:+.2f}'} MB per 10,000 requests")
    at_zero = all(v == 0 for v in final.gauges.values())
    print(f"\ngauges {waited:.0f} s after the clients ended: "
          + ", ".join(f"{g} {_num(v)}" for g, v in final.gauges.items()))
    if errors:
        print(f"\nserver log: {len(errors)} error lines, the first ones:")
        print("\n".join("  " + line for line in errors[:20]))

    failed = []
    bad = sum(1 for r in records if r.outcome == "error")
    if bad:
        failed.append(f"{bad} errors other than 429 and the killed worker's requests")
    if rate is None or rate > GOAL_MB_PER_10K:
        failed.append(f"RSS growth {'unmeasured' if rate is None else f'{rate:.2f} MB'} per 10,000 requests "
                      f"(goal <= {GOAL_MB_PER_10K:g})")
    if not at_zero:
        failed.append("gauges not back to 0")
    if failed:
        print("\nFAIL: " + "; ".join(failed))
        sys.exit(1)
    print(f"\nPASS: no errors other than 429 and the killed worker's; RSS growth {rate:+.2f} MB per 10,000 requests "
          f"(goal <= {GOAL_MB_PER_10K:g}); gauges at 0")


if __name__ == "__main__":
    main()
