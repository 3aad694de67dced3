"""Changing a running server without dropping a request: snapshots of the models, the reload
handover and the drain. service/gunicorn_conf.py calls these from gunicorn's hooks; the reasons are
in its docstring.

    master:  Snapshots(settings).take(check)  list the models (a CHARGEN_MODELS directory is read
                                              again), copy each (and, on SIGHUP, load each copy in a
                                              subprocess exactly as a worker does) before workers use them
    worker:  handle_sigterm(worker, chargen, snapshots)
             SIGTERM from a reload: keep serving until a worker of the new reload has loaded its
             models, then drain; any other SIGTERM: drain at once (stop listening, /health 503,
             let open requests finish)

    python -m service.lifecycle take SOURCE TARGET [--check]     (what Snapshots.take runs, per model)

The snapshot directory (a fresh temporary directory per server) holds the copies (1/NAME, 2/NAME,
...), the number of the latest reload (`reloads`) and one empty file per worker that has loaded its
models after a reload (`ready/RELOAD-PID`): that is how an old worker learns that its successor is
ready. The gunicorn master imports this module: at the top it imports no Flask, and of the model's
code only model/records/files.py (standard library only).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from model.records.files import write_atomic
from service.config import Models, ModelSource, Settings, SettingsError

# How long the master waits for `take --check` (import, load, one short generation) before it gives
# up and keeps the previous model. The checks of several models run at once; the master handles no
# signal meanwhile.
CHECK_SECONDS = 180


class SnapshotError(Exception):
    """The models could not be listed, or the default model has no copy that loads; the message
    says why (the loader's own words for a model)."""


class Snapshots:
    def __init__(self, settings: Settings):
        self.settings = settings  # the start's: CHARGEN_ARTIFACT and CHARGEN_MODELS as given (paths, symlinks)
        self.root = Path(tempfile.mkdtemp(prefix="chargen-models-"))
        (self.root / "ready").mkdir()
        self.current: Models | None = None  # the copies workers forked now load (None: the sources themselves)
        self._current_dir: Path | None = None
        self._listed: dict[str, str] = {}  # name -> where the current snapshot's models were listed (their sources)
        self.reloads = 0  # SIGHUPs handled; a worker keeps the value it was forked with
        self._taken = 0
        (self.root / "reloads").write_text("0")

    # ------------------------------------------------------------ master

    def take(self, check: bool) -> tuple[Models, list[tuple[str, str, bool]]]:
        """List the models again, copy each to a new snapshot (root/N/NAME) and make it current; with
        `check`, first load each copy as a worker would (in subprocesses, all at once: the master
        never imports the engine). A model whose copy or check fails keeps its previous copy, or is
        left out when it had none. Returns the new current list and, per model that failed,
        (name, reason, whether its previous copy is kept). Raises SnapshotError and keeps the current
        snapshot when the models cannot be listed, when the default model has no copy that loads,
        or, at start (no check), when any copy fails (the workers then load the sources themselves
        and report why)."""
        try:
            models = self.settings.models_to_serve()
        except SettingsError as e:
            raise SnapshotError(str(e)) from None
        self._taken += 1
        target = self.root / str(self._taken)
        target.mkdir()
        reasons = _take_all(models, target, check)
        previous = {m.name: Path(m.path) for m in self.current.sources} if self.current else {}
        kept, failures = [], []
        for m in models.sources:
            copy = target / m.name
            reason = reasons.get(m.name)
            if reason is not None:
                shutil.rmtree(copy, ignore_errors=True)
                if m.name not in previous:
                    failures.append((m.name, reason, False))
                    continue
                try:
                    shutil.copytree(previous[m.name], copy)  # each snapshot holds all of its models
                except OSError as e:
                    failures.append((m.name, f"{reason} (and its previous copy cannot be copied: {e})", False))
                    continue
                failures.append((m.name, reason, True))
            kept.append(ModelSource(m.name, str(copy), m.origin))
        for name, reason in _no_longer_artifacts(self._listed, models, previous).items():
            # still in the models directory, but no artifact now: a deploy that flipped a link to nowhere
            # or to a directory without meta.json is a model that fails to load, not one taken away
            copy = target / name
            try:
                shutil.copytree(previous[name], copy)
            except OSError as e:
                failures.append((name, f"{reason} (and its previous copy cannot be copied: {e})", False))
                continue
            failures.append((name, reason, True))
            kept.append(ModelSource(name, str(copy), next(m.origin for m in self.current.sources if m.name == name)))
            if name == self.current.default and not self.settings.default_model:
                # the default by its place in the listing (the first): it keeps that role with its previous copy
                models = Models(models.sources, name)
                kept.insert(0, kept.pop())
        if (not check and failures) or models.default not in {m.name for m in kept}:
            shutil.rmtree(target, ignore_errors=True)
            raise SnapshotError("; ".join(f"model {name!r}: {reason}" for name, reason, _ in failures)
                                or f"the default model {models.default!r} has no copy")
        self.current = Models(tuple(kept), models.default)
        self._listed = {**{m.name: m.path for m in models.sources},
                        **{name: self._listed[name] for name, _, still in failures if still and name in self._listed}}
        previous_dir, self._current_dir = self._current_dir, target
        for old in self.root.iterdir():  # keep the current and the previous copies
            if old.name.isdigit() and old not in (target, previous_dir):
                shutil.rmtree(old, ignore_errors=True)
        return self.current, failures

    def begin_reload(self) -> None:
        """Workers forked from now on belong to a new reload; SIGTERM then tells older ones to hand over."""
        self.reloads += 1
        write_atomic(self.root / "reloads", str(self.reloads))  # a worker reads the old number or the new

    def forget(self, pid: int) -> None:
        for marker in (self.root / "ready").glob(f"*-{pid}"):
            marker.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------ worker

    def mark_ready(self) -> None:
        (self.root / "ready" / f"{self.reloads}-{os.getpid()}").touch()

    def retired_by_reload(self) -> bool:
        """The master has begun a reload after this worker was forked."""
        try:
            return int((self.root / "reloads").read_text()) > self.reloads
        except (OSError, ValueError):
            return False

    def successor_ready(self) -> bool:
        try:
            return any(int(m.name.partition("-")[0]) > self.reloads for m in (self.root / "ready").iterdir())
        except (OSError, ValueError):
            return False


# ---------------------------------------------------------------- the worker's SIGTERM


def _no_longer_artifacts(listed: dict[str, str], models: Models, previous: dict[str, Path]) -> dict[str, str]:
    """The models served before (`listed`: name -> source) that the new listing left out though their
    entry is still there, with why each is no artifact now."""
    named = {m.name for m in models.sources}
    gone = {}
    for name, source in listed.items():
        path = Path(source)
        if name in named or name not in previous or not os.path.lexists(path):
            continue  # listed again, new, or removed on purpose
        if path.is_symlink() and not path.exists():
            gone[name] = f"{source}: a link to {os.readlink(path)}, which does not exist"
        elif not path.is_dir():
            gone[name] = f"{source}: not a directory"
        else:
            gone[name] = f"{source}: holds no artifact (no meta.json, nor best/meta.json)"
    return gone


def _take_all(models: Models, target: Path, check: bool) -> dict[str, str]:
    """Run `take` for every model at once; returns the reason per model that failed."""
    # The check writes no samples into the workers' metrics directory (it would count as a worker).
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    runs = {}
    for m in models.sources:
        command = [sys.executable, "-m", "service.lifecycle", "take", m.path, str(target / m.name)]
        runs[m.name] = subprocess.Popen(command + (["--check"] if check else []), env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + CHECK_SECONDS
    reasons = {}
    for m in models.sources:
        run = runs[m.name]
        try:
            out, err = run.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            run.kill()
            run.communicate()
            reasons[m.name] = f"{m.path}: loading it took more than {CHECK_SECONDS} s"
            continue
        if run.returncode != 0:
            reasons[m.name] = out.strip() or err.strip()[-2000:] or f"exit status {run.returncode}"
    return reasons


def handle_sigterm(worker, chargen, snapshots: Snapshots | None) -> None:
    """Replace the gthread worker's SIGTERM handler (call from post_worker_init, in the main thread);
    `chargen` is the application's (service/app.py), whose drain() covers every model."""
    exit_handler = signal.getsignal(signal.SIGTERM)  # the worker's own: stop the main loop, finish open requests
    started = threading.Event()

    def drain() -> None:
        chargen.drain()
        # gunicorn >= 24 keeps its listening sockets open until the worker exits, so connections the
        # kernel accepts meanwhile would wait and then be reset; closing them makes new connections
        # fail at once with "connection refused", which a load balancer retries elsewhere. (Older
        # gthread workers close them themselves when they stop.)
        if hasattr(worker, "method_queue"):
            worker.method_queue.defer(_stop_listening, worker)  # runs in the worker's main loop
        exit_handler(signal.SIGTERM, None)

    def handover() -> None:
        deadline = time.monotonic() + worker.cfg.graceful_timeout
        while worker.alive and time.monotonic() < deadline and not snapshots.successor_ready():
            time.sleep(0.1)
        drain()

    def on_sigterm(sig, frame) -> None:
        if started.is_set():  # the master repeats SIGTERM to a worker that outlives a reload's wait
            return
        started.set()
        if snapshots is not None and snapshots.retired_by_reload():
            threading.Thread(target=handover, name="chargen-handover", daemon=True).start()
        else:
            drain()

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.siginterrupt(signal.SIGTERM, False)  # as gunicorn sets it: requests' system calls are not interrupted


def _stop_listening(worker) -> None:
    worker.set_accept_enabled(False)
    for listener in worker.sockets:
        listener.setblocking(False)
        # Take what the kernel has already queued (it would be reset by the close), then close.
        for _ in range(worker.worker_connections):
            before = worker.nr_conns
            try:
                worker.accept(listener)
            except OSError:  # anything but "nothing queued" (which accept() ignores): stop taking
                break
            if worker.nr_conns == before:
                break
        listener.close()
    # The main loop turns accepting back on while the worker is alive and below its connection limit,
    # which the SIGTERM handler's exit may not have ended yet (a reload's handover thread): with the
    # listeners gone from its list, that registers none instead of failing on a closed socket.
    worker.sockets = []


# ---------------------------------------------------------------- python -m service.lifecycle take


def main(argv: list[str]) -> int:
    """take SOURCE TARGET [--check]: copy the artifact at SOURCE (a run directory's best/, symlinks
    followed) to TARGET; with --check, load TARGET with the worker's own code (the scheduler: artifact
    loader, engine, one short generation). Prints the reason on stdout and exits 1 when either fails."""
    if len(argv) not in (3, 4) or argv[0] != "take" or argv[3:] not in ([], ["--check"]):
        print("usage: python -m service.lifecycle take SOURCE TARGET [--check]")
        return 2
    source, target, check = argv[1], Path(argv[2]), argv[3:] == ["--check"]
    from model.records.meta import ArtifactError
    from model.runtime.artifact import resolve

    try:
        found = resolve(source).resolve()
        shutil.copytree(found, target)
    except ArtifactError as e:
        print(e)
        return 1
    except OSError as e:
        print(f"{source}: cannot copy it to {target}: {e}")
        return 1
    if not check:
        return 0

    from service.config import Settings, SettingsError
    from service.scheduler import Scheduler

    try:
        settings = Settings.from_env({**os.environ, "CHARGEN_ARTIFACT": str(target)})
    except SettingsError as e:
        print(e)
        return 1
    scheduler = Scheduler(settings)
    if not scheduler.wait_ready(CHECK_SECONDS):
        # the copy is byte for byte the original: name the original, which is what to fix
        print(f"{source}: {scheduler.failure or 'not loaded in time'}".replace(str(target), str(found)))
        return 1
    scheduler.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
