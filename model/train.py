"""The training run: batches, optimizer, validation, checkpoints, resume, history.

A run directory holds:
    run.json           the settings and command line the run was started with
    checkpoint.keras   the model with its optimizer state after the last completed epoch
    state.json         epoch counter, best validation loss, history (written after checkpoint.keras)
    best -> artifacts/epoch-NNN   the artifact with the lowest validation loss so far
    history.json, history.csv, loss.png   every epoch so far (an artifact holds them as of its epoch)
    tensorboard/       with --tensorboard

Every file is written under a temporary name and renamed, so killing the run at any moment (Ctrl-C,
SIGKILL, power loss) leaves the previous epoch's files intact, and `--resume` continues from there.
A published artifact is never written to again.

Importing this module does not import Keras: `prepare()` checks settings and corpus first, so the
command line reports a mistake in a fraction of a second; `train()` imports Keras after that.
"""

from __future__ import annotations

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

from model import artifact
from model.artifact import ArtifactMeta, CorpusInfo, SplitInfo, TrainingInfo, ValidationInfo, Versions
from model.data import Corpus, epoch_windows, read_corpus, split_ids
from model.evaluate import LN2, StreamScorer
from model.network import ModelConfig, build_model, count_parameters
from model.vocab import Vocab

if TYPE_CHECKING:
    import keras

RUN_FILE, STATE_FILE, CHECKPOINT = "run.json", "state.json", "checkpoint.keras"


class TrainingError(ValueError):
    """Settings or run directories that cannot be used; raised before any work starts."""


@dataclass
class TrainSettings:
    corpus: str
    out: str
    config: ModelConfig = field(default_factory=ModelConfig)
    seq_len: int = 100
    batch_size: int = 64
    lr: float = 2e-3
    lr_decay: float = 0.95  # multiplied in once per epoch, smoothly (exponential decay by step)
    clipnorm: float = 5.0  # global gradient norm; 0 turns clipping off
    epochs: int = 30
    max_minutes: float | None = None
    patience: int = 5  # epochs without a better validation loss before stopping; 0 = never stop early
    validation_fraction: float = 0.1
    seed: int = 1234
    tensorboard: bool = False
    eval_streams: int = 64

    def check(self) -> None:
        def positive_int(name, value, minimum=1):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise TrainingError(f"--{name.replace('_', '-')} must be a whole number >= {minimum}, got {value!r}")

        positive_int("seq_len", self.seq_len)
        positive_int("batch_size", self.batch_size)
        positive_int("epochs", self.epochs)
        positive_int("patience", self.patience, minimum=0)
        positive_int("eval_streams", self.eval_streams)
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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["config"] = self.config.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainSettings":
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["config"] = ModelConfig.from_dict(d["config"])
        return cls(**d)


