"""The training run: `train()` prepares the data, builds the network (or resumes the interrupted
run's), fits it with an evaluation every so many steps, and finishes; read it top to bottom.

A run counts optimizer steps. An epoch is as many steps as cover the training text once (each step
a batch of windows at random offsets, model/training/data.py's Windows); the run evaluates every
--eval-every steps (by default once an epoch) and at its end, and stops after --epochs epochs,
--max-steps steps, --max-minutes minutes or --patience evaluations without a better validation loss.
Each evaluation scores a fixed sample of the validation text (--eval-chars; all of it when the
text is that short), so its cost does not grow with the corpus; when the sample was not all of it,
the best model is scored on the whole validation text once at the end.

A run directory holds:
    run.json           the settings and command line the run was started with (model/training/settings.py)
    data/              the corpus as a token file (model/training/data.py; --data puts it elsewhere)
    checkpoint.keras   the model with its optimizer state at the last evaluation
    state.json         step, best validation loss, history (model/training/run_state.py; written after
                       checkpoint.keras)
    best -> artifacts/epoch-NNN (or step-NNNNNNNN)   the artifact with the lowest validation loss so far
    history.json, history.csv, loss.png   every evaluation so far (model/training/history.py; an
                       artifact holds them as of its own)
    tensorboard/       with --tensorboard

Every file is written under a temporary name and renamed, so killing the run at any moment (Ctrl-C,
SIGKILL, power loss) leaves the previous evaluation's files intact, and `--resume` continues from
there, mid-epoch if need be, with the batches the uninterrupted run would have had.
A published artifact is never written to again.

Several devices and processes: model/training/distribute.py. Only process 0 writes the run directory.
The time budget (--max-minutes): model/training/budget.py; what evaluations score and with which
network: model/training/validation.py.

Importing this module does not import Keras: `prepare()` checks settings and corpus first, so the
command line reports a mistake before the backend loads; `train()` imports Keras after that.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
import types
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from model.records.config import Recipe
from model.records.files import replacing, write_atomic
from model.records.meta import ArtifactMeta, CorpusInfo, SplitInfo, TrainingInfo, ValidationInfo, Versions
from model.records.vocab import Vocab
from model.training import artifacts
from model.training.budget import Budget
from model.training.data import (NO_TOKEN_FILE, CorpusError, CorpusScan, Sources, Split, TokenCorpus, Windows, find_sources,
                                 prepared, scan, split_lengths, write_tokens)
from model.training.distribute import Cluster, Placement, PlacementError, before_keras, place
from model.training.evaluate import LN2, Loss
from model.training.history import Evaluation, Sample, history_files
from model.training.network import build_model, count_parameters, trainable_weights
from model.training.recipe import custom_objects, optimizer
from model.training.run_state import STATE_FILE, Best, RunState, Score
from model.training.samples import TEMPERATURES, Novelty, format_samples, samples
from model.training.settings import RESUMABLE, RUN_FILE, TrainingError, TrainSettings, flag, read_run, run_json
from model.training.validation import Scoring, Validation

if TYPE_CHECKING:
    import keras

CHECKPOINT = "checkpoint.keras"


# ---------------------------------------------------------------- the run


def train(settings: TrainSettings, *, cluster: Cluster = Cluster(), resume: bool = False,
          explicit: frozenset[str] | None = None, command: str | None = None, verbose: int | str = "auto") -> Path:
    """Train (or resume) a run; returns the path of the best artifact. Bad settings and corpora are
    reported (TrainingError) before any work starts, and before Keras is imported; `explicit` is as
    in prepare(). --max-minutes counts from this call (see model/training/budget.py). `cluster` says
    which devices and processes take part (model/training/distribute.py).

    verbose="auto" shows Keras' live progress bar with the running loss on a terminal that suits it
    (_bar_fits); elsewhere (a log file, CI, TERM=dumb, NO_COLOR, a narrow window) only the one line
    per evaluation that this function prints, because the bar writes backspaces and colour codes many
    times a second even when stdout is not a terminal."""
    called = time.monotonic()
    if verbose == "auto":
        verbose = 1 if _bar_fits() else 0
    command = command or " ".join(sys.argv)

    with _RunLock() as lock, _sigterm_interrupts():
        # prepare data: every check, the run directory locked (before the processes join: a refusal
        # must not leave the others waiting), then Keras, run.json and the token file
        prep = prepare(settings, resume, explicit, writer=cluster.process_id == 0)
        settings = prep.settings
        if cluster.process_id == 0:
            lock.hold(Path(settings.out))
        placement = _place(cluster, settings.batch_size)
        data = _load_data(prep, placement, command)

        # build or resume
        model, state = _build_or_resume(prep, data, placement)
        started_with, resumed = prep.commands(command)
        run = _Run(settings, data, placement, model, state, Budget(called, settings.max_minutes), verbose,
                   command=started_with, resumed=resumed)
        _describe(run)
        _prepare_evaluations(run)

        # fit with evaluation, then finish
        stop_reason = _fit(run)
        return _finish(run, stop_reason)


def _bar_fits() -> bool:
    """Whether Keras' live bar suits the output: a terminal that can redraw a line in place (not
    TERM=dumb), that asks for no colours (NO_COLOR; the bar writes them) and is wide enough for
    the bar not to wrap (each redraw of a wrapped bar leaves a line behind)."""
    if not sys.stdout.isatty() or os.environ.get("TERM") == "dumb" or os.environ.get("NO_COLOR"):
        return False
    return shutil.get_terminal_size((80, 24)).columns >= MIN_BAR_COLUMNS


FEW_VALIDATION_CHARS = 1_000  # a validation text shorter than this gets a warning
MIN_BAR_COLUMNS = 72  # Keras' bar with its loss and timing is about this wide


# ---------------------------------------------------------------- prepare data


@dataclass
class Prepared:
    """What prepare() found: the settings to run with (a resumed run's own), the corpus files and
    what the first pass learned of them, where its token file goes and whether it is already there,
    and on --resume what the interrupted run left."""

    settings: TrainSettings
    sources: Sources
    corpus: CorpusScan
    data: Path
    reused: str | None  # why the token file in `data` can be reused; None: it must be written
    seconds: float  # reading the files (hashing them, or the first pass)
    resume: bool = False
    state: RunState | None = None  # the interrupted run's state.json, when it has one
    command: str | None = None  # the command line that started the interrupted run

    def commands(self, command: str) -> tuple[str, list[str]]:
        """(the command line that started the run, those of its resumes) with `command` this one's:
        what meta.json records of how the model was made."""
        if not self.resume:
            return command, []
        return self.command or command, [*(self.state.resumed if self.state else []), command]


def prepare(settings: TrainSettings, resume: bool, explicit: frozenset[str] | None = None, *,
            writer: bool = True) -> Prepared:
    """Everything that can fail on bad input, checked before any training starts: the settings, the
    run directory, and every corpus file (read once: model/training/data.py's first pass; nothing written).

    `explicit` names the settings the user gave on the command line: on --resume, one that differs
    from the interrupted run's (other than those in RESUMABLE) is an error rather than ignored, and
    the RESUMABLE ones not named keep the run's values. None (a call from Python) takes the
    RESUMABLE ones from `settings` and the rest from the run. Only the process that writes the run
    directory (`writer`) refuses one that already holds a run (the others may start after it), and
    prints what a corpus directory had that was left out and the control characters found."""
    settings.check()
    out = Path(settings.out)
    state = command = None
    started_on = settings.corpus  # the corpus as the run recorded it
    if resume:
        settings, command, state, started_on = _resumed(settings, out, explicit)
    elif (out / RUN_FILE).exists() and writer:
        raise TrainingError(f"{out} already holds a training run: pass --resume to continue it, or choose another --out")
    elif out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} is a file, not a directory")
    if settings.validation_files and "validation_fraction" in (explicit or ()):
        raise TrainingError("--validation and --validation-files: choose one (held-out files are the validation text)")
    if settings.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise TrainingError("--tensorboard needs the tensorboard package: pip install tensorboard")

    data = Path(settings.data) if settings.data else out / "data"
    if writer:
        for flag_name, path in (("--out", out), ("--data", data)):
            _check_writable(flag_name, path)
    began = time.monotonic()
    try:
        sources, corpus, reused, stale = _read_corpus(settings, data, out)
    except TrainingError as e:
        if resume and settings.corpus == started_on:  # the path as the run recorded it: given relative to elsewhere, or moved
            raise TrainingError(f"{e} (the run's corpus as it was given when the run started: give its path now with --corpus)") from None
        raise
    if writer:
        rewrite = f"the token file in {data} is made again: {stale}" if stale else None  # another run's, say (a shared --data)
        for line in (*sources.skipped, corpus.control_report(), rewrite):
            if line:
                _log(line)
    if state is not None and state.corpus_sha256 != corpus.sha256:
        what = "has changed since the run started" if settings.corpus == started_on else \
            f"is not the corpus the run started on ({' '.join(started_on)})"
        raise TrainingError(f"--resume: {' '.join(settings.corpus)} {what}: its sha256 differs "
                            f"({corpus.sha256[:12]}… against the run's {state.corpus_sha256[:12]}…)")
    _check_split(settings, corpus)
    n_val = split_lengths(corpus, settings.validation_fraction)[1]
    if writer and n_val < FEW_VALIDATION_CHARS:
        _log(f"warning: the validation text has only {n_val:,} characters: its loss, which picks the best model and "
             "stops the run, says little (raise --validation, or hold out more with --validation-files)")
    return Prepared(settings, sources, corpus, data, reused, time.monotonic() - began, resume, state, command)


def _resumed(settings: TrainSettings, out: Path, explicit: frozenset[str] | None
             ) -> tuple[TrainSettings, str | None, RunState | None, list[str]]:
    """--resume: (the interrupted run's settings with the RESUMABLE ones as prepare() says and the
    corpus where it is now, the command that started it, its state.json if it wrote one, the
    corpus as it recorded it)."""
    if not (out / RUN_FILE).exists():
        raise TrainingError(f"--resume: {out} holds no run to resume (no {RUN_FILE}); start one without --resume")
    saved, command = read_run(out / RUN_FILE)
    _refuse_changes(settings, saved, explicit)
    recorded = saved.corpus
    if explicit is not None and "corpus" in explicit:
        # the corpus where it is now (a relative path from another directory, a moved file): the
        # state's sha256 says whether it is the run's
        saved.corpus = settings.corpus
    for name in RESUMABLE:
        if name == "out" or (name in explicit if explicit is not None else name != "data" or settings.data is not None):
            setattr(saved, name, getattr(settings, name))
    state = RunState.read(out / STATE_FILE) if (out / STATE_FILE).exists() else None
    return saved, command, state, recorded


def _check_writable(flag_name: str, path: Path) -> None:
    """That the run can write `path` (made if need be): its nearest existing folder takes a file."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise TrainingError(f"{flag_name} {path}: {probe} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise TrainingError(f"{flag_name} {path}: cannot write in {probe}: {e.strerror or e}") from None


def _refuse_changes(settings: TrainSettings, saved: TrainSettings, explicit: frozenset[str] | None) -> None:
    """--resume: a setting named on the command line, other than RESUMABLE ones, must be the run's."""
    for name in sorted((explicit or set()) - set(RESUMABLE) - {"corpus"}):
        for ours, theirs in ((settings.config, saved.config), (settings.recipe, saved.recipe), (settings, saved)):
            if not hasattr(ours, name):
                continue
            if getattr(ours, name) != getattr(theirs, name):
                raise TrainingError(
                    f"--resume: {flag(name)} {getattr(ours, name)} differs from the run's {getattr(theirs, name)}; "
                    f"a resumed run keeps its settings (only {', '.join(flag(n) for n in RESUMABLE if n != 'out')} "
                    "may change)"
                )
            break


def _read_corpus(settings: TrainSettings, data: Path, out: Path
                 ) -> tuple[Sources, CorpusScan, str | None, str | None]:
    """(the corpus files, what the first pass found in them, why the token file in `data` can be
    reused or None, why a token file there cannot be or None): the token file's own record when it
    matches the files, else a first pass."""
    try:
        sources = find_sources(settings.corpus, include=settings.include, exclude=settings.exclude,
                               validation_files=settings.validation_files, downloads=data, skip=[out],
                               drop_control=settings.drop_control)
        corpus, reused = prepared(data, sources)
        stale = None
        if corpus is None:
            stale = None if reused == NO_TOKEN_FILE else reused
            corpus, reused = scan(sources), None
    except CorpusError as e:
        raise TrainingError(str(e)) from None
    return sources, corpus, reused, stale


def _check_split(settings: TrainSettings, corpus: CorpusScan) -> None:
    if len(corpus.vocabulary) < 2:
        raise TrainingError(f"{corpus.label} has {len(corpus.vocabulary)} distinct character{'' if len(corpus.vocabulary) == 1 else 's'} "
                            f"({corpus.vocabulary!r}): a model needs at least two to choose between")
    n_train, n_val = split_lengths(corpus, settings.validation_fraction)
    if settings.seq_len >= n_train:
        raise TrainingError(
            f"--seq-len {settings.seq_len} is longer than the training part of the corpus ({n_train} characters); "
            "use a shorter --seq-len or a longer corpus"
        )
    if n_val < 2:
        raise TrainingError(f"the validation part of the corpus has only {n_val} characters; raise --validation")


def _place(cluster: Cluster, batch_size: int) -> Placement:
    """The devices and processes the run trains on (model/training/distribute.py); Keras is
    imported from here on."""
    try:
        cluster.check()
    except PlacementError as e:
        raise TrainingError(str(e)) from None
    before_keras(cluster)
    try:
        return place(cluster, batch_size)
    except PlacementError as e:
        raise TrainingError(str(e)) from None


@dataclass
class _Data:
    """The corpus as the run reads it: the token file, its split, the batch of each step."""

    corpus: CorpusScan
    tokens: TokenCorpus
    vocab: Vocab
    split: Split
    windows: Windows
    last_step: int  # the step the run ends at: --epochs or --max-steps
    eval_every: int  # steps

    @property
    def per_epoch(self) -> int:
        return self.windows.steps_per_epoch


def _load_data(prep: Prepared, placement: Placement, command: str) -> _Data:
    """Process 0 writes run.json (a new run's) and the token file, while the others wait; then
    every process reads the token file."""
    settings = prep.settings
    if placement.writer:
        out = Path(settings.out)
        out.mkdir(parents=True, exist_ok=True)
        if not (out / RUN_FILE).exists():
            write_atomic(out / RUN_FILE, run_json(settings, command))
        elif not prep.resume:  # another training wrote it since prepare() looked, and has finished
            raise TrainingError(f"{out} already holds a training run: pass --resume to continue it, or choose another --out")
        _write_tokens(prep)
    else:
        _log(f"process {placement.process_id} of {placement.num_processes}: process 0 writes {settings.out}")
    placement.agree([0.0])  # the others wait for process 0's token file
    if not placement.writer and prepared(prep.data, prep.sources)[0] is None:
        raise TrainingError(f"process {placement.process_id}: cannot read the token file process 0 wrote in {prep.data}; "
                            "every process must see the run directory (shared storage)")
    tokens = TokenCorpus(prep.data, prep.corpus)
    split = tokens.split(settings.validation_fraction)
    windows = Windows(split.train, settings.seq_len, settings.batch_size, settings.seed, read=tokens.windows)
    per_epoch = windows.steps_per_epoch
    last_step = per_epoch * settings.epochs if settings.max_steps is None else min(per_epoch * settings.epochs, settings.max_steps)
    return _Data(prep.corpus, tokens, tokens.vocab, split, windows, last_step, settings.eval_every or per_epoch)


LOCK_FILE = ".lock"  # held (flock) by the process writing the run directory, for as long as it trains


class _RunLock:
    """One training writes a run directory at a time: a second (a new run, or a --resume started
    while one runs) is refused, naming the process that holds it. Held by process 0 from the end of
    prepare() until train() returns or raises (the system drops it when a process dies); a directory
    it made for a run that then failed before run.json was written is removed again."""

    fd: int | None = None
    made: Path | None = None  # the run directory, where hold() created it

    def hold(self, out: Path) -> None:
        if not out.exists():
            out.mkdir(parents=True)
            self.made = out
        try:
            fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # a directory or a dangling link in its place
            raise TrainingError(f"{out / LOCK_FILE}: cannot be used as the run's lock: {e.strerror or e}; "
                                "remove it") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise TrainingError(f"{out} is being written by another training (pid {holder}): wait for it to end, "
                                "or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def __enter__(self) -> _RunLock:
        return self

    def __exit__(self, failed, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None
        if failed is not None and self.made is not None and not (self.made / RUN_FILE).exists():
            (self.made / LOCK_FILE).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.made.rmdir()  # empty again: nothing of the run was written


def _write_tokens(prep: Prepared) -> None:
    """The corpus's token file (model/training/data.py), unless the one there can be reused."""
    corpus = prep.corpus
    if prep.reused is not None:
        _log(f"reusing the token file in {prep.data} ({prep.reused}; checked in {prep.seconds:.1f} s)")
        return
    size = sum(s.size_bytes for s in corpus.sources)
    began = time.monotonic()
    try:
        write_tokens(prep.sources, corpus, prep.data)
    except CorpusError as e:
        raise TrainingError(str(e)) from None
    took = prep.seconds + time.monotonic() - began
    _log(f"prepared {corpus.label}: {size / 1e6:,.1f} MB, {corpus.length:,} characters into "
         f"{prep.data / 'tokens.bin'} in {took:.1f} s ({size / 1e6 / max(took, 1e-9):.0f} MB/s)")


# ---------------------------------------------------------------- build or resume


def _build_or_resume(prep: Prepared, data: _Data, placement: Placement) -> tuple[keras.Model, RunState]:
    """The interrupted run's checkpoint and state, or (a new run, or one killed before its first
    evaluation) a new network and the state before any evaluation."""
    import keras

    settings, out = prep.settings, Path(prep.settings.out)
    keras.utils.set_random_seed(settings.seed)
    state, checkpoint = prep.state, out / CHECKPOINT
    if state is None or not checkpoint.exists():
        model = _new_model(settings, len(data.vocab), data.per_epoch, data.last_step, placement)
        return model, RunState.start(prep.corpus.sha256, [])
    # under the run's policy: Keras wraps the optimizer of a mixed_float16 model for loss scaling
    # only when the model is made with that global policy, and skips the saved optimizer otherwise
    with placement.scope(), _dtype_policy(settings.precision):
        model = keras.saving.load_model(checkpoint, compile=True, safe_mode=True, custom_objects=custom_objects())
    step = _steps(model)
    if state.step == step:
        _set_seed_states(model, state.seed_states)
    state.step = step  # the checkpoint's (a kill can come between writing it and state.json)
    _log(f"resuming {out} after {_position(step, data.per_epoch)} (optimizer step {step})")
    return model, state


def _new_model(settings: TrainSettings, vocab_size: int, steps_per_epoch: int, last_step: int,
               placement: Placement) -> keras.Model:
    """The network with its optimizer, its layers in the --precision policy (the logits float32, as
    Keras advises for mixed precision), its variables distributed as `placement` says."""
    import keras

    with _dtype_policy(settings.precision):
        model = build_model(settings.config, vocab_size, settings.recipe)
        if placement.parallel:  # the initial weights and dropout seeds of the one-device run
            initial, seeds = model.get_weights(), _seed_states(model)
            with placement.scope():
                model = build_model(settings.config, vocab_size, settings.recipe)
                model.set_weights(initial)
                _set_seed_states(model, seeds)
        if settings.precision != "float32":
            model.get_layer("logits").dtype_policy = "float32"
    with placement.scope():
        chosen = optimizer(settings.recipe, lr=settings.lr, lr_decay=settings.lr_decay, clipnorm=settings.clipnorm,
                           steps_per_epoch=steps_per_epoch, last_step=last_step)
        model.compile(optimizer=chosen, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _seed_states(model: keras.Model) -> list[list[int]]:
    """The states of the model's random generators (dropout's), which model.save leaves out: a
    resumed run restores them, so that its dropout masks are the uninterrupted run's."""
    import keras

    return [keras.ops.convert_to_numpy(v).tolist() for v in model.non_trainable_variables
            if v.path.endswith("seed_generator_state")]


def _set_seed_states(model: keras.Model, states: list[list[int]]) -> None:
    variables = [v for v in model.non_trainable_variables if v.path.endswith("seed_generator_state")]
    for variable, value in zip(variables, states, strict=True):
        variable.assign(np.asarray(value, dtype=variable.dtype))


@dataclass
class _Run:
    """What the fit loop reads and changes; `state` is what state.json records of it."""

    settings: TrainSettings
    data: _Data
    placement: Placement
    model: keras.Model
    state: RunState
    budget: Budget
    verbose: int
    command: str  # meta.json's: the command line that started the run
    resumed: list[str]  # meta.json's and state.json's: those of its resumes, this one's last
    validation: Validation | None = None  # these three and the callbacks: _prepare_evaluations
    scoring: Scoring | None = None
    novelty: Novelty | None = None  # the samples' novelty index (process 0, with --sample-chars)
    callbacks: list = field(default_factory=list)

    @property
    def out(self) -> Path:
        return Path(self.settings.out)

    @property
    def writer(self) -> bool:
        return self.placement.writer

    @property
    def title(self) -> str:
        config = self.settings.config
        return f"{self.data.corpus.label}: {config.cell} {config.layers}x{config.units}"


def _describe(run: _Run) -> None:
    import keras

    settings, data, config = run.settings, run.data, run.settings.config
    vocab_size = len(data.vocab)
    _log(f"corpus {data.corpus.label}: {data.corpus.length:,} chars, vocabulary {vocab_size}, "
         f"train {len(data.split.train):,} / validation {len(data.split.validation):,}")
    _log(f"network {config.cell} {config.layers}x{config.units}, embedding {config.embedding}, "
         f"{count_parameters(run.model):,} parameters; backend {keras.backend.backend()}, {run.placement.describe()}"
         + (f", {settings.precision}" if settings.precision != "float32" else ""))
    if settings.recipe != Recipe():
        changed = {k: v for k, v in settings.recipe.to_dict().items() if v != getattr(Recipe(), k)}
        _log("recipe: " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in changed.items()))
    _log(f"untrained loss would be ln {vocab_size} = {math.log(vocab_size):.3f} nats/char "
         f"({math.log2(vocab_size):.3f} bits)")
    _log(f"{data.per_epoch:,} steps of {settings.batch_size} windows of {settings.seq_len} per epoch; "
         f"evaluating every {data.eval_every:,} steps until step {data.last_step:,}")


def _prepare_evaluations(run: _Run) -> None:
    """What each evaluation scores and with which network, the samples' novelty index, the fit()
    callbacks; with --max-minutes, the budget's first estimate of a validation's time."""
    settings, data = run.settings, run.data
    run.validation = Validation(data.split.validation, settings.eval_chars, settings.eval_streams, settings.config.units,
                                data.tokens.release)
    if run.writer and settings.sample_chars:
        run.novelty = Novelty(data.split.train)
        data.tokens.release()
        _log(f"samples after each evaluation at temperatures {', '.join(map(str, TEMPERATURES))}; "
             f"{run.novelty.describe()}")
    run.scoring = Scoring(run.model, settings.config, len(data.vocab), run.placement, settings.precision, settings.recipe)
    if run.budget and run.writer:  # time one network call of the validation (deadline 0: exactly one group)
        probe = time.monotonic()
        run.validation.loss(run.scoring.model(), deadline=0.0)
        scorings = 2 if settings.recipe.ema else 1  # --ema: the average and the raw weights
        run.budget.validated((time.monotonic() - probe) * run.validation.groups * scorings, run.validation.chars,
                             run.validation.chars)
    tensorboard = run.out / "tensorboard" if settings.tensorboard and run.writer else None
    run.callbacks = _callbacks(run.budget, run.placement, run.verbose, tensorboard)


# ---------------------------------------------------------------- fit with evaluation


def _fit(run: _Run) -> str:
    """Train up to each evaluation, evaluate, save; returns why the run stopped."""
    if run.writer:
        _tidy(run.out, run.state.best)
    first_step = run.state.step
    while True:
        stop_reason = _stop_reason(run, first_step)
        if stop_reason:
            return stop_reason
        stretch = _train_stretch(run)
        scores = _validate(run)
        saving = time.monotonic()
        # an interrupt once the evaluation is reported waits for its save: the run keeps what it said
        with _ctrl_c_stops(types.SimpleNamespace(interrupted=False)):
            improved = _record(run, stretch, scores)
            if run.writer:
                _save(run, scores, improved)
                run.budget.saved(time.monotonic() - saving)
        if stretch.partial:
            return "max-minutes"


def _stop_reason(run: _Run, first_step: int) -> str | None:
    """Why the run stops before another stretch of training; None: it goes on."""
    settings, step, stale = run.settings, run.state.step, run.state.evaluations_without_improvement
    if step >= run.data.last_step:
        return "max-steps" if settings.max_steps is not None and step >= settings.max_steps else "epochs"
    if settings.patience and stale >= settings.patience:
        unit = "epochs" if settings.eval_every is None else "evaluations"
        return f"no improvement for {stale} {unit} (patience {settings.patience})"
    # no time left to train before validating and saving (each invocation trains at least one
    # batch, so a tiny --max-minutes still leaves an artifact)
    if run.budget and step > first_step and run.placement.agreed(time.monotonic() >= run.budget.train_until()):
        return "max-minutes"
    return None


@dataclass
class _Stretch:
    """The training between two evaluations."""

    seconds: float
    train_nats: float  # the mean training loss
    partial: bool  # --max-minutes stopped it before the evaluation's step
    chars: int  # characters trained on


def _train_stretch(run: _Run) -> _Stretch:
    """fit() from the run's step to the next evaluation's (or the deadline's)."""
    settings, data, step = run.settings, run.data, run.state.step
    end = min(data.last_step, (step // data.eval_every + 1) * data.eval_every)
    if run.callbacks[1:] and run.verbose:
        run.callbacks[1].header = (f"Epoch {step // data.per_epoch + 1}/{settings.epochs}" if settings.eval_every is None
                                   else f"Steps {step + 1:,}-{end:,} of {data.last_step:,}")
    started = time.monotonic()
    deadline = run.callbacks[0]
    deadline.hit = False
    interval = step // data.eval_every
    with run.placement.scope(), _ctrl_c_stops(deadline):
        fit = run.model.fit(
            _batches(data.windows, step, end - step, run.placement.rows(settings.batch_size)),
            epochs=interval + 1, initial_epoch=interval, shuffle=False, verbose=run.verbose, callbacks=run.callbacks,
        )
    seconds = time.monotonic() - started
    done = _steps(run.model) - step
    run.state.step += done
    return _Stretch(seconds, float(fit.history["loss"][-1]), deadline.hit, done * settings.batch_size * settings.seq_len)


class Terminated(KeyboardInterrupt):
    """SIGTERM (docker stop, Kubernetes, a supervisor) during training: raised where Ctrl-C's
    KeyboardInterrupt would be, so the run stops as it does (what it saved stays)."""


def _terminated(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM interrupts the run as Ctrl-C does (where nothing else has claimed it: a program that
    calls train() with its own handler keeps it)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _ctrl_c_stops(deadline):
    """Ctrl-C (or SIGTERM) during fit() stops it at the end of the batch and interrupts the run once
    fit() has returned: a KeyboardInterrupt raised in the middle of TensorFlow's ops could abort the
    process (glibc's "malloc_consolidate(): invalid chunk size"). A second one interrupts at once.
    Around an evaluation's report and save too, so that the run keeps the evaluation it reported."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    deferred = [sig for sig, handler in previous.items() if handler not in (signal.SIG_IGN, signal.SIG_DFL, None)]
    stopped_by = []

    def stop(signum, frame):
        deadline.interrupted = True
        stopped_by.append(signum)
        signal.signal(signum, previous[signum])

    for sig in deferred:
        signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig in deferred:
            signal.signal(sig, previous[sig])
    if deadline.interrupted:
        raise Terminated if stopped_by[:1] == [signal.SIGTERM] else KeyboardInterrupt


@dataclass
class _Scores:
    """An evaluation's validation loss. Process 0 scores, and has the network it scored and, under
    --ema, both scores; every process has the loss process 0 found (`nats`: as the processes
    agreed on it)."""

    loss: Loss  # the one kept
    nats: float
    network: keras.Model | None = None  # what the artifact saves and the samples come from
    weights: str | None = None  # --ema: "average" or "raw", the one kept
    average: Loss | None = None
    raw: Loss | None = None


def _validate(run: _Run) -> _Scores:
    scores = _score(run) if run.writer else None
    nats, chars = run.placement.agree([scores.loss.nats, scores.loss.chars] if scores else [0.0, 0.0])
    if scores is None:
        return _Scores(Loss(nats, int(chars)), nats)
    scores.nats = nats
    return scores


def _score(run: _Run) -> _Scores:
    """Process 0's validation: under --ema the raw weights, then the average, keeping the better."""
    validating = time.monotonic()
    validation, scoring, budget = run.validation, run.scoring, run.budget
    # the first evaluation always completes (see Budget): a run's artifact has a whole score
    deadline = budget.validate_until() if budget and run.state.best is not None else None
    raw = None
    network = scoring.raw()
    if network is not None:  # --ema: the raw weights, then the average; the better one is kept
        raw = validation.loss(network, deadline=deadline)
    network = scoring.model()
    loss = average = validation.loss(network, deadline=deadline)
    weights = "average" if raw is not None else None
    # a complete score before one --max-minutes cut short, then the lower loss
    if raw is not None and (raw.chars == validation.chars, -raw.nats) > (loss.chars == validation.chars, -loss.nats):
        network, loss, weights = scoring.raw(), raw, "raw"
    scorings = [average] if raw is None else [average, raw]
    budget.validated(time.monotonic() - validating, sum(x.chars for x in scorings), validation.chars * len(scorings))
    return _Scores(loss, loss.nats, network, weights, average, raw)


def _record(run: _Run, stretch: _Stretch, scores: _Scores) -> bool:
    """The evaluation in the history and the log; the best so far and the patience count in the
    state. Returns whether it is the new best."""
    state = run.state
    complete = scores.loss.chars == run.validation.chars
    state.training_seconds += stretch.seconds
    state.chars_trained += stretch.chars
    state.epoch = _epochs(state.step, run.data.per_epoch)
    state.add(_row(run, stretch, scores, complete))
    # a partial score is of other characters than the whole ones: it can neither be the best nor the validation loss
    improved = complete and (state.best is None or scores.nats < state.best.val_nats)
    _report(run, stretch, scores, improved)
    if improved:
        state.best = Best(step=state.step, epoch=state.epoch, val_nats=scores.nats, artifact=_artifact_name(run))
        state.evaluations_without_improvement = 0
    elif complete:
        state.evaluations_without_improvement += 1
    return improved


def _row(run: _Run, stretch: _Stretch, scores: _Scores, complete: bool) -> Evaluation:
    import keras

    loss = scores.loss
    row = Evaluation(
        epoch=run.state.epoch,
        step=run.state.step,
        train_nats_per_char=round(stretch.train_nats, 5),
        train_bits_per_char=round(stretch.train_nats / LN2, 5),
        val_nats_per_char=round(loss.nats, 5),
        val_bits_per_char=round(loss.bits, 5),
        val_chars_scored=loss.chars,
        val_partial=not complete,
        learning_rate=float(keras.ops.convert_to_numpy(run.model.optimizer.learning_rate)),
        seconds=round(stretch.seconds, 2),
        chars_per_second=round(stretch.chars / stretch.seconds),
        partial=stretch.partial,
    )
    if scores.weights is not None:
        row.weights = scores.weights
        row.val_average_nats_per_char = round(scores.average.nats, 5)
        row.val_raw_nats_per_char = round(scores.raw.nats, 5)
    if run.novelty is not None:
        rows = samples(scores.network, run.data.vocab, length=run.settings.sample_chars, novelty=run.novelty)
        row.samples = [Sample(**r) for r in rows]
    return row


def _report(run: _Run, stretch: _Stretch, scores: _Scores, improved: bool) -> None:
    """The evaluation's line (and its samples) in the log."""
    loss, validation, row = scores.loss, run.validation, run.state.history[-1]
    mark = "  (best so far)" if improved else ""
    cut = "" if not row.val_partial else (f" (cut short by --max-minutes: the first {loss.chars:,} of "
                                         f"{validation.chars:,} characters, not comparable; the best stays as it was)")
    sample = "" if validation.whole else " on the sample"
    other = "" if scores.weights is None else (
        f" (the average; raw weights {scores.raw.nats:.4f})" if scores.weights == "average"
        else f" (the raw weights; average {scores.average.nats:.4f})")
    train_nats = stretch.train_nats
    _log(
        f"{_position(run.state.step, run.data.per_epoch)}: train {train_nats:.4f} nats/char ({train_nats / LN2:.4f} bits), "
        f"validation{sample} {loss.nats:.4f} nats/char ({loss.bits:.4f} bits){other}{cut}{mark}; {stretch.seconds:.0f} s"
    )
    if row.samples is not None:
        _log(format_samples([asdict(s) for s in row.samples]))


def _artifact_name(run: _Run) -> str:
    step, per_epoch = run.state.step, run.data.per_epoch
    if run.settings.eval_every is None and step % per_epoch == 0:
        return f"artifacts/epoch-{step // per_epoch:03d}"
    return f"artifacts/step-{step:08d}"


def _save(run: _Run, scores: _Scores, improved: bool) -> None:
    """Process 0's files of an evaluation: a new best's artifact (with the history as of this
    evaluation), the checkpoint, state.json, then the run's history files."""
    out, state = run.out, run.state
    files = history_files(state.history, run.title)
    if improved:
        artifacts.save(out / state.best.artifact, scores.network, run.data.vocab, _artifact_meta(run, scores.loss),
                       extra_files=files, int8_text=(run.data.split.validation, "the artifact's validation text"))
        artifacts.point(out / "best", out / state.best.artifact)
    _save_model_atomic(run.model, out / CHECKPOINT)
    state.seed_states, state.resumed = _seed_states(run.model), run.resumed
    _write_state(out, state)
    _tidy(out, state.best)  # the previous best goes only now that state.json no longer names it
    for file_name, data in files.items():
        write_atomic(out / file_name, data)


def _artifact_meta(run: _Run, loss: Loss) -> ArtifactMeta:
    settings, state, split = run.settings, run.state, run.data.split
    epochs = math.ceil(state.step / run.data.per_epoch)  # begun
    return ArtifactMeta(
        config=settings.config,
        parameters=count_parameters(run.model),
        corpus=CorpusInfo(**run.data.corpus.describe()),
        split=SplitInfo(validation_fraction=round(split.validation_fraction, 6),
                        train_chars=int(len(split.train)), validation_chars=int(len(split.validation))),
        validation=ValidationInfo(epoch=epochs, **loss.to_dict(), sample=not run.validation.whole),
        training=TrainingInfo(
            epochs=epochs, seconds=round(state.training_seconds, 1),
            chars_per_second=round(state.chars_trained / state.training_seconds) if state.training_seconds else None,
            seq_len=settings.seq_len, batch_size=settings.batch_size, lr=settings.lr, lr_decay=settings.lr_decay,
            clipnorm=settings.clipnorm, seed=settings.seed, recipe=settings.recipe,
        ),
        versions=versions(),
        command=run.command,
        resumed=run.resumed,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        vocab_size=len(run.data.vocab),
    )


def _write_state(out: Path, state: RunState) -> None:
    """state.json: the one place it is written (after the checkpoint it describes)."""
    write_atomic(out / STATE_FILE, state.to_json())


# ---------------------------------------------------------------- finish


def _finish(run: _Run, stop_reason: str) -> Path:
    best, per_epoch = run.state.best, run.data.per_epoch
    if best is None:
        raise TrainingError("no evaluation completed; nothing to save")
    if run.writer and not run.validation.whole and best.whole_validation is None:
        _score_whole(run)
    run.placement.agree([0.0])  # the others wait for process 0's last files
    _log(
        f"stopped ({stop_reason}) after {_position(run.state.step, per_epoch)}: best validation {best.val_nats:.4f} "
        f"nats/char ({best.val_nats / LN2:.4f} bits) at {_position(best.step, per_epoch)}; artifact {run.out / 'best'}"
    )
    if run.writer:  # which graph serves it: the int8 graph's figures against float32's, or why it has none
        meta = ArtifactMeta.from_json((run.out / "best" / "meta.json").read_text(encoding="utf-8"), "best/meta.json")
        if meta.int8 is not None:
            _log(f"int8 graph: {meta.int8.verdict()}")
    return run.out / "best"


def _score_whole(run: _Run) -> None:
    """Evaluations scored a sample of the validation text: score the best model on all of it, once,
    within what is left of the budget, and record it in state.json (the artifact is not rewritten)."""
    settings, best = run.settings, run.state.best
    if run.budget and time.monotonic() >= run.budget.validate_until():
        _log("whole validation text: --max-minutes ran out before it could be scored; not recorded (--resume scores it)")
        return
    # the best artifact's weights: an earlier evaluation's, or this one's (under --ema the average
    # or the raw weights, whichever it kept)
    weights = trainable_weights(artifacts.load_keras(run.out / best.artifact).model)
    whole = Validation(run.data.split.validation, None, settings.eval_streams, settings.config.units,
                       run.data.tokens.release)
    _log(f"scoring the best model ({best.artifact}) on the whole validation text, {whole.chars:,} characters ...")
    began = time.monotonic()
    loss = whole.loss(run.scoring.model(weights), deadline=run.budget.validate_until() if run.budget else None)
    if loss.chars < whole.chars:  # a prefix's loss is no score of the whole text: not recorded
        _log(f"whole validation text: --max-minutes ran out after {loss.chars:,} of {whole.chars:,} characters; "
             "not recorded (--resume scores it)")
        return
    _log(f"whole validation text, {loss.chars:,} characters: {loss.nats:.4f} nats/char ({loss.bits:.4f} bits) for the "
         f"best model ({best.artifact}); {time.monotonic() - began:.0f} s")
    best.whole_validation = Score(**loss.to_dict())
    _write_state(run.out, run.state)


# ---------------------------------------------------------------- helpers


def _save_model_atomic(model: keras.Model, path: Path) -> None:
    with replacing(path) as tmp:  # Keras's own save, under a temporary name that keeps the .keras suffix
        model.save(tmp)


def versions() -> Versions:
    import keras

    backend = keras.backend.backend()
    try:
        backend_version = __import__({"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}.get(backend, backend)).__version__
    except Exception:
        backend_version = "unknown"
    return Versions(keras=keras.__version__, backend=backend, backend_version=backend_version,
                    numpy=np.__version__, python=platform.python_version())


def _callbacks(budget: Budget, placement: Placement, verbose: int, tensorboard: Path | None) -> list:
    """The fit() callbacks; defined here, with Keras imported, so that importing this module does not
    import Keras. The first stops training at the budget's training deadline (every process at the
    same step: process 0's clock decides), the second, when shown, is Keras' progress bar."""
    import keras

    class Deadline(keras.callbacks.Callback):
        AGREE_EVERY = 16  # steps between the processes' agreements, each a small collective

        def __init__(self):
            super().__init__()
            self.hit = False
            self.interrupted = False  # Ctrl-C during fit(): see _ctrl_c_stops

        def on_train_batch_end(self, batch, logs=None):
            if self.interrupted:
                self.model.stop_training = True
                return
            if not budget:
                return
            over = time.monotonic() > budget.train_until()
            if placement.num_processes > 1:
                if batch % self.AGREE_EVERY:
                    return
                over = placement.agreed(over)
            if over:
                self.hit = True
                self.model.stop_training = True

    class ProgressBar(keras.callbacks.ProgbarLogger):
        """Keras' live bar, under a header of the run's own (each fit() call covers the steps up to
        the next evaluation, so Keras alone would print "Epoch 1/1" every time)."""

        header = ""

        def on_epoch_begin(self, epoch, logs=None):
            # only the public interface: Keras' own helpers for this have moved between versions
            if self.verbose:
                print(self.header, flush=True)
            self.epochs = 1  # Keras' "Epoch i/n" line would count fit() calls, not the run's epochs
            super().on_epoch_begin(epoch, logs)

    callbacks = [Deadline()] + ([ProgressBar()] if verbose else [])
    if tensorboard is not None:
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(tensorboard)))
    return callbacks


def _batches(windows: Windows, first: int, count: int, rows: slice):
    """The batches of steps first .. first + count - 1 (this process's rows of them), as Keras
    reads data: a PyDataset, each batch made when it is asked for."""
    import keras

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return count

        def __getitem__(self, i):
            return windows.batch(first + i, rows)

    return Batches(workers=1, use_multiprocessing=False)


def _tidy(out: Path, best: Best | None) -> None:
    """Make the run directory agree with state.json: `best` points to the artifact it records, and
    artifacts or temporary files that a killed run left behind are removed."""
    for tmp in [*out.glob(".*.tmp*"), *out.glob(".tmp-*"), *(out / "artifacts").glob(".*.tmp-*")]:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    keep = best.artifact if best else None
    for old in [*(out / "artifacts").glob("epoch-*"), *(out / "artifacts").glob("step-*")]:
        if old.relative_to(out).as_posix() != keep:
            shutil.rmtree(old, ignore_errors=True)
    link = out / "best"
    if keep is None:
        if link.is_symlink():
            link.unlink()
    elif not link.is_symlink() or os.readlink(link) != os.path.relpath(out / keep, out):
        artifacts.point(link, out / keep)


def _steps(model: keras.Model) -> int:
    import keras

    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


def _epochs(step: int, steps_per_epoch: int) -> int | float:
    """Epochs trained after `step` steps: a whole number at an epoch's end."""
    whole, part = divmod(step, steps_per_epoch)
    return whole if part == 0 else round(step / steps_per_epoch, 4)


def _position(step: int, steps_per_epoch: int) -> str:
    epochs = _epochs(step, steps_per_epoch)
    return f"epoch {epochs}" if isinstance(epochs, int) else f"step {step:,} (epoch {epochs:.2f})"


@contextlib.contextmanager
def _dtype_policy(name: str):
    """Layers built inside take `name` as their dtype policy (--precision); nothing else does, so
    the networks an artifact and the evaluations build are float32 whatever the training used."""
    import keras

    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(before)


def _log(msg: str) -> None:
    print(msg, flush=True)
