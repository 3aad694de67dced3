"""The `chargen` command: train, sample, evaluate, export, prepare, serve, inspect.

It sits above both `model/` and `service/` (pyproject.toml's import contracts). Only train,
evaluate and export run the Keras network, and need the training stack (the `train` extra, or
`jax`); sample and serve run the artifact's ONNX graph on ONNX Runtime. Keras, TensorFlow and ONNX
Runtime are imported inside the commands, for speed: after every check that needs no model, so a
bad flag, a missing or binary file, a directory that is not an artifact, a missing training stack
or backend, a port in use are all reported in a fraction of a second, before TensorFlow loads.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shlex
import signal
import sys
from pathlib import Path

import click

from model.records.defaults import DEFAULTS, MAX_TEMPERATURE, MAX_TOP_K
from model.training.dynamic import DynamicSettings
from model.records.config import (CELLS, MAX_EMBEDDING, MAX_LAYERS, MAX_UNITS, PRESETS, SCHEDULES, ModelConfig,
                                  Recipe)
from model.training.settings import (MAX_SAMPLE_CHARS, MAX_SEED, MAX_VALIDATION_FRACTION, MIN_EVAL_CHARS, PRECISIONS,
                                     RESUMABLE, TrainSettings)

# backend -> how to install it with Keras (a serving install, `pip install -e .`, has neither)
BACKENDS = {"tensorflow": "pip install -e '.[train]'", "jax": "pip install -e '.[jax]'"}


def _quiet_backend(backend: str | None) -> None:
    if backend:
        os.environ["KERAS_BACKEND"] = backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))


def _require_keras(command: str) -> None:
    """Keras and the backend this command will load are installed; else one line saying what to
    install (instead of a ModuleNotFoundError traceback). Called by the commands that run the Keras
    network: train, evaluate, export."""
    backend = os.environ.get("KERAS_BACKEND") or "tensorflow"
    if backend not in BACKENDS:
        raise click.ClickException(f"KERAS_BACKEND={backend}: chargen runs on {' or '.join(BACKENDS)}")
    if not _installed("keras"):
        raise click.ClickException(
            f"chargen {command} needs Keras and the {backend} backend, which a serving install leaves out; "
            f"install them with: {BACKENDS[backend]}"
        )
    if not _installed(backend):
        raise click.ClickException(
            f"the {backend} backend is not installed; install it with: {BACKENDS[backend]}"
        )


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a broken installation is as good as none
        return False


def _me() -> str:
    """How the user ran chargen, for a command line to copy (`.venv/bin/chargen`, `chargen`)."""
    if os.path.basename(sys.argv[0]) == "chargen":
        return shlex.quote(sys.argv[0])
    if sys.argv[0].endswith(os.path.join("chargen", "__main__.py")):  # python -m chargen
        return f"{shlex.quote(sys.executable)} -m chargen"
    return "chargen"


def _check_artifact(path: str, keras: bool = False, precision: str = "auto"):
    """The artifact's own check (model/runtime/artifact.py), without Keras: its path, meta and
    vocabulary; `keras=True` for the commands that will load its Keras network; `precision`: the
    graph serving will run (auto, float32, int8)."""
    from model.runtime import artifact

    try:
        return artifact.check(path, keras=keras, precision=precision)
    except artifact.ArtifactError as e:
        raise click.ClickException(str(e)) from None


def _load_artifact(path: str, keras: bool = False, precision: str = "auto"):
    """The serving load (no Keras) of the graph for `precision`, or with `keras=True` the Keras network too."""
    from model.records.meta import ArtifactError

    try:
        if keras:
            from model.training.artifacts import load_keras

            return load_keras(path)
        from model.runtime.artifact import load

        return load(path, precision)
    except ArtifactError as e:
        raise click.ClickException(str(e)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--backend", type=click.Choice(list(BACKENDS)), default=None,
              help="Keras backend (default: $KERAS_BACKEND, else tensorflow).")
def main(backend):
    """chargen: train a character-level recurrent language model and serve it."""
    _quiet_backend(backend)


# ---------------------------------------------------------------- train


class _EvalChars(click.ParamType):
    """--eval-chars: a whole number of characters (at least 2), or `all`."""

    name = "N|all"

    def convert(self, value, param, ctx):
        if value is None or (isinstance(value, str) and value.strip().lower() == "all"):
            return None
        try:
            number = int(str(value).replace("_", "").replace(",", ""))
        except ValueError:
            self.fail(f"{value!r} is neither a whole number nor 'all'", param, ctx)
        if number < MIN_EVAL_CHARS:
            self.fail(f"{number} is too few characters to score (at least {MIN_EVAL_CHARS}, or 'all')", param, ctx)
        return number


def _preset(ctx, param, value):
    """--preset: its values become the defaults of the options not given on the command line."""
    if value is not None:
        ctx.default_map = {**(ctx.default_map or {}), **PRESETS[value]}
    return value


def _as_flag(name: str, value) -> str:
    """A setting as it is written on the command line: --locked, --no-locked, --units 512."""
    flag = f"--{name.replace('_', '-')}"
    if isinstance(value, bool):
        return flag if value else f"--no-{name.replace('_', '-')}"
    return f"{flag} {value}"


@main.command()
@click.option("--preset", type=click.Choice(list(PRESETS)), default=None, is_eager=True, expose_value=False,
              callback=_preset,
              help="Start from a named configuration: " + "; ".join(
                  f"{name}: " + (", ".join(_as_flag(k, v) for k, v in values.items()) or "the defaults")
                  for name, values in PRESETS.items()) + ". Options given on the command line override it.")
@click.option("--corpus", required=True, multiple=True, metavar="FILE|DIR|NAME",
              help="Text to learn from: a UTF-8 file, a directory of them, or a corpus named in corpora/manifest.json. "
                   "Repeat it for several; documents are joined with an empty line between them.")
@click.option("--include", multiple=True, metavar="GLOB", help="Only the files of a --corpus directory matching this glob (repeatable), e.g. '*.txt'.")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Leave out the files of a --corpus directory matching this glob (repeatable).")
@click.option("--drop-control", is_flag=True,
              help="Leave out of the text, and so of the vocabulary, the control characters other than newline and "
                   "tab (bell, backspace, escape, ...) and U+FFFD, which stands for unreadable bytes. Without it they "
                   "are kept; either way training says which it found and how many.")
@click.option("--validation-files", multiple=True, metavar="GLOB",
              help="Hold out the corpus files matching this glob (repeatable) as the validation text, instead of --validation.")
@click.option("--data", type=click.Path(file_okay=False), default=None,
              help="Directory for the corpus's token file (default OUT/data); runs given the same one share it.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory (checkpoints, best artifact, history).")
@click.option("--cell", type=click.Choice(list(CELLS)), default=ModelConfig.cell, show_default=True, help="Recurrent cell.")
@click.option("--layers", type=click.IntRange(1, MAX_LAYERS), default=ModelConfig.layers, show_default=True,
              help="Stacked recurrent layers.")
@click.option("--units", type=click.IntRange(1, MAX_UNITS), default=ModelConfig.units, show_default=True,
              help="Units per recurrent layer.")
@click.option("--embedding", type=click.IntRange(1, MAX_EMBEDDING), default=ModelConfig.embedding, show_default=True,
              help="Character embedding size.")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=ModelConfig.dropout, show_default=True,
              help="Dropout between layers.")
@click.option("--seq-len", type=click.IntRange(1), default=TrainSettings.seq_len, show_default=True,
              help="Characters per window (truncated BPTT length).")
@click.option("--batch-size", type=click.IntRange(1), default=TrainSettings.batch_size, show_default=True,
              help="Windows per batch, over all devices together.")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=TrainSettings.lr, show_default=True,
              help="Adam learning rate.")
@click.option("--lr-decay", type=click.FloatRange(0, 1, min_open=True), default=TrainSettings.lr_decay, show_default=True,
              help="Learning-rate factor per epoch.")
@click.option("--clipnorm", type=click.FloatRange(0), default=TrainSettings.clipnorm, show_default=True,
              help="Clip the global gradient norm (0: off).")
@click.option("--input-dropout", type=click.FloatRange(0, 1, max_open=True), default=Recipe.input_dropout, show_default=True,
              help="Dropout on the character embeddings' output (locked with --locked).")
@click.option("--output-dropout", type=click.FloatRange(0, 1, max_open=True), default=Recipe.output_dropout, show_default=True,
              help="Dropout on the last layer's output, before the logits (locked with --locked).")
@click.option("--embedding-dropout", type=click.FloatRange(0, 1, max_open=True), default=Recipe.embedding_dropout,
              show_default=True,
              help="Share of positions whose character embedding is zeroed.")
@click.option("--weight-drop", type=click.FloatRange(0, 1, max_open=True), default=Recipe.weight_drop, show_default=True,
              help="DropConnect on each layer's recurrent kernel, one mask per batch (AWD-LSTM's weight drop).")
@click.option("--locked/--no-locked", default=Recipe.locked, show_default=True,
              help="One dropout mask per window, shared by its time steps (variational dropout), for --dropout, "
                   "--input-dropout and --output-dropout.")
@click.option("--weight-decay", type=click.FloatRange(0), default=Recipe.weight_decay, show_default=True,
              help="AdamW's decoupled weight decay (biases excluded); 0: Adam.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=Recipe.schedule, show_default=True,
              help="Learning rate after --warmup: exponential (--lr-decay per epoch), or cosine or linear decay to "
                   "--min-lr at the run's last step, or constant.")
@click.option("--warmup", type=click.IntRange(0), default=Recipe.warmup, show_default=True, metavar="STEPS",
              help="Steps of linear learning-rate warm-up.")
@click.option("--min-lr", type=click.FloatRange(0, 1), default=Recipe.min_lr, show_default=True,
              help="The cosine and linear schedules' last learning rate, a fraction of --lr.")
@click.option("--ema", type=click.FloatRange(0, 1, max_open=True), default=Recipe.ema, show_default=True,
              help="Decay per step of a moving average of the weights (0: off; e.g. 0.999); each evaluation scores "
                   "it and the raw weights, and keeps the better for validation and the artifact.")
@click.option("--epochs", type=click.IntRange(1), default=TrainSettings.epochs, show_default=True,
              help="Most epochs (one epoch covers the training text once).")
@click.option("--max-steps", type=click.IntRange(1), default=None, help="Most optimizer steps (batches).")
@click.option("--max-minutes", type=click.FloatRange(0, min_open=True), default=None,
              help="Time budget of this invocation: preparing, training, validating and saving (a --resume gets it "
                   "anew).")
@click.option("--eval-every", type=click.IntRange(1), default=None, metavar="STEPS",
              help="Evaluate and checkpoint every STEPS steps (default: once an epoch).")
@click.option("--eval-chars", type=_EvalChars(), default=str(TrainSettings.eval_chars), show_default=True,
              help="Validation characters an evaluation scores: a fixed sample when the validation text is longer "
                   "(the best model is scored on all of it at the end), or 'all'.")
@click.option("--sample-chars", type=click.IntRange(0, MAX_SAMPLE_CHARS), default=TrainSettings.sample_chars,
              show_default=True, metavar="N",
              help="After each evaluation, print and keep in the history N characters sampled at temperatures 0.5, 0.8 "
                   "and 1.0, with their novelty (the share of 20-character substrings not in the training text); 0: none.")
@click.option("--patience", type=click.IntRange(0), default=TrainSettings.patience, show_default=True,
              help="Early stopping: evaluations without improvement (0: off).")
@click.option("--validation", "validation_fraction", type=click.FloatRange(0, MAX_VALIDATION_FRACTION, min_open=True),
              default=TrainSettings.validation_fraction, show_default=True,
              help="Fraction at the end of the corpus kept for validation.")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=TrainSettings.seed, show_default=True,
              help="Random seed (weights, batches, dropout).")
@click.option("--precision", type=click.Choice(PRECISIONS), default=TrainSettings.precision, show_default=True,
              help="Compute precision of training (mixed: for GPUs and TPUs); artifacts hold float32 weights always "
                   "(and an LSTM's int8 graph, made from them).")
@click.option("--devices", type=click.IntRange(1), default=None,
              help="Devices to train on, data-parallel (default: every GPU or TPU, else one CPU; "
                   "without accelerators N virtual CPU devices, for testing).")
@click.option("--coordinator", envvar=["CHARGEN_COORDINATOR", "KERAS_DISTRIBUTION_JOB_ADDRESSES"], default=None, metavar="HOST:PORT",
              help="Several processes (hosts): the address of process 0 [env CHARGEN_COORDINATOR].")
@click.option("--num-processes", envvar=["CHARGEN_NUM_PROCESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES"], type=click.IntRange(1),
              default=1, show_default=True, help="Several processes: how many take part [env CHARGEN_NUM_PROCESSES].")
@click.option("--process-id", envvar=["CHARGEN_PROCESS_ID", "KERAS_DISTRIBUTION_PROCESS_ID", "JOB_COMPLETION_INDEX"],
              type=click.IntRange(0), default=0, show_default=True,
              help="Several processes: this one's number, 0 writes the run directory [env CHARGEN_PROCESS_ID, "
                   "or a Kubernetes Indexed Job's JOB_COMPLETION_INDEX].")
@click.option("--tensorboard", is_flag=True, help="Write TensorBoard logs to OUT/tensorboard.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last evaluation.")
def train(corpus, out, cell, layers, units, embedding, dropout, resume, devices, coordinator, num_processes, process_id,
          input_dropout, output_dropout, embedding_dropout, weight_drop, locked, weight_decay, schedule, warmup,
          min_lr, ema, **kwargs):
    """Train a model on CORPUS; the best checkpoint is kept as OUT/best."""
    _require_keras("train")
    from model.training.distribute import Cluster
    from model.training.train import Terminated, TrainingError, train as run  # Keras comes after its checks

    try:  # what the click types let through (--dropout nan) is caught here
        config = ModelConfig(cell=cell, layers=layers, units=units, embedding=embedding, dropout=dropout)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    recipe = Recipe(input_dropout=input_dropout, output_dropout=output_dropout, embedding_dropout=embedding_dropout,
                    weight_drop=weight_drop, locked=locked, weight_decay=weight_decay, schedule=schedule,
                    warmup=warmup, min_lr=min_lr, ema=ema)
    settings = TrainSettings(corpus=list(corpus), out=out, config=config, recipe=recipe, **kwargs)
    cluster = Cluster(devices=devices, coordinator=coordinator, num_processes=num_processes, process_id=process_id)
    command = "chargen " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        ctx = click.get_current_context()
        # a --preset's values count as given, so that on --resume another preset's are refused, except
        # those a resumed run may change: those keep the run's values unless given on the command line
        source = ctx.get_parameter_source
        explicit = frozenset(name for name in ctx.params if source(name) == click.core.ParameterSource.COMMANDLINE
                             or (source(name) == click.core.ParameterSource.DEFAULT_MAP and name not in RESUMABLE))
        run(settings, cluster=cluster, resume=resume, explicit=explicit, command=command)
    except TrainingError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt as e:  # the command as typed, with --resume: the run keeps its settings, the flags must agree
        from model.training.run_state import STATE_FILE
        from model.training.settings import RUN_FILE

        how = "stopped (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        if not (Path(out) / RUN_FILE).exists():  # stopped before the run was written: nothing to resume
            again = shlex.join([a for a in sys.argv[1:] if a != "--resume"])
            click.echo(f"\n{how} before the run in {out} began; start it again with:\n  {_me()} {again}", err=True)
        else:
            again = shlex.join([*sys.argv[1:], *([] if resume else ["--resume"])])
            kept = "keeps its last evaluation" if (Path(out) / STATE_FILE).exists() else "has no evaluation yet: it starts over"
            click.echo(f"\n{how}; the run in {out} {kept}. Continue it with:\n  {_me()} {again}", err=True)
        sys.exit(128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT))


# ---------------------------------------------------------------- evaluate

_DYNAMIC = DynamicSettings()  # dynamic evaluation's defaults; _finite is defined with sample's options


@main.command()
@click.option("--artifact", "artifact_path", required=True, type=click.Path(),
              help="Artifact directory (or a training run directory: its best/ is used).")
@click.option("--text", "text_path", required=True, type=click.Path(), help="UTF-8 text file to score.")
@click.option("--window", type=click.IntRange(1, 1_000_000), default=256, show_default=True, metavar="CHARS",
              help="Also score the text in consecutive windows of this many predictions, each from a fresh "
                   "state (256: nanoGPT's measure).")
@click.option("--dynamic", is_flag=True,
              help="Also score it with dynamic evaluation: a copy of the weights adapts to the text as it is scored.")
@click.option("--dynamic-segment", type=click.IntRange(1, 100_000), default=_DYNAMIC.segment, show_default=True,
              metavar="CHARS", help="Dynamic evaluation: characters scored between two weight updates.")
@click.option("--dynamic-lr", type=click.FloatRange(0), default=_DYNAMIC.lr, show_default=True,
              callback=lambda *a: _finite(*a),
              help="Dynamic evaluation: size of each gradient step (0: no adaptation).")
@click.option("--dynamic-decay", type=click.FloatRange(0, 1), default=_DYNAMIC.decay, show_default=True,
              callback=lambda *a: _finite(*a),
              help="Dynamic evaluation: share of the way back to the trained weights taken at each update.")
@click.option("--precision", "graph_precision", type=click.Choice(["float32", "int8"]), default="float32", show_default=True,
              help="float32: the Keras network; int8: the artifact's int8 graph (model.int8.onnx) on ONNX Runtime, as "
                   "serving runs it.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of lines for people.")
@click.pass_context
def evaluate(ctx, artifact_path, text_path, window, dynamic, dynamic_segment, dynamic_lr, dynamic_decay, graph_precision,
             as_json):
    """Score a text: nats and bits per character.

    Prints the model's loss on the text in nats and bits per character (lower is better), measured
    two ways: `carried`, with the recurrent state carried through each of the long streams the
    text is cut into (as training reports it, and as sampling runs), and `window`, in consecutive
    windows of --window predictions, each from a fresh state (with 256, the measure nanoGPT
    reports). With --dynamic also `static` and `dynamic`: the text as one stream, scored by the
    trained weights and by a copy adapted after each segment (Krause et al. 2018); the artifact is
    never changed.

    Characters outside the model's vocabulary follow the usual rule: replaced by their unaccented
    form when the vocabulary has it, dropped otherwise; both are counted.
    """
    import json

    from model.training.data import CorpusError, read_text

    given = [f"--{name.replace('_', '-')}" for name in ("dynamic_segment", "dynamic_lr", "dynamic_decay")
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
    if given and not dynamic:
        raise click.UsageError(f"{', '.join(given)}: an option of dynamic evaluation, which runs only with --dynamic")
    if dynamic and graph_precision == "int8":
        raise click.UsageError("--dynamic adapts the Keras network's float32 weights; it does not run with --precision int8")
    settings = DynamicSettings(dynamic_segment, dynamic_lr, dynamic_decay)
    _require_keras("evaluate")
    try:  # everything that needs no model is checked before Keras loads
        text = read_text(text_path)
    except CorpusError as e:
        raise click.ClickException(str(e)) from None
    _, _, vocab = _check_artifact(artifact_path, keras=True)  # scored with the Keras network
    encoded = vocab.encode(text)
    outside = sum(c not in vocab for c in text)
    if len(encoded.ids) < 2:
        raise click.ClickException(
            f"{text_path}: only {len(encoded.ids)} character(s) the model knows; at least 2 are needed to score"
        )

    from model.training.evaluate import StreamScorer, window_loss

    loaded = _load_artifact(artifact_path, keras=True)
    network = loaded.model
    if graph_precision == "int8":  # the int8 graph, checked as serving checks it
        from model.training.evaluate import GraphNetwork

        network = GraphNetwork(_load_artifact(artifact_path, precision="int8").graph)
    scorer = StreamScorer()
    loss = scorer.loss(network, encoded.ids)
    streams = scorer.rows(encoded.ids).shape[0]
    window = min(window, len(encoded.ids) - 1)  # a text shorter than one block is one shorter block
    windowed = window_loss(network, encoded.ids, window)
    result = {
        "artifact": str(loaded.path), "precision": graph_precision, "text": text_path, "chars": len(text),
        "outside_vocabulary": outside, "replaced": outside - encoded.dropped, "dropped": encoded.dropped,
        **loss.to_dict(), "streams": streams,  # the carried-state score
        "window": {"window": window, **windowed.to_dict()},
    }
    if dynamic:
        from model.training.dynamic import dynamic_loss

        if not as_json:
            segments = -(-(len(encoded.ids) - 1) // settings.segment)
            click.echo(f"dynamic evaluation: {segments:,} segments of {settings.segment} characters, one after another",
                       err=True)
        static = StreamScorer(n_streams=1, max_len=len(encoded.ids)).loss(loaded.model, encoded.ids)
        adapted = dynamic_loss(loaded.model, encoded.ids, settings)
        result["dynamic"] = {**settings.to_dict(), "static": static.to_dict(), "dynamic": adapted.to_dict()}
    if as_json:
        click.echo(json.dumps(result))
        return
    config, corpus = loaded.config, loaded.meta.corpus.name if loaded.meta.corpus else "?"

    def line(label: str, measured, how: str) -> None:
        click.echo(f"{label:<9} {measured.nats:.4f} nats/char = {measured.bits:.4f} bits/char "
                   f"({measured.chars:,} characters predicted, {how})")

    graph = "the int8 graph (model.int8.onnx)" if graph_precision == "int8" else "the Keras network (float32)"
    click.echo(f"artifact  {loaded.path}: {config.cell} {config.layers}x{config.units}, "
               f"vocabulary {len(loaded.vocab)}, trained on {corpus}; scored with {graph}")
    click.echo(f"text      {text_path}: {len(text):,} characters, {outside:,} outside the vocabulary "
               f"({result['replaced']:,} replaced by their base form, {encoded.dropped:,} dropped)")
    line("carried", loss, f"state carried through each of {streams} stream{'s' * (streams > 1)}")
    line("window", windowed, f"windows of {window} from a fresh state{', as nanoGPT estimates' * (window == 256)}")
    if dynamic:
        line("static", static, "one stream, trained weights")
        line("dynamic", adapted, f"one stream, weights adapted after each {settings.segment}-character segment "
                                 f"(lr {settings.lr:g}, decay {settings.decay:g})")


# ---------------------------------------------------------------- export


@main.command("export")
@click.option("--artifact", "artifact_path", required=True, type=click.Path(),
              help="Artifact directory (or a training run directory: its best/ is used).")
@click.option("--int8", is_flag=True,
              help="Also add model.int8.onnx, the graph with int8 weights (LSTM artifacts; a GRU or RNN records why it "
                   "has none), scored beside model.onnx on the artifact's validation text (--corpus) or --text; serving "
                   "runs it by default only if it is at most 0.005 nats/char worse.")
@click.option("--corpus", "corpus_path", type=click.Path(dir_okay=False), default=None,
              help="With --int8: the artifact's training corpus (checked against meta.json's sha256); both graphs are "
                   "scored on its validation split, the last characters meta.json's split names.")
@click.option("--text", "text_path", type=click.Path(dir_okay=False), default=None,
              help="With --int8: score both graphs on this UTF-8 text instead (when the corpus is not at hand).")
@click.option("--int8-max-increase", type=float, default=None, hidden=True,
              help="Test-only: the quality gate in nats/char (default: model/records/meta.py's MAX_INT8_LOSS_INCREASE).")
def export_command(artifact_path, int8, corpus_path, text_path, int8_max_increase):
    """Add the ONNX graph (model.onnx) to an artifact made before training wrote one, and with --int8
    its int8 graph (model.int8.onnx).

    The graph is built from the artifact's model.keras and checked against its meta.json. Serving
    runs it with ONNX Runtime, and so can anything else that runs ONNX (onnxruntime-web in a
    browser, for one). A damaged model.onnx is replaced; one that is up to date is left alone.

    With --int8, the int8 graph is made from model.onnx by ONNX Runtime's dynamic quantization,
    and both graphs are scored in windows of 256 on the same text; meta.json records both figures.
    An int8 graph more than 0.005 nats/char worse than float32 is kept but not made the default.
    """
    from model.records.meta import MAX_INT8_LOSS_INCREASE
    from model.runtime import artifact
    from model.training import artifacts

    if not int8 and (corpus_path or text_path or int8_max_increase is not None):
        raise click.UsageError("--corpus, --text: options of --int8, which measures the int8 graph on them")
    if corpus_path and text_path:
        raise click.UsageError("give either --corpus (the artifact's validation text) or --text, not both")
    _require_keras("export")
    try:  # the artifact is checked (without its graph, which may be damaged) before Keras loads
        record = _read_or_none(artifact.resolve(artifact_path) / "meta.json")
        graph, written = artifacts.add_graph(artifact_path)
    except artifact.ArtifactError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:  # a read-only directory, a full disk
        graph = artifact.resolve(artifact_path) / artifact.GRAPH
        raise click.ClickException(f"{graph}: cannot be written: {e.strerror or e}") from None
    if written:
        click.echo(f"wrote {graph} ({_size(graph)}): the ONNX graph of its model.keras, checked against meta.json")
    elif _read_or_none(graph.with_name("meta.json")) != record:
        click.echo(f"{graph} is up to date ({_size(graph)}); its sha256 and vocab.json's recorded in meta.json")
    else:
        click.echo(f"{graph} is up to date ({_size(graph)}); nothing written")
    if not int8:
        return
    path, meta, vocab = _check_artifact(artifact_path, keras=True)
    if meta.config.cell == "lstm":
        ids, described = _int8_text(path, meta, vocab, corpus_path, text_path)
    else:
        ids, described = None, ""  # no int8 graph to score: meta.json records why
    gate = MAX_INT8_LOSS_INCREASE if int8_max_increase is None else int8_max_increase
    try:
        _, info, written = artifacts.add_int8(path, ids, described, gate)
    except (artifact.ArtifactError, ValueError) as e:  # ValueError: a text too short to score
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"{path}: cannot be written: {e.strerror or e}") from None
    target = path / artifact.INT8_GRAPH
    if info.sha256 is not None:
        click.echo(f"{'wrote' if written else 'up to date:'} {target} ({_size(target)}) and its record in meta.json")
    click.echo(info.verdict())
    if info.sha256 is not None and not info.passed:
        raise click.ClickException(f"{path}: int8 is not made the default: {info.verdict()}")


def _size(path: Path) -> str:
    size = path.stat().st_size
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.0f} kB"


def _int8_text(path: Path, meta, vocab, corpus_path: str | None, text_path: str | None):
    """(ids, what they are) that export --int8 scores both graphs on: the artifact's validation text,
    taken from its corpus, or another text."""
    import hashlib

    from model.training.data import CorpusError, read_text

    if corpus_path is None and text_path is None:
        named = f" (meta.json names {meta.corpus.name}, sha256 {meta.corpus.sha256[:12]}...)" if meta.corpus else ""
        raise click.UsageError("--int8 scores both graphs on the artifact's validation text: give its training corpus "
                               f"with --corpus FILE{named}, or another text with --text FILE")
    source = corpus_path or text_path
    try:
        text = read_text(source)
    except CorpusError as e:
        raise click.ClickException(str(e)) from None
    ids = vocab.encode(text).ids
    if text_path:
        return ids, f"{Path(text_path).name}"
    if meta.corpus is None or meta.split is None:
        raise click.ClickException(f"{path}: meta.json records no corpus or split to find the validation text in; "
                                   "score another text with --text FILE")
    digest = hashlib.sha256(Path(corpus_path).read_bytes()).hexdigest()
    if digest != meta.corpus.sha256:
        raise click.ClickException(f"{corpus_path}: not the corpus this artifact was trained on (its sha256 differs from "
                                   f"meta.json's for {meta.corpus.name}); give that file, or another text with --text FILE")
    n = meta.split.validation_chars
    if len(ids) < n or n < 2:
        raise click.ClickException(f"{corpus_path}: {len(ids):,} characters, fewer than the {n:,} validation characters "
                                   "meta.json names; score another text with --text FILE")
    return ids[len(ids) - n:], f"the validation text (the last {n:,} characters of {meta.corpus.name})"


# ---------------------------------------------------------------- prepare


@main.command("prepare")
@click.argument("source")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write the prepared text (UTF-8, \\n newlines) here. Default: nothing for a local file; "
                   "a download goes to its file name in the current directory.")
@click.option("--sha256", "expected_sha256", default=None, metavar="HEX",
              help="Expected sha256 of the source's bytes (known corpora are checked against the manifest anyway).")
@click.option("--force", is_flag=True, help="Replace an existing --out file that holds something else.")
@click.option("--timeout", type=click.FloatRange(0, min_open=True), default=30.0, show_default=True,
              help="Seconds to wait for a server before giving up.")
@click.option("--max-mb", type=click.FloatRange(0, min_open=True), default=512.0, show_default=True,
              help="Refuse downloads larger than this many MiB.")
@click.option("--top", type=click.IntRange(1, 1000), default=10, show_default=True, help="How many of the most frequent characters to show.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of lines for people.")
def prepare_command(source, out, expected_sha256, force, timeout, max_mb, top, as_json):
    """Check, describe and normalize a corpus.

    SOURCE is a file, an http(s) URL, or a known corpus name (corpora/manifest.json, e.g.
    tinyshakespeare). Checks the sha256 of a known corpus, normalizes newlines (\\r\\n and \\r become \\n), and prints
    size, vocabulary and the most frequent characters. A file that is not UTF-8, empty or too short to
    train on is an error.
    """
    import json
    import math

    from model.training.prepare import PrepareError, is_url, load_manifest, prepare, report

    for name, value in (("--timeout", timeout), ("--max-mb", max_mb)):
        if not math.isfinite(value):  # the click type lets nan and inf through
            raise click.BadParameter(f"must be a finite number, got {value}", param_hint=name)
    try:
        manifest = load_manifest()
        if is_url(source) or (not os.path.exists(source) and source in manifest):
            click.echo(f"fetching {source} ...", err=True)
        summary = prepare(source, out=out, expected_sha256=expected_sha256, force=force, timeout=timeout,
                          max_bytes=int(max_mb * 2**20), top=top, manifest=manifest)
    except PrepareError as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(summary.to_dict(), ensure_ascii=False) if as_json else report(summary))


# ---------------------------------------------------------------- sample


def _stop_sequences(ctx, param, value):
    if any(s == "" for s in value):
        raise click.BadParameter("a stop sequence must not be empty")
    return value


def _finite(ctx, param, value):
    if value is not None and not math.isfinite(value):  # the click types let nan through
        raise click.BadParameter(f"{param.name} must be a finite number, got {value}")
    return value


@main.command()
@click.option("--artifact", "artifact_path", required=True, type=click.Path(),
              help="Artifact directory (or a training run directory: its best/ is used).")
@click.option("--prompt", default="", help="Text to continue. Empty: start as if after a newline.")
@click.option("--max-chars", type=click.IntRange(1, 10_000_000), default=DEFAULTS.max_chars, show_default=True,
              help="Most characters to generate.")
@click.option("--temperature", type=click.FloatRange(0, MAX_TEMPERATURE), default=DEFAULTS.temperature, show_default=True,
              callback=_finite, help="Divide the logits by this before sampling; 0 is greedy (the most likely character).")
@click.option("--top-k", type=click.IntRange(0, MAX_TOP_K), default=DEFAULTS.top_k, show_default=True,
              help="Sample only among the K most likely characters (0: off).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=DEFAULTS.top_p, show_default=True, callback=_finite,
              help="Sample only among the fewest most likely characters whose probability reaches P (1: off).")
@click.option("--seed", type=click.IntRange(0), default=None, help="Random seed: the same seed gives the same text (default: a fresh one, shown on stderr).")
@click.option("--stop", multiple=True, callback=_stop_sequences,
              help="End before this text (repeatable; not printed). In bash, a blank line is --stop $'\\n\\n'.")
@click.option("--no-prompt", is_flag=True, help="Print only the continuation.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, envvar="CHARGEN_DEVICE",
              help="Where the network runs: cuda needs onnxruntime-gpu (without it: the CPU, with a warning).")
@click.option("--regex", default=None, metavar="PATTERN",
              help="The continuation must match PATTERN, whole (Rust regex syntax: Python's re without lookaround "
                   "or backreferences).")
@click.option("--grammar", default=None, metavar="FILE|TEXT",
              help="The continuation must match this GBNF grammar (llama.cpp's syntax, start rule root): a file's "
                   "path when such a file exists, else the grammar's text.")
@click.option("--json-schema", default=None, metavar="FILE|JSON",
              help="The continuation must be JSON valid under this schema, laid out as Python's json.dumps writes "
                   "it: a file's path when such a file exists, else the schema's JSON text.")
@click.option("--precision", type=click.Choice(["auto", "int8", "float32"]), default="auto", show_default=True,
              envvar="CHARGEN_PRECISION",
              help="The graph that runs: auto is int8 (model.int8.onnx) where the artifact has one that passed its "
                   "quality gate, float32 (model.onnx) otherwise.")
def sample(artifact_path, prompt, max_chars, temperature, top_k, top_p, seed, stop, no_prompt, device, regex, grammar,
           json_schema, precision):
    """Print the prompt and a sampled continuation, character by character as it is generated.

    With --regex, --grammar or --json-schema (at most one) every character is picked among those
    that keep the text a match; the text ends when the match is complete (or when the model, at a
    complete match that could go on, picks a character that would not continue it), and a note on
    stderr says when --max-chars cut it before its match was complete (exit status 0 still)."""
    from model.runtime.sampling import SamplingSettings

    settings = SamplingSettings(temperature=temperature, top_k=top_k, top_p=top_p)  # the options checked them
    given = [(kind, value) for kind, value in (("regex", regex), ("grammar", grammar), ("json_schema", json_schema))
             if value is not None]
    if len(given) > 1:
        raise click.UsageError("give at most one of --regex, --grammar and --json-schema")
    _check_artifact(artifact_path, precision=precision)

    from model.runtime.engine import Engine
    from model.runtime.streams import GenerationRequest

    artifact = _load_artifact(artifact_path, precision=precision)
    constraint = _constraint(*given[0], artifact.vocab) if given else None
    try:
        engine = Engine(artifact, max_batch=1, device=device)
    except ValueError as e:  # a network the engine cannot run
        raise click.ClickException(f"{artifact_path}: {e}") from None
    stream = engine.start(GenerationRequest(prompt, max_chars=max_chars, sampling=settings, seed=seed, stop=stop,
                                            constraint=constraint))
    if stream.dropped_chars:
        click.echo(f"note: dropped {stream.dropped_chars} prompt character(s) that are not in the model's vocabulary", err=True)
    if seed is None and not settings.greedy:
        click.echo(f"seed: {stream.seed}", err=True)
    if not no_prompt:
        click.echo(prompt, nl=False)
    try:
        while stream.finish_reason is None:
            for delta in engine.step([stream]):
                if delta.text:
                    click.echo(delta.text, nl=False)  # click.echo flushes
    except KeyboardInterrupt:
        engine.cancel(stream)
        click.echo("", err=True)
        sys.exit(130)
    if sys.stdout.isatty():
        click.echo()
    if stream.incomplete and stream.finish_reason == "length":
        click.echo(f"note: --max-chars {max_chars} ended the text before its match was complete", err=True)
    elif stream.incomplete:
        click.echo("note: the text ended before its match was complete: the pattern goes on only with characters "
                   "the model's vocabulary lacks", err=True)


def _constraint(kind: str, value: str, vocab):
    """--regex's pattern, or --grammar's/--json-schema's file (when a file of that name exists) or
    text, compiled over the vocabulary; a ConstraintError is the command's error message."""
    from model.runtime.constraints import ConstraintError, compile_constraint

    option = "--" + kind.replace("_", "-")
    if kind != "regex" and os.path.isfile(value):
        try:
            value = Path(value).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise click.BadParameter(f"cannot read {value}: {e}", param_hint=option) from None
    try:
        return compile_constraint(kind, value, vocab)
    except ConstraintError as e:
        raise click.BadParameter(str(e), param_hint=option) from None