# Settings a resumed run may change; the rest must match the interrupted run.
RESUMABLE = ("epochs", "max_minutes", "patience", "tensorboard", "out")


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
    training, validating and saving. (Without it, every deadline is infinitely far away.)

    After an epoch's training come its validation and its saving, so training stops early enough
    for both to fit: the epoch is cut short, rather than the validation, because validation losses
    are compared across epochs (the best artifact, early stopping) and stay comparable only on the
    same characters. Validation is estimated before the first epoch by timing one group of streams
    on the untrained network, then measured; saving is guessed, then measured. When even validating
    would take more than a quarter of the budget (a huge --validation part), training keeps three
    quarters and validation scores what fits of the rest: the loss of a prefix of the validation
    text, recorded as such (chars_scored)."""

    VALIDATION_SHARE = 0.25
    SAVING_GUESS = 2.0  # seconds, until an epoch's saving has been measured

    def __init__(self, started: float, minutes: float | None):
        self.total = 60.0 * minutes if minutes else math.inf
        self.end = started + self.total
        self.validation = 0.0  # seconds a whole validation takes
        self.group = 0.0  # seconds one network call of the validation takes
        self.saving: float | None = None

    def __bool__(self) -> bool:
        return math.isfinite(self.total)

    def _saving(self) -> float:
        return self.SAVING_GUESS if self.saving is None else self.saving

    def train_until(self) -> float:
        validating = min(self.validation, max(self.VALIDATION_SHARE * self.total, self.group))
        return self.end - self._saving() - validating

    def validate_until(self) -> float:
        return self.end - self._saving()

    def validated(self, seconds: float, scored: int, whole: int, groups: int) -> None:
        self.validation = seconds * whole / scored
        self.group = self.validation / groups

    def saved(self, seconds: float) -> None:
        self.saving = seconds if self.saving is None else max(self.saving, seconds)


def _callbacks(budget: _Budget, epochs: int, verbose: int, tensorboard: Path | None) -> list:
    """The fit() callbacks; defined here, with Keras imported, so that importing this module does not
    import Keras. The first stops an epoch's training at the budget's training deadline."""
    import keras

    class Deadline(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.hit = False

        def on_train_batch_end(self, batch, logs=None):
            if time.monotonic() > budget.train_until():
                self.hit = True
                self.model.stop_training = True

    class ProgressBar(keras.callbacks.ProgbarLogger):
        """Keras' live bar with the run's epoch count in its header: each fit() call covers one
        epoch, so Keras alone would print "Epoch 3/3" for the third of 30."""

        def set_params(self, params):
            super().set_params(params)
            self.epochs = epochs

    callbacks = [Deadline()] + ([ProgressBar()] if verbose else [])
    if tensorboard is not None:
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(tensorboard)))
    return callbacks


def _history_files(history: list[dict], title: str) -> dict[str, bytes]:
    """history.json, history.csv and loss.png of the epochs so far: for the run directory, and for
    an artifact saved at this epoch."""
    buf = io.StringIO()
    if history:
        writer = csv.DictWriter(buf, fieldnames=list(history[0]))
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
    ax.plot(epochs, [h["val_bits_per_char"] for h in history], "o-", label="validation")
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
    for old in (out / "artifacts").glob("epoch-*"):
        if old.relative_to(out).as_posix() != keep:
            shutil.rmtree(old, ignore_errors=True)
    link = out / "best"
    if keep is None:
        if link.is_symlink():
            link.unlink()
    elif not link.is_symlink() or os.readlink(link) != os.path.relpath(out / keep, out):
        artifact.point(link, out / keep)


def _steps(model: keras.Model) -> int:
    import keras

    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


def _log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- the run


def prepare(settings: TrainSettings, resume: bool, explicit: frozenset[str] = frozenset()) -> tuple[TrainSettings, Corpus, dict]:
    """Everything that can fail on bad input, checked before any training starts.

    `explicit` names the settings the user gave on the command line: on --resume, one that differs
    from the interrupted run's (other than those in RESUMABLE) is an error rather than ignored."""
    settings.check()
    out = Path(settings.out)
    state = {}
    if resume:
        if not (out / RUN_FILE).exists():
            raise TrainingError(f"--resume: {out} holds no run to resume (no {RUN_FILE}); start one without --resume")
        saved = TrainSettings.from_dict(json.loads((out / RUN_FILE).read_text()))
        for name in sorted(explicit - set(RESUMABLE) - {"corpus"}):
            if hasattr(settings.config, name):
                ours, theirs = getattr(settings.config, name), getattr(saved.config, name)
            elif hasattr(settings, name):
                ours, theirs = getattr(settings, name), getattr(saved, name)
            else:
                continue
            if ours != theirs:
                flag = "--validation" if name == "validation_fraction" else "--" + name.replace("_", "-")
                raise TrainingError(
                    f"--resume: {flag} {ours} differs from the run's {theirs}; a resumed run keeps its "
                    f"settings (only {', '.join('--' + n.replace('_', '-') for n in RESUMABLE if n != 'out')} may change)"
                )
        for name in RESUMABLE:
            setattr(saved, name, getattr(settings, name))
        settings = saved
        if (out / STATE_FILE).exists():
            state = json.loads((out / STATE_FILE).read_text())
    elif (out / RUN_FILE).exists():
        raise TrainingError(f"{out} already holds a training run: pass --resume to continue it, or choose another --out")
    elif out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} is a file, not a directory")

    if settings.tensorboard:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise TrainingError("--tensorboard needs the tensorboard package: pip install tensorboard")

    from model.data import CorpusError

    try:
        corpus = read_corpus(settings.corpus)
    except CorpusError as e:
        raise TrainingError(str(e)) from None
    if resume and state and state.get("corpus_sha256") not in (None, corpus.sha256):
        raise TrainingError(f"--resume: {settings.corpus} has changed since the run started (sha256 differs)")
    n_val = int(len(corpus.text) * settings.validation_fraction)
    n_train = len(corpus.text) - n_val
    if settings.seq_len >= n_train:
        raise TrainingError(
            f"--seq-len {settings.seq_len} is longer than the training part of the corpus ({n_train} characters); "
            "use a shorter --seq-len or a longer corpus"
        )
    if n_val < 2:
        raise TrainingError(f"the validation part of the corpus has only {n_val} characters; raise --validation")
    return settings, corpus, state


