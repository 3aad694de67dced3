"""Training: every cell learns, the run directory's files, early stopping, --max-minutes (an
evaluation it cuts short is never the best), TensorBoard, a resumed run tidying what a killed one left behind, and a
published artifact never written to again."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import PERIODIC, train_tiny, words

from model.runtime import artifact
from model.training import artifacts
from model.records.config import ModelConfig
from model.training.budget import Budget
from model.training.train import TrainSettings, train


def greedy(loaded: artifact.Artifact, prompt: str, max_chars: int) -> str:
    """The argmax continuation, straight from the network's logits. The network is causal, so the
    logits at position t depend only on characters 0..t: a fixed-size buffer keeps one shape."""
    start = len(prompt)
    ids = np.zeros((1, start + max_chars), dtype=np.int32)
    ids[0, :start] = loaded.vocab.encode(prompt).ids
    for t in range(start, start + max_chars):
        logits = keras.ops.convert_to_numpy(loaded.model.predict_on_batch(ids))  # (1, T, V)
        ids[0, t] = logits[0, t - 1].argmax()
    return loaded.vocab.decode(ids[0, start:])


def greedy_onnx(loaded: artifact.Artifact, prompt: str, max_chars: int) -> str:
    """The same from the model.onnx training wrote, run by ONNX Runtime one character at a time."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(loaded.onnx_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()][1:]  # h (and c): the states
    state = {n: np.zeros((loaded.config.layers, 1, loaded.config.units), np.float32) for n in names}
    ids, out = loaded.vocab.encode(prompt).ids[None].astype(np.int64), []
    for _ in range(max_chars):
        logits, *states = sess.run(None, {"ids": ids, **state})
        state = dict(zip(names, states))
        ids = logits[:, -1].argmax(axis=-1)[:, None]
        out.append(int(ids[0, 0]))
    return loaded.vocab.decode(out)


@pytest.fixture(scope="module")
def cells(tmp_path_factory, tiny_artifact) -> dict[str, Path]:
    """A one-layer network of each cell trained on PERIODIC (the LSTM is the session's tiny_artifact)."""
    runs = {"lstm": tiny_artifact}
    for cell in ("gru", "rnn"):
        runs[cell] = train_tiny(tmp_path_factory.mktemp(cell) / "run", PERIODIC * 120, cell=cell, epochs=10)
    return runs


@pytest.mark.slow  # `cells` trains a network of each other cell
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_each_cell_learns_a_periodic_text(cells, cell):
    loaded = artifacts.load_keras(cells[cell])
    assert loaded.config.cell == cell and loaded.config.layers == 1
    assert loaded.meta.validation.nats_per_char < 0.05
    prompt = PERIODIC[:20]  # past "the quick", so the next "the" is known to be "the lazy"
    expected = (PERIODIC * 3)[20 : 20 + 2 * len(PERIODIC)]
    assert greedy(loaded, prompt, len(expected)) == expected
    assert greedy_onnx(loaded, prompt, len(expected)) == expected  # training wrote the same network as model.onnx


def test_run_directory_files(tiny_artifact):
    run = tiny_artifact.parent
    history = json.loads((run / "history.json").read_text())
    assert [row["epoch"] for row in history] == list(range(1, 26))
    for row in history:
        assert row["train_bits_per_char"] == pytest.approx(row["train_nats_per_char"] / np.log(2), abs=1e-4)
        assert row["val_bits_per_char"] == pytest.approx(row["val_nats_per_char"] / np.log(2), abs=1e-4)
        assert row["seconds"] >= 0 and row["chars_per_second"] > 0 and row["partial"] is False
    assert history[-1]["val_nats_per_char"] < history[0]["val_nats_per_char"] / 10
    with open(run / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 26))
    assert float(rows[4]["val_nats_per_char"]) == history[4]["val_nats_per_char"]
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the best artifact is the epoch with the lowest validation loss, and the only one kept
    best_epoch = min(history, key=lambda row: row["val_nats_per_char"])["epoch"]
    assert os.readlink(run / "best") == f"artifacts/epoch-{best_epoch:03d}"
    assert [p.name for p in (run / "artifacts").iterdir()] == [f"epoch-{best_epoch:03d}"]
    meta = json.loads((run / "best" / "meta.json").read_text())
    assert meta["validation"]["epoch"] == best_epoch
    # the artifact holds the history as of its epoch; the run directory has every epoch
    assert json.loads((run / "best" / "history.json").read_text()) == history[:best_epoch]
    assert (run / "best" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    state = json.loads((run / "state.json").read_text())
    assert state["epoch"] == 25 and state["best"]["artifact"] == f"artifacts/epoch-{best_epoch:03d}"
    run_json = json.loads((run / "run.json").read_text())
    assert run_json["config"]["cell"] == "lstm" and run_json["seq_len"] == 40 and run_json["command"] == "test"
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]
    assert not (run / "tensorboard").exists()  # only on request