# ---------------------------------------------------------------- serve


@main.command()
@click.option("--bind", default=None, metavar="HOST:PORT", help="Address to listen on (default: $CHARGEN_BIND, else 127.0.0.1:8000).")
@click.option("--host", default=None, help="Host to listen on, keeping the port of $CHARGEN_BIND (else 8000); instead of --bind.")
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="Port to listen on, keeping the host of $CHARGEN_BIND (else 127.0.0.1); instead of --bind.")
@click.option("--workers", type=click.IntRange(1, 256), default=None,
              help="Worker processes, each with its own copy of the model (default: $CHARGEN_WORKERS, else 1).")
@click.option("--artifact", "artifact_path", default=None, type=click.Path(),
              help="Artifact to serve (default: $CHARGEN_ARTIFACT, else artifacts/default).")
def serve(bind, host, port, workers, artifact_path):
    """Serve the model over HTTP: gunicorn with the project's config (service/gunicorn_conf.py).

    Everything else is configured with CHARGEN_* environment variables (see README.md)."""
    if bind is not None and (host is not None or port is not None):
        raise click.UsageError("give either --bind HOST:PORT or --host/--port, not both")
    from service.config import Settings, SettingsError

    if artifact_path:
        os.environ["CHARGEN_ARTIFACT"] = os.path.abspath(artifact_path)
    try:
        settings = Settings.from_env()
        models = settings.models_to_serve()
    except SettingsError as e:
        raise click.ClickException(str(e)) from None
    given = f"--bind {bind}" if bind else f"CHARGEN_BIND={settings.bind}"
    if host is not None or port is not None:
        bind = _host_and_port(host, port, settings.bind)
        # Only a host can fail to resolve (a port is a number by then): name where the host came from.
        given = f"--host {host}" if host is not None else f"CHARGEN_BIND={settings.bind} (its host, with --port {port})"
    # Before gunicorn starts: a port in use would be retried and logged by gunicorn for seconds, and
    # a wrong artifact (a missing or damaged model.onnx included) found by each worker. The address
    # first: the artifact's check loads ONNX Runtime, which takes longer than the rest of the command.
    _check_bind(bind or settings.bind, given)
    # Each artifact's message names the setting it came from, except --artifact's (named on this command line).
    _check_artifacts_apart([("" if artifact_path and source.origin.startswith("CHARGEN_ARTIFACT") else source.origin,
                             source.path) for source in models.sources], settings.precision)
    import gunicorn.app.wsgiapp

    # gunicorn's master runs in this process, not in a child of it: signals reach it directly (a
    # supervisor's SIGTERM, SIGHUP to reload, Ctrl-C) and its exit status is the command's, with no
    # process in between to pass them on. The workers it forks inherit the modules imported here,
    # so ONNX Runtime is not one of them (the artifacts were checked in a child process).
    # argv as `python -m gunicorn` has it. (Its SIGUSR2 re-exec runs that script by path, where
    # gunicorn's own `http` package hides the standard library's: its workers fail to boot. Reload
    # with SIGHUP.)
    sys.argv = [str(Path(gunicorn.__file__).parent / "__main__.py"), "-c", "python:service.gunicorn_conf"]
    if bind:
        sys.argv += ["--bind", bind]
    if workers:
        sys.argv += ["--workers", str(workers)]
    sys.stdout.flush()
    gunicorn.app.wsgiapp.run(prog="gunicorn")


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _check_artifacts_apart(artifacts: list[tuple[str, str]], precision: str) -> None:
    """`serve`'s check of the artifacts (_check_artifact), in a child process: gunicorn's master runs
    in this one and forks the workers, which must not inherit ONNX Runtime from it (loaded in the
    master, it made every worker abort as it exited: "terminate called after throwing an instance
    of 'std::system_error'"). `artifacts`: (where it was configured, for the message, or "", path)."""
    import subprocess

    code = ("import sys, click\nfrom chargen.cli import _check_artifact\ntry:\n"
            "    for where, path in zip(sys.argv[2::2], sys.argv[3::2]):\n"
            "        _check_artifact(path, precision=sys.argv[1])\nexcept click.ClickException as e:\n"
            "    print(f'{where}: {e.message}' if where else e.message)\n    sys.exit(3)\n")
    run = subprocess.run([sys.executable, "-c", code, precision, *(arg for pair in artifacts for arg in pair)],
                         capture_output=True, text=True)
    if run.returncode == 3:
        raise click.ClickException(run.stdout.strip())
    if run.returncode != 0:
        raise click.ClickException(f"the artifact check failed (exit status {run.returncode}): {run.stderr.strip()[-2000:]}")


