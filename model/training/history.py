"""A training run's history: one `Evaluation` row per evaluation, kept in state.json, and the files
drawn from it (history.json, history.csv and loss.png), which the run directory holds for every
evaluation so far and an artifact for those up to its own."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass

SAMPLES_KEPT = 100  # evaluations whose samples the history keeps (the last ones)


@dataclass
class Sample:
    """Characters sampled after an evaluation (model/training/samples.py's rows)."""

    temperature: float
    text: str
    novelty: float | None  # None: no novelty index, or a sample shorter than its n-grams


@dataclass(kw_only=True)
class Evaluation:
    """A row of the history. The fields are history.json's keys and history.csv's columns, in order;
    the optional ones are written only when set."""

    epoch: float  # epochs trained: a whole number at an epoch's end
    step: int
    train_nats_per_char: float
    train_bits_per_char: float
    val_nats_per_char: float
    val_bits_per_char: float
    val_chars_scored: int
    val_partial: bool  # cut short by --max-minutes: a prefix's loss, compared with nothing
    learning_rate: float
    seconds: float
    chars_per_second: int
    partial: bool  # the stretch of training before it was cut short by --max-minutes
    weights: str | None = None  # --ema: which weights the evaluation (and artifact) has, "average" or "raw"
    val_average_nats_per_char: float | None = None  # --ema: both scores
    val_raw_nats_per_char: float | None = None
    samples: list[Sample] | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def history_files(history: list[Evaluation], title: str) -> dict[str, bytes]:
    """history.json, history.csv and loss.png of the evaluations so far: for the run directory,
    and for an artifact saved at this evaluation."""
    rows = [row.to_dict() for row in history]
    buf = io.StringIO()
    if rows:
        columns = dict.fromkeys(k for row in rows for k in row if k != "samples")  # samples: history.json only
        writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return {"history.json": json.dumps(rows, indent=1).encode(), "history.csv": buf.getvalue().encode(),
            "loss.png": plot_history(history, title)}  # drawn once: on tiny corpora plotting costs more than an epoch


def plot_history(history: list[Evaluation], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=100)
    fig.subplots_adjust(left=0.1, right=0.97, top=0.92, bottom=0.12)  # bbox_inches="tight" would draw twice
    ax = fig.subplots()
    ax.plot([h.epoch for h in history], [h.train_bits_per_char for h in history], "o-", label="train")
    whole = [h for h in history if not h.val_partial]  # a partial evaluation's prefix would draw a false dip
    ax.plot([h.epoch for h in whole], [h.val_bits_per_char for h in whole], "o-", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("bits per character")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