def train(settings: TrainSettings, *, resume: bool = False, explicit: frozenset[str] = frozenset(),
          command: str | None = None, verbose: int | str = "auto") -> Path:
    """Train (or resume) a run; returns the path of the best artifact. Bad settings and corpora are
    reported (TrainingError) before any work starts, and before Keras is imported; `explicit` is as
    in prepare(). --max-minutes counts from this call (see _Budget).

    verbose="auto" shows Keras' live progress bar with the running loss on a terminal; elsewhere (a
    log file, CI) only the one line per epoch that this function prints, because the bar writes
    backspaces and colour codes many times a second even when stdout is not a terminal."""
    called = time.monotonic()
    if verbose == "auto":
        verbose = 1 if sys.stdout.isatty() else 0
    settings, corpus, state = prepare(settings, resume, explicit)
    budget = _Budget(called, settings.max_minutes)

    import keras

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    command = command or " ".join(sys.argv)
    if not (out / RUN_FILE).exists():
        _write_atomic(out / RUN_FILE, json.dumps({**settings.to_dict(), "command": command}, indent=2))

    keras.utils.set_random_seed(settings.seed)
    vocab = Vocab.from_text(corpus.text)
    split = split_ids(vocab.encode_exact(corpus.text), settings.validation_fraction)
    steps_per_epoch = max(1, (len(split.train) // settings.seq_len) // settings.batch_size)

    checkpoint = out / CHECKPOINT
    if state and checkpoint.exists():
        model = keras.saving.load_model(checkpoint, compile=True, safe_mode=True)
        _log(f"resuming {out} after epoch {state['epoch']} (optimizer step {_steps(model)})")
    else:
        state = {}
        model = build_model(settings.config, len(vocab))
        schedule = keras.optimizers.schedules.ExponentialDecay(
            settings.lr, decay_steps=steps_per_epoch, decay_rate=settings.lr_decay
        )
        optimizer = keras.optimizers.Adam(
            learning_rate=schedule, global_clipnorm=settings.clipnorm or None
        )
        model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    history: list[dict] = state.get("history", [])
    epoch = state.get("epoch", 0)
    best = state.get("best")  # {"epoch", "val_nats", "artifact"}
    stale = state.get("epochs_without_improvement", 0)
    training_seconds = state.get("training_seconds", 0.0)
    chars_trained = state.get("chars_trained", 0)
    params = count_parameters(model)

    _log(
        f"corpus {corpus.name}: {len(corpus.text):,} chars, vocabulary {len(vocab)}, "
        f"train {len(split.train):,} / validation {len(split.validation):,}"
    )
    _log(
        f"network {settings.config.cell} {settings.config.layers}x{settings.config.units}, "
        f"embedding {settings.config.embedding}, {params:,} parameters; backend {keras.backend.backend()}"
    )
    _log(f"untrained loss would be ln {len(vocab)} = {math.log(len(vocab)):.3f} nats/char ({math.log2(len(vocab)):.3f} bits)")

    scorer = StreamScorer(n_streams=settings.eval_streams)
    whole, groups = scorer.scored(split.validation), scorer.groups(split.validation)
    if budget:  # time one network call of the validation (deadline 0: exactly one group)
        probe = time.monotonic()
        scorer.loss(model, split.validation, deadline=0.0)
        budget.validated((time.monotonic() - probe) * groups, whole, whole, groups)
    callbacks = _callbacks(budget, settings.epochs, verbose, out / "tensorboard" if settings.tensorboard else None)
    deadline_cb = callbacks[0]
    title = f"{corpus.name}: {settings.config.cell} {settings.config.layers}x{settings.config.units}"

    _tidy(out, best)
    first_epoch = epoch
    stop_reason = "epochs"
    while epoch < settings.epochs:
        if settings.patience and stale >= settings.patience:  # a resumed run that had already stopped early
            stop_reason = f"no improvement for {stale} epochs (patience {settings.patience})"
            break
        # no time left to train before validating and saving (each invocation trains at least one
        # batch, so a tiny --max-minutes still leaves an artifact)
        if time.monotonic() >= budget.train_until() and epoch > first_epoch:
            stop_reason = "max-minutes"
            break
        x, y = epoch_windows(split.train, settings.seq_len, settings.batch_size, settings.seed, epoch)
        started, steps_before = time.monotonic(), _steps(model)
        deadline_cb.hit = False
        fit = model.fit(
            x, y, batch_size=settings.batch_size, epochs=epoch + 1, initial_epoch=epoch,
            shuffle=False, verbose=verbose, callbacks=callbacks,
        )
        seconds = time.monotonic() - started
        train_nats = float(fit.history["loss"][-1])
        partial = deadline_cb.hit
        trained = (_steps(model) - steps_before) * settings.batch_size * settings.seq_len

        validating = time.monotonic()
        val = scorer.loss(model, split.validation, deadline=budget.validate_until())
        budget.validated(time.monotonic() - validating, val.chars, whole, groups)
        saving = time.monotonic()
        epoch += 1
        training_seconds += seconds
        chars_trained += trained
        lr_now = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
        row = {
            "epoch": epoch,
            "train_nats_per_char": round(train_nats, 5),
            "train_bits_per_char": round(train_nats / LN2, 5),
            "val_nats_per_char": round(val.nats, 5),
            "val_bits_per_char": round(val.bits, 5),
            "val_chars_scored": val.chars,
            "learning_rate": lr_now,
            "seconds": round(seconds, 2),
            "chars_per_second": round(trained / seconds),
            "partial": partial,
        }
        history.append(row)
        improved = best is None or val.nats < best["val_nats"]
        mark = "  (best so far)" if improved else ""
        cut = f" (the first {val.chars:,} of {whole:,} characters: --max-minutes)" if val.chars < whole else ""
        _log(
            f"epoch {epoch}: train {train_nats:.4f} nats/char ({train_nats / LN2:.4f} bits), "
            f"validation {val.nats:.4f} nats/char ({val.bits:.4f} bits){cut}{mark}; {seconds:.0f} s"
        )

        files = _history_files(history, title)
        if improved:
            name = f"artifacts/epoch-{epoch:03d}"
            meta = ArtifactMeta(
                config=settings.config,
                parameters=params,
                corpus=CorpusInfo(**corpus.describe()),
                split=SplitInfo(validation_fraction=settings.validation_fraction,
                                train_chars=int(len(split.train)), validation_chars=int(len(split.validation))),
                validation=ValidationInfo(epoch=epoch, **val.to_dict()),
                training=TrainingInfo(
                    epochs=epoch, seconds=round(training_seconds, 1),
                    chars_per_second=round(chars_trained / training_seconds) if training_seconds else None,
                    seq_len=settings.seq_len, batch_size=settings.batch_size, lr=settings.lr,
                    lr_decay=settings.lr_decay, clipnorm=settings.clipnorm, seed=settings.seed,
                ),
                versions=versions(),
                command=command,
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                vocab_size=len(vocab),
            )
            artifact.save(out / name, model, vocab, meta, extra_files=files)  # the history as of this epoch
            artifact.point(out / "best", out / name)
            best = {"epoch": epoch, "val_nats": val.nats, "artifact": name}
            stale = 0
        else:
            stale += 1

        _save_model_atomic(model, checkpoint)
        state = {"epoch": epoch, "best": best, "epochs_without_improvement": stale, "history": history,
                 "training_seconds": training_seconds, "chars_trained": chars_trained, "corpus_sha256": corpus.sha256}
        _write_atomic(out / STATE_FILE, json.dumps(state, indent=1))
        _tidy(out, best)  # the previous best goes only now that state.json no longer names it
        for file_name, data in files.items():
            _write_atomic(out / file_name, data)
        budget.saved(time.monotonic() - saving)

        if partial:
            stop_reason = "max-minutes"
            break
        if settings.patience and stale >= settings.patience:
            stop_reason = f"no improvement for {stale} epochs (patience {settings.patience})"
            break

    if best is None:
        raise TrainingError("no epoch completed; nothing to save")
    _log(
        f"stopped ({stop_reason}) after epoch {epoch}: best validation {best['val_nats']:.4f} nats/char "
        f"({best['val_nats'] / LN2:.4f} bits) at epoch {best['epoch']}; artifact {out / 'best'}"
    )
    return out / "best"
