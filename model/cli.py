"""The `chargen` command: train, sample, evaluate, prepare, serve.

Heavy imports (Keras and its backend) happen inside the commands, after `--backend` is known, so
`chargen --help` is instant and a bad flag is reported before TensorFlow loads.
"""

from __future__ import annotations

import os
import shlex
import sys

import click

BACKENDS = ("tensorflow", "jax")


def _quiet_backend(backend: str | None) -> None:
    if backend:
        os.environ["KERAS_BACKEND"] = backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--backend", type=click.Choice(BACKENDS), default=None,
              help="Keras backend (default: $KERAS_BACKEND, else tensorflow).")
def main(backend):
    """chargen: train a character-level recurrent language model and serve it."""
    _quiet_backend(backend)


# ---------------------------------------------------------------- train


@main.command()
@click.option("--corpus", required=True, type=click.Path(dir_okay=False), help="UTF-8 text file to learn from.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory (checkpoints, best artifact, history).")
@click.option("--cell", type=click.Choice(["lstm", "gru", "rnn"]), default="lstm", show_default=True, help="Recurrent cell.")
@click.option("--layers", type=click.IntRange(1, 16), default=2, show_default=True, help="Stacked recurrent layers.")
@click.option("--units", type=click.IntRange(1, 8192), default=256, show_default=True, help="Units per recurrent layer.")
@click.option("--embedding", type=click.IntRange(1, 4096), default=64, show_default=True, help="Character embedding size.")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True, help="Dropout between layers.")
@click.option("--seq-len", type=click.IntRange(1), default=100, show_default=True, help="Characters per window (truncated BPTT length).")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True, help="Windows per batch.")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=2e-3, show_default=True, help="Adam learning rate.")
@click.option("--lr-decay", type=click.FloatRange(0, 1, min_open=True), default=0.95, show_default=True, help="Learning-rate factor per epoch.")
@click.option("--clipnorm", type=click.FloatRange(0), default=5.0, show_default=True, help="Clip the global gradient norm (0: off).")
@click.option("--epochs", type=click.IntRange(1), default=30, show_default=True, help="Most epochs (one epoch covers the training text once).")
@click.option("--max-minutes", type=click.FloatRange(0, min_open=True), default=None, help="Stop after this much training time.")
@click.option("--patience", type=click.IntRange(0), default=5, show_default=True, help="Early stopping: epochs without improvement (0: off).")
@click.option("--validation", "validation_fraction", type=click.FloatRange(0, 0.5, min_open=True), default=0.1, show_default=True,
              help="Fraction at the end of the corpus kept for validation.")
@click.option("--seed", type=int, default=1234, show_default=True, help="Random seed (weights, batches, dropout).")
@click.option("--tensorboard", is_flag=True, help="Write TensorBoard logs to OUT/tensorboard.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last completed epoch.")
def train(corpus, out, cell, layers, units, embedding, dropout, resume, **kwargs):
    """Train a model on CORPUS; the best checkpoint is kept as OUT/best."""
    from model.network import ModelConfig
    from model.train import TrainingError, TrainSettings, prepare, train as run

    config = ModelConfig(cell=cell, layers=layers, units=units, embedding=embedding, dropout=dropout)
    settings = TrainSettings(corpus=corpus, out=out, config=config, **kwargs)
    command = "chargen " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        prepare(settings, resume)  # every bad input is reported here, before the backend does any work
        run(settings, resume=resume, command=command)
    except TrainingError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted; continue with: chargen train --corpus {shlex.quote(corpus)} --out {shlex.quote(out)} --resume", err=True)
        sys.exit(130)