def _host_and_port(host: str | None, port: int | None, configured: str) -> str:
    """--host/--port as the HOST:PORT address gunicorn reads; the part not given is taken from
    `configured` ($CHARGEN_BIND, else the default)."""
    from gunicorn.util import parse_address

    if host is None or port is None:
        try:
            address = parse_address(configured)
        except RuntimeError as e:
            raise click.ClickException(f"CHARGEN_BIND={configured}: not an address to listen on ({e})") from None
        if not isinstance(address, tuple):  # a unix socket or a file descriptor
            raise click.UsageError(f"CHARGEN_BIND={configured} has no host and port to complete --host/--port with; "
                                   "give both --host and --port, or --bind")
        host = address[0] if host is None else host
        port = address[1] if port is None else port
    host = host.removeprefix("[").removesuffix("]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # an IPv6 host in brackets


def _check_bind(bind: str, given: str) -> None:
    """The address can be listened on now: gunicorn binds it the same way (SO_REUSEADDR), so a port
    another server holds is one line here, not gunicorn's five retries of ERROR lines. (Another
    process could still take it in the moment before gunicorn binds.) `given`: where the address
    came from, for the message about one that is not an address."""
    import errno
    import socket

    from gunicorn.util import parse_address  # the parser gunicorn uses; it imports only the standard library

    if bind.startswith(("unix:", "fd://")):
        return
    try:
        host, port = parse_address(bind)
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (ValueError, RuntimeError, socket.gaierror) as e:
        raise click.ClickException(f"{given}: not an address to listen on ({e})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise click.ClickException(f"{bind} is already in use (another server listens there); "
                                           "choose another with --port PORT or --bind HOST:PORT") from None
            raise click.ClickException(f"cannot listen on {bind}: {e.strerror or e}") from None


# ---------------------------------------------------------------- chargen inspect (issue 23)


@main.command()
@click.option("--artifact", "artifact_path", required=True, type=click.Path(),
              help="Artifact directory (or a training run directory: its best/ is used).")
@click.option("--text", "text_path", required=True, type=click.Path(), help="UTF-8 text file the network reads.")
@click.option("--top", type=click.IntRange(1, 50), default=3, show_default=True, help="Cells shown per feature.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (the ranking and saturation of /v1/inspect).")
def inspect(artifact_path, text_path, top, as_json):
    """Find the cells that learned something, and the saturated gates.

    The network reads the text from the zero state (in pieces, its state carried); for each feature
    of the text (inside quotes, inside brackets, characters since the last newline, position in
    the line, inside a word, upper case, a speaker line `NAME:`) it ranks the cells, hidden and
    cell states of every layer, whose values correlate best with it (Pearson's r, by |r|, sign
    kept), and shows how often each gate is saturated: a sigmoid gate below 0.1 (shut) or above
    0.9 (wide open), a tanh value below -0.9 or above 0.9. Runs the artifact's model.onnx weights
    with numpy: no Keras needed.
    """
    import json

    import numpy as np

    from model.records.vocab import normalize_newlines

    try:
        text = Path(text_path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise click.ClickException(f"{text_path}: not UTF-8 text") from None
    except OSError as e:
        raise click.ClickException(f"{text_path}: cannot be read: {e.strerror or e}") from None
    artifact = _load_artifact(artifact_path, precision="float32")  # model.onnx's weights are what it reads, whatever serves

    from model.runtime.cells import FEATURES, report, statistics
    from model.runtime.inside import Network

    vocab, config = artifact.vocab, artifact.config
    encoded = vocab.encode(text)
    if len(encoded.ids) < 2:
        raise click.ClickException(f"{text_path}: only {len(encoded.ids)} character(s) the model knows; at least 2 are needed")
    outside = sum(c not in vocab for c in normalize_newlines(text))
    network = Network.from_graph(artifact.onnx_path, config.cell, config.layers)
    ids = np.asarray(encoded.ids, np.int64)
    found = report(statistics(network, ids, vocab.decode(ids)), top)
    summary = {"artifact": str(artifact.path), "cell_type": config.cell, "units": config.units, "num_layers": config.layers,
               "text": str(text_path), "chars": len(ids), "replaced": outside - encoded.dropped, "dropped": encoded.dropped}
    if as_json:
        click.echo(json.dumps({**summary, **found}, ensure_ascii=False))
        return
    click.echo(f"{artifact.path}: {config.layers} x {config.units} {config.cell}; {text_path}: {len(ids):,} characters read "
               f"({summary['replaced']} replaced, {encoded.dropped} dropped)")
    click.echo("")
    width = max(len(label) for label in FEATURES.values())
    click.echo(f"{'feature':<{width}}  best cells by |r| (layer, state, cell: r)")
    for row in found["ranking"]:
        cells = "   ".join(f"L{c['layer']} {c['quantity']} {c['cell']}: {c['r']:+.2f}" for c in row["cells"])
        click.echo(f"{row['label']:<{width}}  {cells or '(constant in this text: no correlation)'}")
    click.echo("")
    click.echo("gates, most often saturated first (share of values shut: < 0.1, tanh < -0.9; wide open: > 0.9)")
    click.echo(f"{'layer':>5}  {'gate':<13} {'shut':>6} {'open':>6} {'both':>6}")
    for s in sorted(found["saturation"], key=lambda s: -(s["low"] + s["high"])):
        click.echo(f"{s['layer']:>5}  {s['gate']:<13} {s['low']:>6.1%} {s['high']:>6.1%} {s['low'] + s['high']:>6.1%}")
