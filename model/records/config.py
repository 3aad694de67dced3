"""The records of a network and of how it is trained: `ModelConfig` (what the network is) and
`Recipe` (regularisation and optimisation, model/training/recipe.py builds them), with the
named presets of the command line. Plain dataclasses with strict readers: the runtime, the
training side and the command line all read them, and this module imports neither side."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

# cell name -> the Keras layer class that runs it (model/training/network.py)
CELLS = {"lstm": "LSTM", "gru": "GRU", "rnn": "SimpleRNN"}
# The largest network a config may describe (the command line's bounds too): far beyond what a
# character model needs, low enough that a typo (--units 40960) is refused rather than allocated.
MAX_LAYERS = 16
MAX_UNITS = 8192
MAX_EMBEDDING = 4096



@dataclass(frozen=True)
class ModelConfig:
    cell: str = "lstm"  # lstm | gru | rnn
    layers: int = 2
    units: int = 256
    embedding: int = 64
    dropout: float = 0.0  # between layers, as char-rnn does; never inside the recurrence

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {', '.join(CELLS)}, got {self.cell!r}")
        for name in ("layers", "units", "embedding"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive whole number, got {value!r}")
        for name, most in (("layers", MAX_LAYERS), ("units", MAX_UNITS), ("embedding", MAX_EMBEDDING)):
            if getattr(self, name) > most:
                raise ValueError(f"{name} must be at most {most}, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(sorted(unknown))}")
        return cls(**data)



SCHEDULES = ("exponential", "cosine", "linear", "constant")


@dataclass(frozen=True)
class Recipe:
    input_dropout: float = 0.0
    output_dropout: float = 0.0
    embedding_dropout: float = 0.0
    weight_drop: float = 0.0
    locked: bool = False  # --dropout, --input-dropout and --output-dropout share one mask over time
    weight_decay: float = 0.0
    schedule: str = "exponential"
    warmup: int = 0  # steps
    min_lr: float = 0.1  # the cosine and linear schedules' floor, a fraction of --lr
    ema: float = 0.0  # the average's decay per step; 0: no average

    def check(self) -> None:
        for name in ("input_dropout", "output_dropout", "embedding_dropout", "weight_drop"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise ValueError(f"{_flag(name)} must be in [0, 1), got {value!r}")
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"--warmup must be a whole number of steps >= 0, got {self.warmup!r}")
        if not (isinstance(self.min_lr, (int, float)) and 0.0 <= self.min_lr <= 1.0):
            raise ValueError(f"--min-lr must be in [0, 1] (a fraction of --lr), got {self.min_lr!r}")
        if not (isinstance(self.ema, (int, float)) and 0.0 <= self.ema < 1.0):
            raise ValueError(f"--ema must be in [0, 1) (0: no average), got {self.ema!r}")
        if not isinstance(self.locked, bool):
            raise ValueError(f"locked must be true or false, got {self.locked!r}")

    @property
    def plain_optimizer(self) -> bool:
        """Today's Adam, exactly (a run that uses none of the optimizer's new settings)."""
        return not self.weight_decay and not self.ema

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "Recipe":
        """None (a run.json written before recipes existed) is the recipe those runs used: all off."""
        if data is None:
            return cls()
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown recipe keys: {', '.join(sorted(unknown))}")
        return cls(**data)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")



PRESETS: dict[str, dict] = {
    # minutes on a laptop: a first look at a corpus
    "tiny": {"layers": 1, "units": 128, "embedding": 32, "seq_len": 100, "batch_size": 32, "epochs": 10},
    # the defaults of every option (chargen's recipe before presets existed)
    "small": {},
    # hours on a CPU: the shipped model's recipe
    "medium": {"layers": 3, "units": 384, "embedding": 64, "seq_len": 256, "batch_size": 64, "epochs": 60,
               "patience": 0, "dropout": 0.25, "input_dropout": 0.1, "output_dropout": 0.25, "weight_drop": 0.25,
               "locked": True, "weight_decay": 0.1, "schedule": "cosine", "warmup": 200, "ema": 0.999},
    # a GPU: more capacity, more regularisation
    "large": {"layers": 3, "units": 1024, "embedding": 128, "seq_len": 256, "batch_size": 128, "epochs": 100,
              "patience": 0, "dropout": 0.3, "input_dropout": 0.1, "output_dropout": 0.3, "weight_drop": 0.4,
              "locked": True, "weight_decay": 0.1, "schedule": "cosine", "warmup": 500, "ema": 0.999},
}
