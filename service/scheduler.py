"""One engine loop per model in each worker: continuous batching of all the worker's requests for
that model (a worker serving several models runs one Scheduler, with its own engine, slots and
queue, per model; requests for different models are never batched together).

HTTP threads never touch the engine (it is not thread-safe). They hand a Job to the loop through a
bounded queue and read what it produces from the job's own queue:

    HTTP thread                          engine loop thread (the only caller of the engine)
    submit(job) --- waiting (bounded) --> admit when slots are free: engine.start() per choice
                                          step all active streams together, one character each
    events(job) <-- Chunks (streaming) -- one per choice that produced text, then the end (DONE)
    cancel(job) --- cancelled ----------> engine.cancel(): the slot is free before the next step

Requests join and leave between steps. A full queue is refused at once (QueueFull -> 429), so
overload turns into quick 429s rather than ever longer waits. Every job has a deadline; the loop
cancels a job that passes it, queued or running.

Non-streaming jobs without logprobs get nothing until they finish (one wake-up per request instead
of one per character). A streaming job gets its first characters at once, then what accumulated
at most every `interval` seconds (and at its end): one thread wake-up, one write and one event per
interval instead of per character. interval = max(stream_interval, streams / stream_chunk_rate),
so however many streams run, the HTTP threads wake at most stream_chunk_rate times a second in
all: every wake-up takes the GIL from the engine loop, and per-character wake-ups of 32 streams
halved the characters a worker generated (bench/README.md, "Service"). A reader sees 50 updates a
second at low load, fewer and larger ones with many streams.

The model loads in this thread too (ONNX Runtime is imported and its sessions made here, after
gunicorn forked the worker: a session's threads would not survive the fork), so /health can answer
503 while it loads. The thread starts with start() (gunicorn's post_worker_init calls it) or on
first use (ready, wait_ready, submit, on_failure), so building an application, for a test or a tool
that only reads /openapi.json, starts nothing and loads nothing.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

from service import metrics
from service.config import ModelSource, Settings

log = logging.getLogger("chargen")

DONE = object()  # the last item on a job's events queue
POLL_SECONDS = 0.25  # how often a waiting HTTP thread checks that its client is still there
HANGUP = getattr(select, "POLLRDHUP", 0)  # the peer closed or shut down its side of the connection


class NotReady(Exception):
    pass


class QueueFull(Exception):
    pass


class ClientGone(Exception):
    pass


@dataclass
class Chunk:
    """What one choice of a job generated since the last hand-over."""

    index: int  # the choice, in the job's request order
    text: str
    logprobs: list  # [CharLogprob], one per character of text (empty unless asked for)


class Job:
    """One HTTP request's generations (its n choices) on their way through the engine loop."""

    def __init__(self, requests: list, *, incremental: bool, deadline: float, arrived: float, fd: int | None = None):
        self.requests = requests  # [GenerationRequest], one per choice
        self.fd = fd  # the client's socket, watched for hang-ups while the job runs
        self.incremental = incremental  # the consumer wants Chunks as they come (streaming, or logprobs to collect)
        self.deadline = deadline  # time.perf_counter() value
        self.arrived = arrived
        self.events: queue.SimpleQueue = queue.SimpleQueue()  # lists of Chunks, then DONE
        self.pending: dict[int, tuple[list, list]] = {}  # choice -> (texts, logprobs) not handed over yet
        self.handed_over = 0.0  # when Chunks were last put on `events`
        self.streams: list = []  # [Stream] in choice order, once started
        self.choice: dict = {}  # Stream -> its index in `streams`
        self.submitted = self.started = self.generating = self.first_char = self.finished = None
        self.prompt_seconds = 0.0
        self.error: str | None = None  # "deadline", "shutdown" or "server": why the loop ended it early
        self.cancelled = False
        self.done = False
        self._unfinished = len(requests)
        self.readings: dict[int, object] = {}  # request index -> the engine's PromptReading of its prompt, or None (read at start)