def test_max_minutes_stops_mid_epoch_with_a_valid_artifact(tmp_path, capsys):
    text = PERIODIC * 60  # 2,430 training characters: 7 batches of 8 windows of 40
    # a budget shorter than the time kept for saving: the training deadline has passed before the
    # first batch ends, however fast this machine is (each invocation still trains one batch)
    best = train_tiny(tmp_path / "run", text, max_minutes=Budget.SAVING_GUESS / 2 / 60)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(history) == 1 and history[0]["partial"] is True
    checkpoint = keras.saving.load_model(tmp_path / "run" / "checkpoint.keras", compile=True, safe_mode=True)
    assert 1 <= int(keras.ops.convert_to_numpy(checkpoint.optimizer.iterations)) < 7
    loaded = artifact.load(best)
    assert loaded.meta.training.epochs == 1
    # it stopped mid-epoch; a resumed run would continue from that step with the batches of epoch 1
    assert re.search(r"stopped \(max-minutes\) after step \d \(epoch 0\.\d+\)", capsys.readouterr().out)


def test_a_cut_short_evaluation_is_recorded_as_partial_and_never_chosen(tmp_path, monkeypatch):
    """An evaluation that --max-minutes cuts short scored a prefix of the validation text: it is
    kept in the history as partial with the characters it covered, but never becomes the best
    artifact, the validation loss in meta.json or a point on loss.png. The first evaluation is never
    cut, so the run's artifact holds a whole score: the one `chargen evaluate` gives on the same
    split. (The deadline is made to pass at once; each evaluation is cut after one network call.)"""
    from chargen.cli import main
    from click.testing import CliRunner

    from model.training.validation import Validation

    monkeypatch.setattr(Budget, "validate_until", lambda self: 0.0)
    monkeypatch.setattr(Validation, "CALL_BYTES", 1)  # one stream a network call: 64 calls an evaluation
    run = tmp_path / "run"
    text = words(20_000, seed=5)
    (tmp_path / "words.txt").write_text(text)
    given = TrainSettings(corpus=str(tmp_path / "words.txt"), out=str(run), config=ModelConfig(units=32, layers=1, embedding=8),
                          seq_len=50, batch_size=16, lr=1e-2, epochs=3, patience=0, max_minutes=60, sample_chars=0)
    train(given, verbose=0)

    history = json.loads((run / "history.json").read_text())
    whole = history[0]["val_chars_scored"]
    assert [row["val_partial"] for row in history] == [False, True, True]
    assert all(0 < row["val_chars_scored"] < whole for row in history[1:])
    meta = artifact.load(run).meta
    assert meta.validation.epoch == 1 and meta.validation.chars_scored == whole and not meta.validation.sample
    assert meta.validation.nats_per_char == history[0]["val_nats_per_char"]
    assert json.loads((run / "state.json").read_text())["best"]["artifact"] == "artifacts/epoch-001"
    with open(run / "history.csv", newline="") as f:
        assert [row["val_partial"] for row in csv.DictReader(f)] == ["False", "True", "True"]

    validation = tmp_path / "validation.txt"
    validation.write_text(text[-meta.split.validation_chars:])
    result = CliRunner().invoke(main, ["evaluate", "--artifact", str(run), "--text", str(validation), "--json"])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.output.splitlines()[-1])
    assert scored["chars_scored"] == whole and scored["nats_per_char"] == pytest.approx(meta.validation.nats_per_char, abs=2e-5)


