"""Dynamic evaluation (model/training/dynamic.py, `chargen evaluate --dynamic`): a copy of the weights adapts
to the text as it is scored, on TensorFlow and on JAX; with lr 0 it is the static one-stream score;
the artifact is never changed."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import OTHER, PERIODIC

from chargen.cli import main
from model.training.dynamic import DynamicSettings

ROOT = Path(__file__).resolve().parents[1]
TEXT = OTHER * 25  # repetitive, and not what tiny_artifact learned: there is something to adapt to

# Run under each backend: for the tiny trained LSTM and an untrained 2-layer GRU with dropout (one
# state per layer, a Dropout layer to leave out), the one-stream static score, dynamic evaluation
# with lr 0, adapting with and without decay, and whether the network given was changed.
MEASURE = """
import json, sys
import keras, numpy as np
from model.training import artifacts
from model.training.dynamic import DynamicSettings, dynamic_loss
from model.training.evaluate import StreamScorer
from model.records.config import ModelConfig
from model.training.network import build_model

loaded = artifacts.load_keras(sys.argv[1])
ids = loaded.vocab.encode(sys.argv[2]).ids
gru = build_model(ModelConfig(cell="gru", layers=2, units=24, embedding=8, dropout=0.5), len(loaded.vocab))
rng = np.random.default_rng(7)  # the same weights on both backends
gru.set_weights([rng.uniform(-0.3, 0.3, w.shape).astype(np.float32) for w in gru.get_weights()])
results = {"backend": keras.backend.backend()}
for name, model in {"lstm": loaded.model, "gru": gru}.items():
    before = [w.copy() for w in model.get_weights()]
    static = StreamScorer(n_streams=1, max_len=len(ids)).loss(model, ids)
    frozen = dynamic_loss(model, ids, DynamicSettings(segment=37, lr=0.0, decay=0.0))
    adapted = dynamic_loss(model, ids, DynamicSettings(segment=37, lr=0.01, decay=0.0))
    pulled = dynamic_loss(model, ids, DynamicSettings(segment=37, lr=0.01, decay=1.0))
    unchanged = all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    results[name] = {"static": static.nats, "frozen": frozen.nats, "adapted": adapted.nats, "pulled": pulled.nats,
                     "chars": [static.chars, frozen.chars, adapted.chars], "unchanged": unchanged}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def measured(tiny_artifact) -> dict[str, dict]:
    """MEASURE's figures on each backend, each run in its own process."""
    figures = {}
    for backend in ("tensorflow", "jax"):
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
        result = subprocess.run([sys.executable, "-c", MEASURE, str(tiny_artifact), TEXT],
                                capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        figures[backend] = json.loads(result.stdout.strip().splitlines()[-1])
        assert figures[backend]["backend"] == backend
    return figures


@pytest.mark.slow  # `measured`: dynamic evaluation in a process per backend
@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
@pytest.mark.parametrize("network", ["lstm", "gru"])
def test_adapting_lowers_the_loss_and_lr_0_is_the_static_score(measured, backend, network):
    m = measured[backend][network]
    assert m["chars"] == [len(TEXT) - 1] * 3  # every character but the first, 37 at a time
    assert m["frozen"] == pytest.approx(m["static"], abs=1e-5)
    assert m["adapted"] < 0.85 * m["static"]  # it learns the repeated line as it goes
    # decay 1 takes every update back to the trained weights first: one step of adaptation, no memory
    assert m["adapted"] < m["pulled"] < m["static"]
    assert m["unchanged"]  # the network given keeps its weights


@pytest.mark.slow
@pytest.mark.parametrize("network", ["lstm", "gru"])
def test_both_backends_take_the_same_steps(measured, network):
    """The same update on TensorFlow and JAX (TensorFlow hands the embedding's gradient over as
    slices, and traces the optimizer's first build: either, mishandled, changes the figures)."""
    tf, jax = measured["tensorflow"][network], measured["jax"][network]
    for name in ("static", "adapted", "pulled"):
        assert tf[name] == pytest.approx(jax[name], rel=1e-3), name


def evaluate(*args: str):
    result = CliRunner().invoke(main, ["evaluate", *args])
    assert "Traceback" not in result.output, result.output
    return result


def digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


@pytest.mark.slow
def test_the_command_prints_static_and_dynamic_and_leaves_the_artifact_alone(tiny_artifact, tmp_path):
    text = tmp_path / "other.txt"
    text.write_text(TEXT)
    before = digests(tiny_artifact)
    result = evaluate("--artifact", str(tiny_artifact), "--text", str(text), "--dynamic", "--dynamic-lr", "0.01",
                      "--dynamic-segment", "40", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    dynamic = data["dynamic"]
    assert (dynamic["segment"], dynamic["lr"], dynamic["decay"]) == (40, 0.01, DynamicSettings().decay)
    assert dynamic["static"]["chars_scored"] == dynamic["dynamic"]["chars_scored"] == len(TEXT) - 1
    assert dynamic["dynamic"]["nats_per_char"] < 0.7 * dynamic["static"]["nats_per_char"]
    assert data["nats_per_char"] > 0 and data["window"]["window"] == 256  # both static measures are there too

    result = evaluate("--artifact", str(tiny_artifact), "--text", str(text), "--dynamic", "--dynamic-lr", "0.01")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["artifact", "text", "carried", "window", "static", "dynamic"]
    assert "one stream, trained weights" in lines[4]
    assert "weights adapted after each 50-character segment (lr 0.01, decay" in lines[5]
    assert "segments of 50 characters" in result.stderr
    assert digests(tiny_artifact) == before  # model.keras, model.onnx, meta.json, ... byte for byte


def test_without_dynamic_there_is_no_dynamic_score(tiny_artifact, tmp_path):
    (tmp_path / "t.txt").write_text(PERIODIC * 3)
    data = json.loads(evaluate("--artifact", str(tiny_artifact), "--text", str(tmp_path / "t.txt"), "--json").stdout)
    assert "dynamic" not in data


@pytest.mark.parametrize("args, problem", [
    (["--dynamic-lr", "0.01"], "--dynamic-lr: an option of dynamic evaluation, which runs only with --dynamic"),
    (["--dynamic-segment", "20", "--dynamic-decay", "0.1"], "--dynamic-segment, --dynamic-decay: an option of dynamic"),
    (["--dynamic", "--dynamic-lr", "nan"], "dynamic_lr must be a finite number, got nan"),
    (["--dynamic", "--dynamic-lr", "-1"], "-1.0 is not in the range x>=0"),
    (["--dynamic", "--dynamic-decay", "1.5"], "1.5 is not in the range 0<=x<=1"),
    (["--dynamic", "--dynamic-decay", "nan"], "dynamic_decay must be a finite number"),
    (["--dynamic", "--dynamic-segment", "0"], "0 is not in the range 1<=x<=100000"),
    (["--window", "0"], "0 is not in the range 1<=x<=1000000"),
])
def test_bad_options(tiny_artifact, tmp_path, args, problem):
    (tmp_path / "t.txt").write_text(PERIODIC)
    result = evaluate("--artifact", str(tiny_artifact), "--text", str(tmp_path / "t.txt"), *args)
    assert result.exit_code == 2 and problem in result.output, result.output


@pytest.mark.parametrize("kwargs, problem", [
    ({"segment": 0}, "segment must be a positive whole number"),
    ({"segment": 2.5}, "segment must be a positive whole number"),
    ({"lr": -0.1}, "lr must be a number at least 0"),
    ({"lr": float("inf")}, "lr must be a number at least 0"),
    ({"decay": 1.01}, "decay must be in [0, 1]"),
    ({"decay": float("nan")}, "decay must be in [0, 1]"),
])
def test_settings_are_checked(kwargs, problem):
    with pytest.raises(ValueError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        DynamicSettings(**kwargs)