class WorkerReadiness:
    """chargen_workers_ready counts a worker once every one of its models is loaded."""

    def __init__(self, models: int):
        self._models, self._loaded, self._counted = models, 0, False
        self._lock = threading.Lock()

    def loaded(self) -> None:
        with self._lock:
            self._loaded += 1
            if self._loaded == self._models and not self._counted:
                self._counted = True
                metrics.workers_ready.inc()

    def stopped(self) -> None:
        with self._lock:
            self._loaded -= 1
            if self._counted:
                self._counted = False
                metrics.workers_ready.dec()


class Scheduler:
    def __init__(self, settings: Settings, source: ModelSource | None = None, readiness: WorkerReadiness | None = None):
        self.settings = settings
        # Which model: CHARGEN_ARTIFACT's unless told (service/app.py makes one Scheduler per model).
        self.source = source or ModelSource(settings.name, settings.artifact, "CHARGEN_ARTIFACT")
        self.name = self.source.name
        self.metrics = metrics.ModelMetrics(self.name)
        self._readiness = readiness or WorkerReadiness(1)
        self.engine = None
        self.artifact = None
        self.failure: BaseException | None = None
        # Set when the worker stops accepting connections (SIGTERM): /health answers 503 so a load
        # balancer that still holds a connection to it stops sending; jobs already here still run.
        self.draining = False
        self._ready = threading.Event()
        self._closing = threading.Event()
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._cancelled: deque[Job] = deque()
        self._next_deadline = float("inf")
        self._cutoff = float("inf")  # draining: when every job still here is ended ("shutdown")
        self._on_failure: Callable[[BaseException, bool], None] | None = None
        self._reported_active = 0
        self._cache_seen = (0, 0, 0)  # the prompt cache's hits, misses and characters saved, as reported
        # The loop polls the sockets of running jobs (one poll(0) call per step) for the client's
        # hang-up, so a dropped client's slot is free before the next step. Linux only (POLLRDHUP);
        # elsewhere the job's HTTP thread notices when it next wakes or writes.
        self._hangups = select.poll() if HANGUP else None
        self._watched: dict[int, Job] = {}  # fd -> running job
        self._thread = threading.Thread(target=self._run, name="chargen-engine", daemon=True)
        self._started = False

    # ------------------------------------------------------------ life

    def start(self) -> None:
        """Start the engine thread (it loads the model, then runs the loop); later calls do nothing."""
        if self._started:
            return
        with self._cond:
            if not self._started and not self._closing.is_set():
                self._thread.start()
                self._started = True

    @property
    def ready(self) -> bool:
        self.start()
        return self._ready.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the model is loaded (True) or loading failed or timed out (False)."""
        self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ready.is_set() and self.failure is None and self._thread.is_alive():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            self._ready.wait(0.1 if left is None else min(0.1, left))
        return self._ready.is_set()

    def on_failure(self, callback: Callable[[BaseException, bool], None]) -> None:
        """Call `callback(error, loaded)` when loading fails (loaded False) or the loop dies (True);
        at once if that already happened."""
        self.start()
        with self._cond:
            self._on_failure = callback
            failure = self.failure
        if failure is not None:
            callback(failure, self.engine is not None)

    def drain(self, seconds: float | None = None) -> None:
        """The worker is shutting down: report it (/health); running and queued jobs still finish, or,
        those still here after `seconds` (a little less than what the worker has left before it is
        stopped), end with error "shutdown", which their clients are told, rather than being cut."""
        self.draining = True
        if seconds is not None:
            with self._cond:
                self._cutoff = time.perf_counter() + seconds
                self._next_deadline = min(self._next_deadline, self._cutoff)
                self._cond.notify()

    def close(self, timeout: float = 5.0) -> None:
        self._closing.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ------------------------------------------------------------ HTTP threads

    def submit(self, job: Job) -> None:
        if not self.ready or self._closing.is_set():
            raise NotReady()
        with self._cond:
            if len(self._waiting) >= self.settings.max_queue and not self._fits_now(job):
                raise QueueFull()
            job.submitted = time.perf_counter()
            self._waiting.append(job)
            self._next_deadline = min(self._next_deadline, job.deadline, self._cutoff)
            self._cond.notify()
        self.metrics.queue_depth.inc()

    def _fits_now(self, job: Job) -> bool:
        # With max_queue 0 a request is still taken when a slot is free for it right now.
        return not self._waiting and self.engine.max_batch - self.engine.active >= len(job.requests)

    def cancel(self, job: Job) -> None:
        """Stop a job (its client went away); its slots are free before the next engine step."""
        if job.done:
            return
        job.cancelled = True
        with self._cond:
            try:
                self._waiting.remove(job)
                removed = True
            except ValueError:
                removed = False
                self._cancelled.append(job)
            self._cond.notify()
        if removed:
            self.metrics.queue_depth.dec()
            self._finish(job)

    def events(self, job: Job, client_gone: Callable[[], bool] = lambda: False) -> Iterator[list[Chunk]]:
        """Yield lists of Chunks (at most one per choice) as they are handed over until the job is done.
        If the consumer stops early (the generator is closed, the client is gone), the job is cancelled."""
        done = False
        try:
            while not done:
                try:
                    items = [job.events.get(timeout=POLL_SECONDS)]
                except queue.Empty:
                    if client_gone():
                        raise ClientGone() from None
                    if time.perf_counter() > job.deadline + 10 and not self._thread.is_alive():
                        job.error = "server"  # the loop died; never wait forever
                        return
                    continue
                while True:
                    try:
                        items.append(job.events.get_nowait())
                    except queue.Empty:
                        break
                if items[-1] is DONE:
                    done = True
                    items.pop()
                    if job.cancelled:  # the loop saw the client hang up
                        raise ClientGone()
                elif client_gone():
                    raise ClientGone()
                if items:
                    yield items[0] if len(items) == 1 else _joined(items)
        finally:
            if not done:
                self.cancel(job)

    def queue_depth(self) -> int:
        return len(self._waiting)

    # ------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        try:
            self._load()
        except BaseException as e:  # noqa: BLE001 - reported to the worker, which exits
            self._fail(e, loaded=False)
            return
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001
            log.exception("the engine loop stopped")
            self._fail(e, loaded=True)
        finally:
            self._ready.clear()
            self._readiness.stopped()
            self.metrics.active_streams.dec(self._reported_active)

    def _load(self) -> None:
        if self.settings.load_delay and self._closing.wait(self.settings.load_delay):
            raise RuntimeError("closed while loading")
        started = time.perf_counter()
        from model.runtime.artifact import load
        from model.runtime.engine import Engine, GenerationRequest
        from model.runtime.sampling import SamplingSettings

        artifact = load(self.source.path, self.settings.precision)
        engine = Engine(artifact, max_batch=self.settings.max_batch, device=self.settings.device,
                        prompt_cache_bytes=int(self.settings.prompt_cache_mb * 2**20))
        # One short generation so the first request does not pay for first-call costs.
        engine.generate(GenerationRequest("\n", max_chars=4, sampling=SamplingSettings(temperature=1.0), seed=0))
        self.artifact, self.engine = artifact, engine
        self._ready.set()
        self._readiness.loaded()
        log.info("worker %d: loaded %s from %s (%s %dx%d, %d characters, %s graph %s) in %.1f s", os.getpid(), self.name,
                 artifact.path, artifact.config.cell, artifact.config.layers, artifact.config.units, len(artifact.vocab),
                 artifact.precision, artifact.graph.name, time.perf_counter() - started)

    def _fail(self, error: BaseException, loaded: bool) -> None:
        with self._cond:
            self.failure = error
            callback = self._on_failure
            waiting = list(self._waiting)
            self._waiting.clear()
        for job in waiting:
            self.metrics.queue_depth.dec()
            job.error = "server"
            self._finish(job)
        if callback is not None:
            callback(error, loaded)

    def _loop(self) -> None:
        engine, settings = self.engine, self.settings
        interval = settings.stream_interval
        active: dict = {}  # Stream -> Job
        streams: list = []
        while not self._closing.is_set():
            changed = False
            if self._cancelled:
                changed |= self._drop_cancelled(active)
            if self._waiting and engine.active < engine.max_batch:
                changed |= self._admit(active)
            if time.perf_counter() >= self._next_deadline:
                changed |= self._expire(active)
            if self._watched:
                changed |= self._drop_hung_up(active)
            if changed:
                streams = [s for s in engine.streams if s in active]  # in slot order: step()'s fast path
                self._report_active(engine.active)
                interval = max(settings.stream_interval, len(streams) / settings.stream_chunk_rate)
            if not streams:
                with self._cond:
                    while not (self._waiting or self._cancelled or self._closing.is_set()):
                        self._cond.wait(1.0)
                continue

            deltas = engine.step(streams)
            now = time.perf_counter()
            chars, finished = 0, False
            for d in deltas:
                job = active[d.stream]
                if d.text:
                    chars += len(d.text)
                    if job.first_char is None:
                        job.first_char = now
                    if job.incremental:
                        texts, logprobs = job.pending.setdefault(job.choice[d.stream], ([], []))
                        texts.append(d.text)
                        logprobs.extend(d.logprobs)
                        if now - job.handed_over >= interval:
                            _hand_over(job)
                            job.handed_over = now
                if d.finish_reason:
                    del active[d.stream]
                    finished = True
                    job._unfinished -= 1
                    if not job._unfinished:
                        self._finish(job, now)
            self.metrics.batch_size.observe(len(streams))
            if chars:
                self.metrics.chars_generated.inc(chars)
            if finished:
                streams = [s for s in engine.streams if s in active]
                self._report_active(engine.active)
                interval = max(settings.stream_interval, len(streams) / settings.stream_chunk_rate)
        for job in set(active.values()):
            job.error = "server"
            self._finish(job)

    def _admit(self, active: dict) -> bool:
        engine, admitted = self.engine, False
        while True:
            with self._cond:
                if not self._waiting or len(self._waiting[0].requests) > engine.max_batch - engine.active:
                    return admitted
                job = self._waiting[0]
            # A long prompt is read a piece at a time: the running streams step between pieces, and the loop
            # sees deadlines and a drain's cutoff between them (on an idle worker too).
            try:
                if not self._read_ahead(job):
                    return admitted
            except Exception:
                log.exception("could not read a prompt")
                with self._cond:
                    if self._waiting and self._waiting[0] is job:
                        self._waiting.popleft()
                        self.metrics.queue_depth.dec()
                job.error = "server"
                self._finish(job)
                continue
            with self._cond:
                if not self._waiting or self._waiting[0] is not job:  # the deadline took it meanwhile
                    continue
                self._waiting.popleft()
            self.metrics.queue_depth.dec()
            job.started = job.started or time.perf_counter()
            try:
                for k, request in enumerate(job.requests):
                    stream = engine.start(request, job.readings.get(k))
                    job.choice[stream] = len(job.streams)
                    job.streams.append(stream)
                    if stream.finish_reason is None:
                        active[stream] = job
                    else:  # max_chars 0: the prompt was read (and scored), nothing to generate
                        job._unfinished -= 1
            except Exception:
                log.exception("could not start a generation")
                self._stop(job, active)
                job.error = "server"
                self._finish(job)
                continue
            job.generating = time.perf_counter()
            job.prompt_seconds = job.generating - job.started
            self._report_cache()
            if not job._unfinished:
                self._finish(job, job.generating)
                admitted = True
                continue
            if self._hangups is not None and job.fd is not None:
                self._hangups.register(job.fd, HANGUP)
                self._watched[job.fd] = job
            admitted = True

    def _read_ahead(self, job: Job) -> bool:
        """Whether the job's prompts are read, or short enough to be read at its start; if not, read
        the next piece of one (Engine.read_more): a long prompt (a chat's transcript, up to
        CHARGEN_MAX_TRANSCRIPT_CHARS) is read between the running streams' steps, not in one call
        that holds them all. Choices of one prompt read it once (the prompt cache keeps its end)."""
        engine = self.engine
        job.started = job.started or time.perf_counter()
        for k, request in enumerate(job.requests):
            if k not in job.readings:
                job.readings[k] = engine.reading(request)
            reading = job.readings[k]
            if reading is not None and not reading.finished:
                engine.read_more(reading)
                return False
        return True

    def _stop(self, job: Job, active: dict) -> bool:
        """Cancel the job's unfinished streams (their slots are free at once)."""
        changed = False
        for stream in job.streams:
            if stream.finish_reason is None:
                self.engine.cancel(stream)
                changed = True
            active.pop(stream, None)
        return changed

    def _drop_cancelled(self, active: dict) -> bool:
        changed = False
        while self._cancelled:
            job = self._cancelled.popleft()
            changed |= self._stop(job, active)
            self._finish(job)
        return changed

    def _drop_hung_up(self, active: dict) -> bool:
        """Cancel the jobs whose clients closed their connections, before the next step."""
        changed = False
        for fd, _ in self._hangups.poll(0):
            job = self._watched.get(fd)
            if job is not None and not job.done:
                job.cancelled = True
                changed |= self._stop(job, active)
                self._finish(job)
        return changed

    def _due(self, job: Job) -> float:
        """When the loop ends `job`: its deadline, or the drain's cutoff if that comes first."""
        return min(job.deadline, self._cutoff)

    def _expire(self, active: dict) -> bool:
        now, changed = time.perf_counter(), False
        due = self._due
        with self._cond:
            late = [job for job in self._waiting if due(job) <= now]
            for job in late:
                self._waiting.remove(job)
        for job in late:
            self.metrics.queue_depth.dec()
            job.error = "deadline" if job.deadline <= now else "shutdown"
            self._finish(job)
        for job in {job for job in active.values() if due(job) <= now}:
            self._stop(job, active)
            job.error = "deadline" if job.deadline <= now else "shutdown"
            self._finish(job)
            changed = True
        with self._cond:
            self._next_deadline = min([due(j) for j in self._waiting] + [due(j) for j in active.values()],
                                      default=float("inf"))
        return changed

    def _finish(self, job: Job, now: float | None = None) -> None:
        if job.done:
            return
        job.done = True
        job.finished = now or time.perf_counter()
        if self._watched.get(job.fd) is job:  # only the loop registers jobs, so only it gets here
            self._hangups.unregister(job.fd)
            del self._watched[job.fd]
        if job.pending:
            _hand_over(job)
        job.events.put(DONE)

    def _report_cache(self) -> None:
        """Add the prompt cache's counts since the last report to the metrics."""
        cache = self.engine.cache
        if cache is None:
            return
        stats, seen = cache.stats, self._cache_seen
        m = self.metrics
        m.prompt_cache_hits.inc(stats.hits - seen[0])
        m.prompt_cache_misses.inc(stats.misses - seen[1])
        m.prompt_cache_chars_saved.inc(stats.chars_saved - seen[2])
        m.prompt_cache_bytes.set(cache.bytes)
        self._cache_seen = (stats.hits, stats.misses, stats.chars_saved)

    def _report_active(self, n: int) -> None:
        if n != self._reported_active:
            self.metrics.active_streams.inc(n - self._reported_active)
            self._reported_active = n


def _hand_over(job: Job) -> None:
    job.events.put([Chunk(i, "".join(texts), logprobs) for i, (texts, logprobs) in job.pending.items()])
    job.pending = {}


def _joined(batches: list[list[Chunk]]) -> list[Chunk]:
    """Hand-overs the HTTP thread found waiting together -> one Chunk per choice (a slow reader gets
    one event per choice, not one per hand-over it missed)."""
    texts: dict[int, list[str]] = {}
    logprobs: dict[int, list] = {}
    for batch in batches:
        for c in batch:
            texts.setdefault(c.index, []).append(c.text)
            logprobs.setdefault(c.index, []).extend(c.logprobs)
    return [Chunk(i, "".join(parts), logprobs[i]) for i, parts in texts.items()]
