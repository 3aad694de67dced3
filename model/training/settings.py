"""A training run's settings (`TrainSettings`), their bounds, and run.json: the settings a run was
started with and the command line that started it.

The one place that knows the training defaults and bounds: the command line's `train` options take
theirs from here and from model/records/config.py. Importing this module imports neither numpy
nor Keras, so the command line reads it before any heavy import.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from model.records.config import ModelConfig, Recipe
from model.records.files import parse_json

RUN_FILE = "run.json"
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
DEFAULT_EVAL_CHARS = 1_000_000
MIN_EVAL_CHARS = 2  # one prediction needs two characters
MAX_SAMPLE_CHARS = 2_000
MAX_VALIDATION_FRACTION = 0.5
MAX_SEED = 2**32 - 1  # NumPy's legacy seeding, which Keras uses, takes 32 bits
MAX_BATCH_SIZE = 1 << 20  # windows in one step, all devices together (a batch of 64 is the default)


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
        def whole(name, value, minimum=1, optional=False):
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise TrainingError(f"{flag(name)} must be a whole number >= {minimum}, got {value!r}")

        whole("seq_len", self.seq_len)
        whole("batch_size", self.batch_size)
        if self.batch_size > MAX_BATCH_SIZE:
            raise TrainingError(f"--batch-size must be at most {MAX_BATCH_SIZE:,} windows, got {self.batch_size:,}")
        whole("epochs", self.epochs)
        whole("max_steps", self.max_steps, optional=True)
        whole("eval_every", self.eval_every, optional=True)
        whole("eval_chars", self.eval_chars, minimum=MIN_EVAL_CHARS, optional=True)
        whole("patience", self.patience, minimum=0)
        whole("eval_streams", self.eval_streams)
        whole("sample_chars", self.sample_chars, minimum=0)
        if self.sample_chars > MAX_SAMPLE_CHARS:
            raise TrainingError(f"--sample-chars must be at most {MAX_SAMPLE_CHARS}, got {self.sample_chars}")
        whole("seed", self.seed, minimum=0)
        if self.seed > MAX_SEED:
            raise TrainingError(f"--seed must be below 2**32, got {self.seed}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainingError(f"--lr must be a positive number, got {self.lr}")
        if not 0 < self.lr_decay <= 1:
            raise TrainingError(f"--lr-decay must be in (0, 1], got {self.lr_decay}")
        if not (self.clipnorm >= 0 and math.isfinite(self.clipnorm)):
            raise TrainingError(f"--clipnorm must be >= 0 (0 turns clipping off), got {self.clipnorm}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise TrainingError(f"--max-minutes must be positive, got {self.max_minutes}")
        if not 0 < self.validation_fraction <= MAX_VALIDATION_FRACTION:
            raise TrainingError(f"--validation must be in (0, {MAX_VALIDATION_FRACTION}], got {self.validation_fraction}")
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
        """The settings in `d`; unknown keys are refused, as ModelConfig and Recipe refuse theirs.
        A key left out takes its default (a run.json from before the setting existed)."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise TrainingError(f"unknown training settings: {', '.join(sorted(unknown))}")
        if "config" not in d:
            raise TrainingError("missing training setting: config")
        try:
            config, recipe = ModelConfig.from_dict(d["config"]), Recipe.from_dict(d.get("recipe"))
        except (TypeError, ValueError) as e:
            raise TrainingError(str(e)) from None
        try:
            return cls(**{**d, "config": config, "recipe": recipe})
        except TypeError as e:  # corpus or out left out
            raise TrainingError(str(e)) from None


# Settings a resumed run may change; the rest must match the interrupted run.
RESUMABLE = ("epochs", "max_steps", "max_minutes", "patience", "eval_every", "tensorboard", "data", "out", "sample_chars")


def flag(name: str) -> str:
    """The command-line option of the setting `name`."""
    return "--validation" if name == "validation_fraction" else "--" + name.replace("_", "-")


# ---------------------------------------------------------------- run.json


def run_json(settings: TrainSettings, command: str) -> str:
    """run.json: the settings, and the command line that started the run beside them."""
    return json.dumps({**settings.to_dict(), "command": command}, indent=2)


def read_run(path: Path) -> tuple[TrainSettings, str | None]:
    """(the settings, the command that started the run) in the run.json at `path`; TrainingError
    names the file and what is wrong with it. The command is None in a run.json written without one."""
    try:
        data = parse_json(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:  # ValueError: "not valid JSON: ..."
        raise TrainingError(f"{path}: cannot be read: {e}") from None
    if not isinstance(data, dict):
        raise TrainingError(f"{path}: expected a JSON object")
    command = data.pop("command", None)
    if command is not None and not isinstance(command, str):
        raise TrainingError(f"{path}: command must be a string, got {command!r:.60}")
    try:
        settings = TrainSettings.from_dict(data)
        settings.check()
    except TrainingError as e:
        raise TrainingError(f"{path}: {e}") from None
    return settings, command
