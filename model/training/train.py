"""The training run: batches, optimizer, validation, checkpoints, resume, history.

A run counts optimizer steps. An epoch is as many steps as cover the training text once (each step
a batch of windows at random offsets, model/training/data.py's Windows); the run evaluates every
--eval-every steps (by default once an epoch) and at its end, and stops after --epochs epochs,
--max-steps steps, --max-minutes minutes or --patience evaluations without a better validation loss.
Each evaluation scores a fixed sample of the validation text (--eval-chars; all of it when the
text is that short), so its cost does not grow with the corpus; when the sample was not all of it,
the best model is scored on the whole validation text once at the end.

A run directory holds:
    run.json           the settings and command line the run was started with
    data/              the corpus as a token file (model/training/data.py; --data puts it elsewhere)
    checkpoint.keras   the model with its optimizer state at the last evaluation
    state.json         step, best validation loss, history (written after checkpoint.keras)
    best -> artifacts/epoch-NNN (or step-NNNNNNNN)   the artifact with the lowest validation loss so far
    history.json, history.csv, loss.png   every evaluation so far (an artifact holds them as of its own)
    tensorboard/       with --tensorboard

Every file is written under a temporary name and renamed, so killing the run at any moment (Ctrl-C,
SIGKILL, power loss) leaves the previous evaluation's files intact, and `--resume` continues from
there, mid-epoch if need be, with the batches the uninterrupted run would have had.
A published artifact is never written to again.

Several devices and processes: model/training/distribute.py. Only process 0 writes the run directory.

Importing this module does not import Keras: `prepare()` checks settings and corpus first, so the
command line reports a mistake before the backend loads; `train()` imports Keras after that.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from model.training import artifacts
from model.records.meta import ArtifactMeta, CorpusInfo, SplitInfo, TrainingInfo, ValidationInfo, Versions
from model.training.data import (CorpusError, CorpusScan, Sources, TokenCorpus, Windows, find_sources, prepared,
                        sample_pieces, sample_text, scan, split_lengths, write_tokens)
from model.training.distribute import Cluster, Placement, PlacementError, before_keras, place
from model.training.evaluate import LN2, Loss, StreamScorer
from model.records.config import ModelConfig
from model.training.network import build_model, copy_weights, count_parameters, trainable_weights
from model.records.config import Recipe
from model.training.recipe import averaged_weights, custom_objects, optimizer
from model.training.samples import TEMPERATURES, Novelty, format_samples, samples

if TYPE_CHECKING:
    import keras

RUN_FILE, STATE_FILE, CHECKPOINT = "run.json", "state.json", "checkpoint.keras"
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
DEFAULT_EVAL_CHARS = 1_000_000
SAMPLES_KEPT = 100  # evaluations whose samples the history keeps (the last ones)


class TrainingError(ValueError):
    """Settings or run directories that cannot be used; raised before any work starts."""


@dataclass
class TrainSettings:
    corpus: list[str]  # files, directories, names of known corpora (model/training/data.py's find_sources)
    out: str
    config: ModelConfig = field(default_factory=ModelConfig)
    recipe: Recipe = field(default_factory=Recipe)  # training-time regularisation and optimisation
    seq_len: int = 100
    batch_size: int = 64  # the global batch, split over the devices
    lr: float = 2e-3
    lr_decay: float = 0.95  # multiplied in once per epoch, smoothly (exponential decay by step)
    clipnorm: float = 5.0  # global gradient norm; 0 turns clipping off
    epochs: int = 30
    max_steps: int | None = None
    max_minutes: float | None = None
    patience: int = 5  # evaluations without a better validation loss before stopping; 0 = never stop early
    validation_fraction: float = 0.1
    validation_files: list[str] = field(default_factory=list)  # globs: whole files held out instead
    include: list[str] = field(default_factory=list)  # globs choosing the files of a directory
    exclude: list[str] = field(default_factory=list)
    drop_control: bool = False  # leave the control characters and U+FFFD out (model/training/data.py's CONTROL_CHARACTERS)
    data: str | None = None  # the token file's directory; None: OUT/data
    eval_every: int | None = None  # steps between evaluations; None: once an epoch
    eval_chars: int | None = DEFAULT_EVAL_CHARS  # validation characters an evaluation scores; None: all
    precision: str = "float32"
    seed: int = 1234
    tensorboard: bool = False
    eval_streams: int = 64
    sample_chars: int = 200  # characters sampled at each of three temperatures after an evaluation; 0: none

    def __post_init__(self):
        if isinstance(self.corpus, (str, os.PathLike)):
            self.corpus = [self.corpus]
        self.corpus = [str(c) for c in self.corpus]
        for name in ("validation_files", "include", "exclude"):
            setattr(self, name, list(getattr(self, name)))

    def check(self) -> None:
        def positive_int(name, value, minimum=1, optional=False):
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise TrainingError(f"--{name.replace('_', '-')} must be a whole number >= {minimum}, got {value!r}")

        positive_int("seq_len", self.seq_len)
        positive_int("batch_size", self.batch_size)
        positive_int("epochs", self.epochs)
        positive_int("max_steps", self.max_steps, optional=True)
        positive_int("eval_every", self.eval_every, optional=True)
        positive_int("eval_chars", self.eval_chars, minimum=2, optional=True)
        positive_int("patience", self.patience, minimum=0)
        positive_int("eval_streams", self.eval_streams)
        positive_int("sample_chars", self.sample_chars, minimum=0)
        if self.sample_chars > 2_000:
            raise TrainingError(f"--sample-chars must be at most 2000, got {self.sample_chars}")
        positive_int("seed", self.seed, minimum=0)
        if self.seed >= 2**32:  # NumPy's legacy seeding, which Keras uses, takes 32 bits
            raise TrainingError(f"--seed must be below 2**32, got {self.seed}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainingError(f"--lr must be a positive number, got {self.lr}")
        if not 0 < self.lr_decay <= 1:
            raise TrainingError(f"--lr-decay must be in (0, 1], got {self.lr_decay}")
        if not (self.clipnorm >= 0 and math.isfinite(self.clipnorm)):
            raise TrainingError(f"--clipnorm must be >= 0 (0 turns clipping off), got {self.clipnorm}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise TrainingError(f"--max-minutes must be positive, got {self.max_minutes}")
        if not 0 < self.validation_fraction <= 0.5:
            raise TrainingError(f"--validation must be in (0, 0.5], got {self.validation_fraction}")
        try:
            self.recipe.check()
        except ValueError as e:
            raise TrainingError(str(e)) from None
        if self.precision not in PRECISIONS:
            raise TrainingError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["config"] = self.config.to_dict()
        d["recipe"] = self.recipe.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainSettings":
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["config"] = ModelConfig.from_dict(d["config"])
        d["recipe"] = Recipe.from_dict(d.get("recipe"))
        return cls(**d)


# Settings a resumed run may change; the rest must match the interrupted run.
RESUMABLE = ("epochs", "max_steps", "max_minutes", "patience", "eval_every", "tensorboard", "data", "out", "sample_chars")


def _flag(name: str) -> str:
    return "--validation" if name == "validation_fraction" else "--" + name.replace("_", "-")


def _write_atomic(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_model_atomic(model: keras.Model, path: Path) -> None:
    tmp = path.with_name(f".tmp-{path.name}")  # Keras insists on the .keras suffix
    model.save(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def versions() -> Versions:
    import keras

    backend = keras.backend.backend()
    try:
        backend_version = __import__({"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}.get(backend, backend)).__version__
    except Exception:
        backend_version = "unknown"
    return Versions(keras=keras.__version__, backend=backend, backend_version=backend_version,
                    numpy=np.__version__, python=platform.python_version())


class _Budget:
    """--max-minutes covers everything the run does, from train() being called to its return:
    preparing the corpus, training, validating and saving. (Without it, every deadline is
    infinitely far away.)

    After each stretch of training come an evaluation and its saving, so training stops early
    enough for both to fit: the stretch is cut short, rather than the evaluation, because
    validation losses are compared with each other (the best artifact, early stopping) and stay
    comparable only on the same characters. Validation is estimated before the first stretch by
    timing one group of streams on the untrained network, then measured; saving is guessed, then
    measured. An evaluation that the deadline still cuts short (a misestimate) scored only a prefix
    of the text: it is recorded as partial and never chosen as the best. The first evaluation is
    never cut short, so every run leaves an artifact: when validating alone takes longer than the
    budget (a huge --eval-chars), the run trains one batch and overruns by that evaluation."""

    SAVING_GUESS = 2.0  # seconds, until an evaluation's saving has been measured

    def __init__(self, started: float, minutes: float | None):
        self.total = 60.0 * minutes if minutes else math.inf
        self.end = started + self.total
        self.validation = 0.0  # seconds a whole validation takes
        self.saving: float | None = None

    def __bool__(self) -> bool:
        return math.isfinite(self.total)

    def _saving(self) -> float:
        return self.SAVING_GUESS if self.saving is None else self.saving

    def train_until(self) -> float:
        return self.end - self._saving() - self.validation

    def validate_until(self) -> float:
        return self.end - self._saving()

    def validated(self, seconds: float, scored: int, whole: int) -> None:
        self.validation = seconds * whole / scored

    def saved(self, seconds: float) -> None:
        self.saving = seconds if self.saving is None else max(self.saving, seconds)


class _Validation:
    """The text each evaluation scores and how. Short validation texts (at most --eval-chars) are
    scored whole, as `chargen evaluate` scores a text; longer ones through a fixed sample: pieces
    at evenly spaced offsets, each one stream (model/training/data.py's sample_text), the same characters
    at every evaluation. A long text is scored in segments, giving the memory map's pages back
    between them, so scoring all of it does not make the process grow with it; and a network call
    takes as many streams as keep its activations within CALL_BYTES (64 streams of 4,096
    characters through a 256-unit LSTM would need a gigabyte)."""

    SEGMENT = 2**20  # characters
    CALL_BYTES = 2**28  # streams x length x 4 x units float32 gate activations in one network call

    def __init__(self, ids: np.ndarray, eval_chars: int | None, n_streams: int, units: int, release=lambda: None):
        self.whole = eval_chars is None or eval_chars >= len(ids)
        if self.whole:
            self.text, self.scorer = ids, StreamScorer(n_streams=n_streams)
        else:
            pieces, length = sample_pieces(eval_chars, n_streams)
            self.text, self.scorer = sample_text(ids, pieces, length), StreamScorer(n_streams=pieces, max_len=length)
        count = max(1, round(len(self.text) / self.SEGMENT))
        bounds = np.linspace(0, len(self.text), count + 1).astype(int)
        self.segments = list(zip(bounds[:-1], bounds[1:]))
        length = self.scorer.rows(self.text[: bounds[1]]).shape[1]
        self.scorer.batch = max(1, min(self.scorer.batch, self.CALL_BYTES // (length * 16 * units)))
        self.chars = sum(self.scorer.scored(self.text[a:b]) for a, b in self.segments)  # predictions when whole
        self.groups = sum(self.scorer.groups(self.text[a:b]) for a, b in self.segments)
        self.release = release
        release()  # the pages a sample was copied from

    def loss(self, model: keras.Model, deadline: float | None = None) -> Loss:
        """The loss on the text, or on a prefix of it when `deadline` comes first (always at least one group)."""
        total, count = 0.0, 0
        for a, b in self.segments:
            if deadline is not None and count and time.monotonic() >= deadline:
                break
            part = self.scorer.loss(model, self.text[a:b], deadline=deadline)
            self.release()
            total += part.nats * part.chars
            count += part.chars
            if part.chars < self.scorer.scored(self.text[a:b]):  # the deadline cut it short
                break
        return Loss(total / count, count)


def _callbacks(budget: _Budget, placement: Placement, verbose: int, tensorboard: Path | None) -> list:
    """The fit() callbacks; defined here, with Keras imported, so that importing this module does not
    import Keras. The first stops training at the budget's training deadline (every process at the
    same step: process 0's clock decides), the second, when shown, is Keras' progress bar."""
    import keras

    class Deadline(keras.callbacks.Callback):
        AGREE_EVERY = 16  # steps between the processes' agreements, each a small collective

        def __init__(self):
            super().__init__()
            self.hit = False

        def on_train_batch_end(self, batch, logs=None):
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


def _history_files(history: list[dict], title: str) -> dict[str, bytes]:
    """history.json, history.csv and loss.png of the evaluations so far: for the run directory,
    and for an artifact saved at this evaluation."""
    buf = io.StringIO()
    if history:  # rows of a run resumed from an older chargen may lack the newer columns
        columns = dict.fromkeys(k for row in history for k in row if k != "samples")  # samples: history.json only
        writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    return {"history.json": json.dumps(history, indent=1).encode(), "history.csv": buf.getvalue().encode(),
            "loss.png": plot_history(history, title)}  # drawn once: on tiny corpora plotting costs more than an epoch


def plot_history(history: list[dict], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=100)
    fig.subplots_adjust(left=0.1, right=0.97, top=0.92, bottom=0.12)  # bbox_inches="tight" would draw twice
    ax = fig.subplots()
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_bits_per_char"] for h in history], "o-", label="train")
    whole = [h for h in history if not h.get("val_partial")]  # a partial evaluation's prefix would draw a false dip
    ax.plot([h["epoch"] for h in whole], [h["val_bits_per_char"] for h in whole], "o-", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("bits per character")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _tidy(out: Path, best: dict | None) -> None:
    """Make the run directory agree with state.json: `best` points to the artifact it records, and
    artifacts or temporary files that a killed run left behind are removed."""
    for tmp in [*out.glob(".*.tmp*"), *out.glob(".tmp-*"), *(out / "artifacts").glob(".*.tmp-*")]:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    keep = best["artifact"] if best else None
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


# ---------------------------------------------------------------- the run


@dataclass
class Prepared:
    """What prepare() found: the settings to run with (a resumed run's own), the corpus files and
    what the first pass learned of them, where its token file goes and whether it is already there."""

    settings: TrainSettings
    sources: Sources
    corpus: CorpusScan
    data: Path
    reused: str | None  # why the token file in `data` can be reused; None: it must be written
    state: dict
    seconds: float  # reading the files (hashing them, or the first pass)


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
    state = {}
    if resume:
        if not (out / RUN_FILE).exists():
            raise TrainingError(f"--resume: {out} holds no run to resume (no {RUN_FILE}); start one without --resume")
        saved = TrainSettings.from_dict(json.loads((out / RUN_FILE).read_text()))
        for name in sorted((explicit or set()) - set(RESUMABLE) - {"corpus"}):
            if hasattr(settings.config, name):
                ours, theirs = getattr(settings.config, name), getattr(saved.config, name)
            elif hasattr(settings.recipe, name):
                ours, theirs = getattr(settings.recipe, name), getattr(saved.recipe, name)
            elif hasattr(settings, name):
                ours, theirs = getattr(settings, name), getattr(saved, name)
            else:
                continue
            if ours != theirs:
                raise TrainingError(
                    f"--resume: {_flag(name)} {ours} differs from the run's {theirs}; a resumed run keeps its "
                    f"settings (only {', '.join(_flag(n) for n in RESUMABLE if n != 'out')} may change)"
                )
        for name in RESUMABLE:
            if name == "out" or (name in explicit if explicit is not None else name != "data" or settings.data is not None):
                setattr(saved, name, getattr(settings, name))
        settings = saved
        if (out / STATE_FILE).exists():
            state = json.loads((out / STATE_FILE).read_text())
    elif (out / RUN_FILE).exists() and writer:
        raise TrainingError(f"{out} already holds a training run: pass --resume to continue it, or choose another --out")
    elif out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} is a file, not a directory")
    if settings.validation_files and "validation_fraction" in (explicit or ()):
        raise TrainingError("--validation and --validation-files: choose one (held-out files are the validation text)")

    if settings.tensorboard:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise TrainingError("--tensorboard needs the tensorboard package: pip install tensorboard")

    data = Path(settings.data) if settings.data else out / "data"
    began = time.monotonic()
    try:
        sources = find_sources(settings.corpus, include=settings.include, exclude=settings.exclude,
                               validation_files=settings.validation_files, downloads=data, skip=[out],
                               drop_control=settings.drop_control)
        corpus, reused = prepared(data, sources)
        if corpus is None:
            corpus, reused = scan(sources), None
    except CorpusError as e:
        raise TrainingError(str(e)) from None
    if writer:
        for line in (*sources.skipped, corpus.control_report()):
            if line:
                _log(line)
    if resume and state and state.get("corpus_sha256") not in (None, corpus.sha256):
        raise TrainingError(f"--resume: {' '.join(settings.corpus)} has changed since the run started (sha256 differs)")
    n_train, n_val = split_lengths(corpus, settings.validation_fraction)
    if settings.seq_len >= n_train:
        raise TrainingError(
            f"--seq-len {settings.seq_len} is longer than the training part of the corpus ({n_train} characters); "
            "use a shorter --seq-len or a longer corpus"
        )
    if n_val < 2:
        raise TrainingError(f"the validation part of the corpus has only {n_val} characters; raise --validation")
    return Prepared(settings, sources, corpus, data, reused, state, time.monotonic() - began)


def train(settings: TrainSettings, *, cluster: Cluster = Cluster(), resume: bool = False,
          explicit: frozenset[str] | None = None, command: str | None = None, verbose: int | str = "auto") -> Path:
    """Train (or resume) a run; returns the path of the best artifact. Bad settings and corpora are
    reported (TrainingError) before any work starts, and before Keras is imported; `explicit` is as
    in prepare(). --max-minutes counts from this call (see _Budget). `cluster` says which devices
    and processes take part (model/training/distribute.py).

    verbose="auto" shows Keras' live progress bar with the running loss on a terminal; elsewhere (a
    log file, CI) only the one line per evaluation that this function prints, because the bar
    writes backspaces and colour codes many times a second even when stdout is not a terminal."""
    called = time.monotonic()
    if verbose == "auto":
        verbose = 1 if sys.stdout.isatty() else 0
    run = prepare(settings, resume, explicit, writer=cluster.process_id == 0)
    settings, state, corpus = run.settings, run.state, run.corpus
    try:
        cluster.check()
    except PlacementError as e:
        raise TrainingError(str(e)) from None
    budget = _Budget(called, settings.max_minutes)

    before_keras(cluster)
    import keras

    try:
        placement = place(cluster, settings.batch_size)
    except PlacementError as e:
        raise TrainingError(str(e)) from None
    writer = placement.writer
    out = Path(settings.out)
    command = command or " ".join(sys.argv)
    # meta.json records how the model was made: the command that started the run, then each resume
    started_with = json.loads((out / RUN_FILE).read_text()).get("command", command) if resume else command
    resumed = [*run.state.get("resumed", []), command] if resume else []
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / RUN_FILE).exists():
            _write_atomic(out / RUN_FILE, json.dumps({**settings.to_dict(), "command": command}, indent=2))
        size = sum(s.size_bytes for s in corpus.sources)
        if run.reused is None:
            began = time.monotonic()
            try:
                write_tokens(run.sources, corpus, run.data)
            except CorpusError as e:
                raise TrainingError(str(e)) from None
            took = run.seconds + time.monotonic() - began
            _log(f"prepared {corpus.label}: {size / 1e6:,.1f} MB, {corpus.length:,} characters into "
                 f"{run.data / 'tokens.bin'} in {took:.1f} s ({size / 1e6 / max(took, 1e-9):.0f} MB/s)")
        else:
            _log(f"reusing the token file in {run.data} ({run.reused}; checked in {run.seconds:.1f} s)")
    else:
        _log(f"process {placement.process_id} of {placement.num_processes}: process 0 writes {out}")
    placement.agree([0.0])  # the others wait for process 0's token file
    if not writer and prepared(run.data, run.sources)[0] is None:
        raise TrainingError(f"process {placement.process_id}: cannot read the token file process 0 wrote in {run.data}; "
                            "every process must see the run directory (shared storage)")
    tokens = TokenCorpus(run.data, corpus)
    vocab = tokens.vocab
    split = tokens.split(settings.validation_fraction)
    windows = Windows(split.train, settings.seq_len, settings.batch_size, settings.seed, read=tokens.windows)
    per_epoch = windows.steps_per_epoch
    last_step = per_epoch * settings.epochs if settings.max_steps is None else min(per_epoch * settings.epochs, settings.max_steps)
    eval_every = settings.eval_every or per_epoch

    keras.utils.set_random_seed(settings.seed)
    checkpoint = out / CHECKPOINT
    if state and checkpoint.exists():
        # under the run's policy: Keras wraps the optimizer of a mixed_float16 model for loss scaling
        # only when the model is made with that global policy, and skips the saved optimizer otherwise
        with placement.scope(), _dtype_policy(settings.precision):
            model = keras.saving.load_model(checkpoint, compile=True, safe_mode=True, custom_objects=custom_objects())
        step = _steps(model)
        if state.get("step") == step and "seed_states" in state:
            _set_seed_states(model, state["seed_states"])
        _log(f"resuming {out} after {_position(step, per_epoch)} (optimizer step {step})")
    else:
        state, step = {}, 0
        model = _new_model(settings, len(vocab), per_epoch, last_step, placement)

    history: list[dict] = state.get("history", [])
    best = state.get("best")  # {"step", "epoch", "val_nats", "artifact"}
    stale = state.get("evaluations_without_improvement", state.get("epochs_without_improvement", 0))
    training_seconds = state.get("training_seconds", 0.0)
    chars_trained = state.get("chars_trained", 0)
    params = count_parameters(model)
    config = settings.config

    _log(
        f"corpus {corpus.label}: {corpus.length:,} chars, vocabulary {len(vocab)}, "
        f"train {len(split.train):,} / validation {len(split.validation):,}"
    )
    _log(
        f"network {config.cell} {config.layers}x{config.units}, embedding {config.embedding}, {params:,} parameters; "
        f"backend {keras.backend.backend()}, {placement.describe()}"
        + (f", {settings.precision}" if settings.precision != "float32" else "")
    )
    if settings.recipe != Recipe():
        changed = {k: v for k, v in settings.recipe.to_dict().items() if v != getattr(Recipe(), k)}
        _log("recipe: " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in changed.items()))
    _log(f"untrained loss would be ln {len(vocab)} = {math.log(len(vocab)):.3f} nats/char ({math.log2(len(vocab)):.3f} bits)")
    _log(f"{per_epoch:,} steps of {settings.batch_size} windows of {settings.seq_len} per epoch; "
         f"evaluating every {eval_every:,} steps until step {last_step:,}")

    validation = _Validation(split.validation, settings.eval_chars, settings.eval_streams, config.units, tokens.release)
    novelty = None
    if writer and settings.sample_chars:
        novelty = Novelty(split.train)
        tokens.release()
        _log(f"samples after each evaluation at temperatures {', '.join(map(str, TEMPERATURES))}; {novelty.describe()}")
    scoring = _Scoring(model, settings.config, len(vocab), placement, settings.precision, settings.recipe)
    if budget and writer:  # time one network call of the validation (deadline 0: exactly one group)
        probe = time.monotonic()
        validation.loss(scoring.model(), deadline=0.0)
        scorings = 2 if settings.recipe.ema else 1  # --ema: the average and the raw weights
        budget.validated((time.monotonic() - probe) * validation.groups * scorings, validation.chars, validation.chars)
    tensorboard = out / "tensorboard" if settings.tensorboard and writer else None
    callbacks = _callbacks(budget, placement, verbose, tensorboard)
    deadline_cb = callbacks[0]
    title = f"{corpus.label}: {config.cell} {config.layers}x{config.units}"
    unit = "epochs" if settings.eval_every is None else "evaluations"

    if writer:
        _tidy(out, best)
    first_step = step
    while True:
        if step >= last_step:
            stop_reason = "max-steps" if settings.max_steps is not None and step >= settings.max_steps else "epochs"
            break
        if settings.patience and stale >= settings.patience:
            stop_reason = f"no improvement for {stale} {unit} (patience {settings.patience})"
            break
        # no time left to train before validating and saving (each invocation trains at least one
        # batch, so a tiny --max-minutes still leaves an artifact)
        if budget and step > first_step and placement.agreed(time.monotonic() >= budget.train_until()):
            stop_reason = "max-minutes"
            break
        end = min(last_step, (step // eval_every + 1) * eval_every)
        if callbacks[1:] and verbose:
            callbacks[1].header = (f"Epoch {step // per_epoch + 1}/{settings.epochs}" if settings.eval_every is None
                                   else f"Steps {step + 1:,}-{end:,} of {last_step:,}")
        started = time.monotonic()
        deadline_cb.hit = False
        interval = step // eval_every
        with placement.scope():
            fit = model.fit(
                _batches(windows, step, end - step, placement.rows(settings.batch_size)),
                epochs=interval + 1, initial_epoch=interval, shuffle=False, verbose=verbose, callbacks=callbacks,
            )
        seconds = time.monotonic() - started
        train_nats = float(fit.history["loss"][-1])
        partial = deadline_cb.hit
        done = _steps(model) - step
        step += done
        trained = done * settings.batch_size * settings.seq_len

        validating = time.monotonic()
        raw = weights = None
        if writer:
            # the first evaluation always completes (see _Budget): a run's artifact has a whole score
            deadline = budget.validate_until() if budget and best is not None else None
            scored = scoring.raw()
            if scored is not None:  # --ema: the raw weights, then the average; the better one is kept
                raw = validation.loss(scored, deadline=deadline)
            scored = scoring.model()
            val = average = validation.loss(scored, deadline=deadline)
            weights = "average" if raw is not None else None
            # a complete score before one --max-minutes cut short, then the lower loss
            if raw is not None and (raw.chars == validation.chars, -raw.nats) > (val.chars == validation.chars, -val.nats):
                scored, val, weights = scoring.raw(), raw, "raw"
            scorings = [average] if raw is None else [average, raw]
            budget.validated(time.monotonic() - validating, sum(x.chars for x in scorings), validation.chars * len(scorings))
        else:
            val = None
        nats, chars = placement.agree([val.nats, val.chars] if writer else [0.0, 0.0])
        val = val or Loss(nats, int(chars))
        complete = val.chars == validation.chars
        saving = time.monotonic()
        training_seconds += seconds
        chars_trained += trained
        epochs = _epochs(step, per_epoch)
        row = {
            "epoch": epochs,
            "step": step,
            "train_nats_per_char": round(train_nats, 5),
            "train_bits_per_char": round(train_nats / LN2, 5),
            "val_nats_per_char": round(val.nats, 5),
            "val_bits_per_char": round(val.bits, 5),
            "val_chars_scored": val.chars,
            "val_partial": not complete,  # cut short by --max-minutes: a prefix's loss, compared with nothing
            "learning_rate": float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)),
            "seconds": round(seconds, 2),
            "chars_per_second": round(trained / seconds),
            "partial": partial,
        }
        if weights is not None:  # --ema: both scores, and which weights the evaluation (and artifact) has
            row.update(weights=weights, val_average_nats_per_char=round(average.nats, 5),
                       val_raw_nats_per_char=round(raw.nats, 5))
        if novelty is not None:
            row["samples"] = samples(scored, vocab, length=settings.sample_chars, novelty=novelty)
        history.append(row)
        for old in history[:-SAMPLES_KEPT]:  # state.json and every artifact's history.json hold them
            old.pop("samples", None)
        # a partial score is of other characters than the whole ones: it can neither be the best nor the validation loss
        improved = complete and (best is None or nats < best["val_nats"])
        mark = "  (best so far)" if improved else ""
        cut = "" if complete else (f" (cut short by --max-minutes: the first {val.chars:,} of {validation.chars:,} "
                                   "characters, not comparable; the best stays as it was)")
        sample = "" if validation.whole else " on the sample"
        other = "" if weights is None else (f" (the average; raw weights {raw.nats:.4f})" if weights == "average"
                                            else f" (the raw weights; average {average.nats:.4f})")
        _log(
            f"{_position(step, per_epoch)}: train {train_nats:.4f} nats/char ({train_nats / LN2:.4f} bits), "
            f"validation{sample} {val.nats:.4f} nats/char ({val.bits:.4f} bits){other}{cut}{mark}; {seconds:.0f} s"
        )
        if "samples" in row:
            _log(format_samples(row["samples"]))

        if improved:
            whole_epochs = math.ceil(step / per_epoch)
            name = (f"artifacts/epoch-{whole_epochs:03d}" if settings.eval_every is None and step % per_epoch == 0
                    else f"artifacts/step-{step:08d}")
            best = {"step": step, "epoch": epochs, "val_nats": nats, "artifact": name}
            stale = 0
        elif complete:
            stale += 1
        if writer:
            files = _history_files(history, title)
            if improved:
                meta = ArtifactMeta(
                    config=config,
                    parameters=params,
                    corpus=CorpusInfo(**corpus.describe()),
                    split=SplitInfo(validation_fraction=round(split.validation_fraction, 6),
                                    train_chars=int(len(split.train)), validation_chars=int(len(split.validation))),
                    validation=ValidationInfo(epoch=whole_epochs, **val.to_dict(), sample=not validation.whole),
                    training=TrainingInfo(
                        epochs=whole_epochs, seconds=round(training_seconds, 1),
                        chars_per_second=round(chars_trained / training_seconds) if training_seconds else None,
                        seq_len=settings.seq_len, batch_size=settings.batch_size, lr=settings.lr,
                        lr_decay=settings.lr_decay, clipnorm=settings.clipnorm, seed=settings.seed,
                        recipe=settings.recipe,
                    ),
                    versions=versions(),
                    command=started_with,
                    resumed=resumed,
                    created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    vocab_size=len(vocab),
                )
                artifacts.save(out / name, scored, vocab, meta, extra_files=files)  # the history as of this evaluation
                artifacts.point(out / "best", out / name)
            _save_model_atomic(model, checkpoint)
            state = {"step": step, "epoch": epochs, "best": best, "evaluations_without_improvement": stale,
                     "history": history, "training_seconds": training_seconds, "chars_trained": chars_trained,
                     "corpus_sha256": corpus.sha256, "seed_states": _seed_states(model), "resumed": resumed}
            _write_atomic(out / STATE_FILE, json.dumps(state, indent=1))
            _tidy(out, best)  # the previous best goes only now that state.json no longer names it
            for file_name, data in files.items():
                _write_atomic(out / file_name, data)
            budget.saved(time.monotonic() - saving)

        if partial:
            stop_reason = "max-minutes"
            break

    if best is None:
        raise TrainingError("no evaluation completed; nothing to save")
    if writer and not validation.whole and "whole_validation" not in best:
        _score_whole(out, best, split.validation, settings, scoring, budget, state, tokens)
    placement.agree([0.0])  # the others wait for process 0's last files
    _log(
        f"stopped ({stop_reason}) after {_position(step, per_epoch)}: best validation {best['val_nats']:.4f} nats/char "
        f"({best['val_nats'] / LN2:.4f} bits) at {_position(best.get('step', best['epoch'] * per_epoch), per_epoch)}; "
        f"artifact {out / 'best'}"
    )
    return out / "best"


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


class _Scoring:
    """The network evaluations run: the training model itself on one device in float32 without an
    average of its weights or weight drop (a weight-dropped layer is not a cell config_of() and the
    samples' ONNX graph know); otherwise a plain float32 network (no recipe layers) on this process's
    first device, given the weights to score before each use: the training weights, or their moving
    average under --ema (the distributed model would split the streams over the devices and
    processes, and its layers may compute in another precision). `model(weights)` is the copy with
    other weights (the best's). An artifact is saved from the network that was scored."""

    def __init__(self, model: keras.Model, config: ModelConfig, vocab_size: int, placement: Placement, precision: str,
                 recipe: Recipe):
        self.training, self.config, self.vocab_size = model, config, vocab_size
        separate = placement.parallel or precision != "float32" or recipe.ema or recipe.weight_drop
        self.copy = build_model(config, vocab_size) if separate else None

    def model(self, weights: list | None = None) -> keras.Model:
        if self.copy is None:
            if weights is None:
                return self.training
            self.copy = build_model(self.config, self.vocab_size)
        if weights is None:
            weights = averaged_weights(self.training) or trainable_weights(self.training)
        copy_weights(weights, self.copy)
        return self.copy

    def raw(self) -> keras.Model | None:
        """Under --ema, once there is an average: the copy given the raw training weights (which
        every evaluation scores beside the average); otherwise None."""
        if averaged_weights(self.training) is None:
            return None
        return self.model(trainable_weights(self.training))


def _score_whole(out: Path, best: dict, ids: np.ndarray, settings: TrainSettings, scoring: _Scoring,
                 budget: _Budget, state: dict, tokens: TokenCorpus) -> None:
    """Evaluations scored a sample of the validation text: score the best model on all of it, once,
    within what is left of the budget, and record it in state.json (the artifact is not rewritten)."""
    # the best artifact's weights: an earlier evaluation's, or this one's (under --ema the average
    # or the raw weights, whichever it kept)
    weights = trainable_weights(artifacts.load_keras(out / best["artifact"]).model)
    whole = _Validation(ids, None, settings.eval_streams, settings.config.units, tokens.release)
    began = time.monotonic()
    loss = whole.loss(scoring.model(weights), deadline=budget.validate_until() if budget else None)
    if loss.chars < whole.chars:  # a prefix's loss is no score of the whole text: not recorded
        _log(f"whole validation text: --max-minutes ran out after {loss.chars:,} of {whole.chars:,} characters; "
             "not recorded (--resume scores it)")
        return
    _log(f"whole validation text, {loss.chars:,} characters: {loss.nats:.4f} nats/char ({loss.bits:.4f} bits) for the "
         f"best model ({best['artifact']}); {time.monotonic() - began:.0f} s")
    best["whole_validation"] = loss.to_dict()
    state["best"] = best
    _write_atomic(out / STATE_FILE, json.dumps(state, indent=1))
