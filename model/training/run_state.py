"""state.json: where a training run is (`RunState`), read strictly as an artifact's meta.json is:
every field present and of its declared type, unknown fields refused. model/training/train.py
writes it after each evaluation's checkpoint, in one place (`_write_state`), and `--resume`
continues from it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from model.records.files import parse_json
from model.records.meta import BadMeta, read_record
from model.training.history import SAMPLES_KEPT, Evaluation
from model.training.settings import TrainingError

STATE_FILE = "state.json"


@dataclass(frozen=True)
class Score:
    """A loss on the whole validation text (model/training/evaluate.py's Loss.to_dict())."""

    nats_per_char: float
    bits_per_char: float
    chars_scored: int


@dataclass(kw_only=True)
class Best:
    """The evaluation with the lowest complete validation loss so far, and its artifact."""

    step: int
    epoch: float
    val_nats: float
    artifact: str  # its directory, relative to the run directory: artifacts/epoch-NNN or artifacts/step-NNNNNNNN
    # evaluations scored a sample of the validation text: the best model on all of it, once, at the end
    whole_validation: Score | None = None


@dataclass(kw_only=True)
class RunState:
    step: int  # optimizer steps taken
    epoch: float  # epochs trained: a whole number at an epoch's end
    best: Best | None
    evaluations_without_improvement: int
    history: list[Evaluation]
    training_seconds: float
    chars_trained: int
    corpus_sha256: str  # a resumed run refuses a corpus that changed
    seed_states: list[list[int]]  # the dropout generators' states, which model.save leaves out
    resumed: list[str]  # the command line of each --resume, in order

    @classmethod
    def start(cls, corpus_sha256: str, resumed: list[str]) -> "RunState":
        """The state of a run before its first evaluation."""
        return cls(step=0, epoch=0, best=None, evaluations_without_improvement=0, history=[], training_seconds=0.0,
                   chars_trained=0, corpus_sha256=corpus_sha256, seed_states=[], resumed=resumed)

    def add(self, row: Evaluation) -> None:
        self.history.append(row)
        for old in self.history[:-SAMPLES_KEPT]:  # state.json and every artifact's history.json hold them
            old.samples = None

    def to_json(self) -> str:
        d = asdict(self)
        d["history"] = [row.to_dict() for row in self.history]
        if self.best is not None and self.best.whole_validation is None:
            del d["best"]["whole_validation"]
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str = "state.json") -> "RunState":
        """The state in `text`; TrainingError names `where` and the first field that is wrong."""
        try:
            data = parse_json(text)
        except ValueError as e:  # says "not valid JSON: ..." (nested too deeply, too)
            raise TrainingError(f"{where}: {e}") from None
        if not isinstance(data, dict):
            raise TrainingError(f"{where}: expected a JSON object")
        missing = [f.name for f in fields(cls) if f.name not in data]
        if missing:
            raise TrainingError(f"{where}: missing field {missing[0]!r}")
        try:
            return read_record(cls, data, where, "")
        except BadMeta as e:  # the message names the file and the field
            raise TrainingError(str(e)) from None

    @classmethod
    def read(cls, path: Path) -> "RunState":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TrainingError(f"{path}: cannot be read: {e}") from None
        return cls.from_json(text, str(path))