def test_budget_keeps_room_for_validation_and_saving():
    budget = Budget(1000.0, 100 / 60)  # 100 s from t=1000
    assert not Budget(1000.0, None) and budget
    assert Budget(1000.0, None).train_until() == Budget(1000.0, None).validate_until() == math.inf
    assert budget.train_until() == 1100 - Budget.SAVING_GUESS  # nothing known about validation yet
    budget.validated(seconds=1.0, scored=10, whole=100)  # a tenth took 1 s: all of it takes 10 s
    assert budget.validation == 10.0
    assert budget.train_until() == 1100 - Budget.SAVING_GUESS - 10
    assert budget.validate_until() == 1100 - Budget.SAVING_GUESS
    budget.saved(3.0)
    budget.saved(1.0)  # the slowest saving so far is kept
    assert budget.train_until() == 1100 - 3 - 10
    # validation is never given less than it takes: a partial score could not be compared with others
    budget.validated(seconds=120.0, scored=100, whole=100)
    assert budget.train_until() == 1100 - 3 - 120 < 1000


def test_tensorboard_logs_on_request(tmp_path):
    train_tiny(tmp_path / "run", PERIODIC * 10, epochs=2, tensorboard=True)
    events = list((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)


# ---------------------------------------------------------------- early stopping and resuming


def settings(tmp_path: Path, text: str, **kw) -> TrainSettings:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    defaults = dict(config=ModelConfig(cell="gru", layers=1, units=32, embedding=16), seq_len=40, batch_size=8,
                    lr=1e-2, lr_decay=1.0, epochs=30, patience=2)
    return TrainSettings(corpus=str(corpus), out=str(tmp_path / "run"), **{**defaults, **kw})


@pytest.mark.slow
def test_early_stopping_then_resume_does_not_train_more(tmp_path, capsys):
    # Train on a periodic text, validate on its words in random order: the validation loss improves
    # while the network learns the words, then gets worse as it grows sure of their order.
    rng = np.random.default_rng(0)
    noise = " ".join(rng.choice(PERIODIC.split(), 80))[:300]
    run = tmp_path / "run"
    train(settings(tmp_path, PERIODIC * 60 + noise), verbose=0)
    history = json.loads((run / "history.json").read_text())
    val = [row["val_nats_per_char"] for row in history]
    best_epoch = int(np.argmin(val)) + 1
    assert 1 < best_epoch and len(history) < 30
    assert len(history) == best_epoch + 2  # patience 2: two epochs without improvement, then stop
    assert os.readlink(run / "best") == f"artifacts/epoch-{best_epoch:03d}"
    assert "no improvement for 2 epochs (patience 2)" in capsys.readouterr().out
    # the artifact was written once, at its epoch: the two epochs after it did not touch it
    assert json.loads((run / "best" / "history.json").read_text()) == history[:best_epoch]
    published = {p.name: p.read_bytes() for p in (run / "best").iterdir()}

    # A run killed between saving a new best artifact and recording it in state.json leaves an
    # unrecorded artifact that `best` points to, plus temporary files; --resume tidies them away.
    stray = run / "artifacts" / "epoch-099"
    shutil.copytree(run / "best", stray)
    artifacts.point(run / "best", stray)
    (run / "artifacts" / ".epoch-100.tmp-x1y2").mkdir()
    (run / ".tmp-checkpoint.keras").write_bytes(b"half")
    (run / ".state.json.tmp").write_text("{")

    before = (run / "state.json").read_text()
    train(settings(tmp_path, PERIODIC * 60 + noise), resume=True, verbose=0)
    assert (run / "state.json").read_text() == before  # no further epoch: it had already stopped
    assert "resuming" in capsys.readouterr().out
    assert os.readlink(run / "best") == f"artifacts/epoch-{best_epoch:03d}"
    assert sorted(p.name for p in (run / "artifacts").iterdir()) == [f"epoch-{best_epoch:03d}"]
    assert not [p for p in run.iterdir() if ".tmp" in p.name]

    # with more patience it goes on from where it stopped, keeping the optimizer's step count
    train(settings(tmp_path, PERIODIC * 60 + noise, patience=3), resume=True, verbose=0)
    after = json.loads((run / "history.json").read_text())
    assert [row["epoch"] for row in after] == list(range(1, len(history) + 2))
    if os.readlink(run / "best") == f"artifacts/epoch-{best_epoch:03d}":  # still the best: untouched
        assert {p.name: p.read_bytes() for p in (run / "best").iterdir()} == published
    steps = (int(len(PERIODIC * 60 + noise) * 0.9) // 40) // 8
    checkpoint = keras.saving.load_model(run / "checkpoint.keras", compile=True, safe_mode=True)
    assert int(keras.ops.convert_to_numpy(checkpoint.optimizer.iterations)) == len(after) * steps


# ---------------------------------------------------------------- steps, samples, resuming mid-epoch


def step_settings(tmp_path: Path, **kw) -> TrainSettings:
    corpus = tmp_path / "words.txt"
    if not corpus.exists():
        tmp_path.mkdir(parents=True, exist_ok=True)
        corpus.write_text(words(6_000, seed=3))  # 5,400 training characters: 13 steps of 8 windows of 50 per epoch
    defaults = dict(config=ModelConfig(cell="lstm", layers=2, units=24, embedding=8, dropout=0.3), seq_len=50,
                    batch_size=8, lr=5e-3, lr_decay=0.9, epochs=3, patience=0, eval_every=4, eval_chars=300)
    return TrainSettings(corpus=str(corpus), out=str(tmp_path / "run"), **{**defaults, **kw})


class Killed(Exception):
    """What a kill -9 after optimizer step `at` would leave, raised from inside fit()."""


def killing_at(at: int, monkeypatch):
    import model.training.train as training

    made = training._callbacks

    def callbacks(*args, **kw):
        class Kill(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                if int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)) == at:
                    raise Killed(at)

        return made(*args, **kw) + [Kill()]

    monkeypatch.setattr(training, "_callbacks", callbacks)


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_with_the_batches_it_would_have_had(tmp_path, monkeypatch):
    """Evaluations (and checkpoints) every 4 steps of 13-step epochs: killed at step 10, the run goes
    back to its checkpoint at step 8, in the middle of epoch 1, and finishes with the same weights
    and losses as a run that was never interrupted (dropout included)."""
    whole = train(step_settings(tmp_path / "a"), verbose=0)
    history = json.loads((whole.parent / "history.json").read_text())
    assert [row["step"] for row in history] == [4, 8, 12, 16, 20, 24, 28, 32, 36, 39]
    assert history[3]["epoch"] == round(16 / 13, 4) and history[-1]["epoch"] == 3
    assert all(row["val_chars_scored"] == history[0]["val_chars_scored"] for row in history)  # the same sample

    killing_at(10, monkeypatch)
    with pytest.raises(Killed):
        train(step_settings(tmp_path / "b"), verbose=0)
    run = tmp_path / "b" / "run"
    assert json.loads((run / "state.json").read_text())["step"] == 8
    monkeypatch.undo()
    train(step_settings(tmp_path / "b"), resume=True, verbose=0)

    resumed = json.loads((run / "history.json").read_text())
    assert [row["step"] for row in resumed] == [row["step"] for row in history]
    for a, b in zip(history, resumed):
        for key in ("train_nats_per_char", "val_nats_per_char", "learning_rate"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    one = keras.saving.load_model(whole.parent / "checkpoint.keras", compile=True, safe_mode=True)
    other = keras.saving.load_model(run / "checkpoint.keras", compile=True, safe_mode=True)
    for w, v in zip(one.get_weights(), other.get_weights()):
        np.testing.assert_allclose(v, w, rtol=1e-5, atol=1e-6)
    assert os.readlink(run / "best") == os.readlink(whole.parent / "best")


@pytest.mark.slow
def test_max_steps_and_a_resumed_run_that_raises_it(tmp_path):
    given = step_settings(tmp_path, max_steps=6, eval_every=None)  # evaluations at epoch ends, and at the stop
    train(given, verbose=0)
    run = tmp_path / "run"
    history = json.loads((run / "history.json").read_text())
    assert [(row["step"], row["partial"]) for row in history] == [(6, False)]
    assert os.readlink(run / "best") == "artifacts/step-00000006"  # mid-epoch
    train(step_settings(tmp_path, max_steps=20, eval_every=None), resume=True, verbose=0)
    history = json.loads((run / "history.json").read_text())
    assert [row["step"] for row in history] == [6, 13, 20]
    assert [row["epoch"] for row in history] == [round(6 / 13, 4), 1, round(20 / 13, 4)]
    assert sorted(p.name for p in (run / "artifacts").iterdir()) in (["epoch-001"], ["step-00000006"], ["step-00000020"])
    loaded = artifact.load(run)  # the step is in its history; its meta.json counts epochs begun
    step = json.loads((loaded.path / "history.json").read_text())[-1]["step"]
    assert loaded.meta.training.epochs == loaded.meta.validation.epoch == math.ceil(step / 13)


@pytest.mark.slow
def test_a_long_validation_text_is_sampled_then_scored_whole_at_the_end(tmp_path, capsys):
    given = step_settings(tmp_path, validation_fraction=0.5, eval_chars=1_000, max_steps=4, epochs=1)
    train(given, verbose=0)
    out = capsys.readouterr().out
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history[0]["val_chars_scored"] == 999  # one piece of 1,000 characters (two would be under 512 each)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    whole = state["best"]["whole_validation"]
    assert whole["chars_scored"] == 5 * 599  # five streams of 600 (each of at least 512 characters)
    assert "validation on the sample" in out and "whole validation text, 2,995 characters" in out
    assert artifact.load(tmp_path / "run").meta.validation.sample is True
    # with --eval-chars all there is nothing left to score at the end
    train(step_settings(tmp_path / "all", validation_fraction=0.5, eval_chars=None, max_steps=4, epochs=1), verbose=0)
    state = json.loads((tmp_path / "all" / "run" / "state.json").read_text())
    assert "whole_validation" not in state["best"]
    assert json.loads((tmp_path / "all" / "run" / "history.json").read_text())[0]["val_chars_scored"] == 2995


def test_a_cut_short_whole_validation_is_not_recorded_and_resume_scores_it(tmp_path, monkeypatch, capsys):
    """Evaluations score a sample of the validation text; at the end the best model is scored on all
    of it within what is left of --max-minutes. When the budget cuts that short, the prefix's loss is
    not recorded as the whole text's; --resume scores it."""
    from model.training.validation import Validation

    with monkeypatch.context() as patched:
        patched.setattr(Budget, "validate_until", lambda self: 0.0)
        patched.setattr(Validation, "CALL_BYTES", 1)  # one stream a network call
        train(step_settings(tmp_path, validation_fraction=0.5, eval_chars=1_000, max_steps=4, epochs=1, max_minutes=60),
              verbose=0)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert "whole_validation" not in state["best"]
    assert "whole validation text: --max-minutes ran out before it could be scored" in capsys.readouterr().out
    assert artifact.load(tmp_path / "run").meta.validation.sample is True  # the sample's loss, labelled

    train(step_settings(tmp_path, validation_fraction=0.5, eval_chars=1_000, max_steps=4, epochs=1), resume=True, verbose=0)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["best"]["whole_validation"]["chars_scored"] == 5 * 599
    assert "whole validation text, 2,995 characters" in capsys.readouterr().out


def test_mixed_precision_trains_and_publishes_float32(tmp_path):
    best = train(step_settings(tmp_path, precision="mixed_bfloat16", max_steps=4, epochs=1), verbose=0)
    checkpoint = keras.saving.load_model(tmp_path / "run" / "checkpoint.keras", compile=True, safe_mode=True)
    assert checkpoint.get_layer("rnn_1").compute_dtype == "bfloat16"
    assert checkpoint.get_layer("logits").compute_dtype == "float32"  # Keras' advice for the last layer
    loaded = artifacts.load_keras(best)
    assert {layer.dtype_policy.name for layer in loaded.model.layers} == {"float32"}
    assert {w.dtype for w in loaded.model.get_weights()} == {np.dtype("float32")}
    assert loaded.onnx_path is not None and loaded.meta.validation.nats_per_char > 0


@pytest.mark.slow
def test_a_second_run_reuses_the_token_file_and_a_changed_corpus_is_noticed(tmp_path, capsys):
    data = tmp_path / "shared-data"
    train(step_settings(tmp_path, max_steps=2, epochs=1, data=str(data)), verbose=0)
    assert "prepared words.txt" in capsys.readouterr().out
    tokens = (data / "tokens.bin").stat()
    other = step_settings(tmp_path, max_steps=2, epochs=1, data=str(data))
    other.out = str(tmp_path / "other")
    train(other, verbose=0)
    assert f"reusing the token file in {data} (the same files" in capsys.readouterr().out
    assert (data / "tokens.bin").stat().st_mtime_ns == tokens.st_mtime_ns
    (tmp_path / "words.txt").write_text(words(6_000, seed=4))
    from model.training.train import TrainingError

    with pytest.raises(TrainingError, match="has changed since the run started"):
        train(step_settings(tmp_path, max_steps=4, epochs=1, data=str(data)), resume=True, verbose=0)
