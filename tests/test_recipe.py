"""The training recipe (model/training/recipe.py): weight drop and every dropout change training only (the
network served is the plain one, the same weights); locked dropout shares its mask over time; the
learning-rate schedules; AdamW leaving biases alone; the moving average of the weights is what is
validated and published while training goes on from the raw weights; run.json and meta.json record
the recipe and --resume keeps it; --preset; bad values refused before Keras loads; and a run with
every recipe flag on trains on both backends."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import words

from chargen.cli import main
from model.runtime import artifact
from model.training import artifacts
from model.records.config import ModelConfig
from model.training.network import build_model, cell_layer, copy_weights, trainable_weights
from model.records.config import Recipe
from model.training.recipe import _classes, averaged_weights, custom_objects, optimizer
from model.training.settings import read_run
from model.training.train import RUN_FILE, TrainingError, TrainSettings, prepare

ROOT = Path(__file__).resolve().parents[1]
CHARGEN = str(Path(sys.executable).with_name("chargen"))
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}

# Every recipe flag on at once (two layers, so --dropout has somewhere to go).
ALL_FLAGS = ["--layers", "2", "--units", "16", "--embedding", "8", "--dropout", "0.2", "--input-dropout", "0.1",
             "--output-dropout", "0.2", "--embedding-dropout", "0.1", "--weight-drop", "0.3", "--locked",
             "--weight-decay", "0.1", "--schedule", "cosine", "--warmup", "2", "--min-lr", "0.2", "--ema", "0.9"]
ALL_RECIPE = Recipe(input_dropout=0.1, output_dropout=0.2, embedding_dropout=0.1, weight_drop=0.3, locked=True,
                    weight_decay=0.1, schedule="cosine", warmup=2, min_lr=0.2, ema=0.9)
SMALL = ["--seq-len", "40", "--batch-size", "8", "--lr", "0.01"]


def invoke(*args: str):
    result = CliRunner().invoke(main, list(args))
    assert "Traceback" not in result.output, result.output
    return result


def numpy(x) -> np.ndarray:
    return keras.ops.convert_to_numpy(x)


def load_checkpoint(run: Path) -> keras.Model:
    return keras.saving.load_model(run / "checkpoint.keras", compile=True, safe_mode=True,
                                   custom_objects=custom_objects())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "words.txt"
    path.write_text(words(4000))  # 3,600 training characters: 11 steps of 8 windows of 40; 400 to validate
    return path


# ---------------------------------------------------------------- weight drop and dropout: training only


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_weight_drop_changes_training_calls_only(cell):
    keras.utils.set_random_seed(0)
    config = ModelConfig(cell=cell, layers=2, units=16, embedding=8)
    dropped, plain = build_model(config, 12, Recipe(weight_drop=0.5)), build_model(config, 12)
    assert type(dropped.get_layer("rnn_1")).__name__ == f"WeightDropped{cell_layer(cell).__name__}"
    assert type(plain.get_layer("rnn_1")) is cell_layer(cell)
    copy_weights(trainable_weights(dropped), plain)
    kernels = [numpy(dropped.get_layer(f"rnn_{i}").cell.recurrent_kernel) for i in (1, 2)]

    ids = np.random.default_rng(0).integers(0, 12, (3, 25)).astype("int32")
    inference = numpy(dropped(ids, training=False))
    np.testing.assert_allclose(inference, numpy(plain(ids, training=False)), rtol=1e-5, atol=1e-6)
    one, two = numpy(dropped(ids, training=True)), numpy(dropped(ids, training=True))
    assert np.abs(one - inference).max() > 1e-3 and np.abs(one - two).max() > 1e-3  # a new mask per call
    # the first step starts from a zero state, so the recurrent kernel plays no part in it: only that
    # kernel is dropped (not the input kernel, not the outputs)
    np.testing.assert_allclose(one[:, 0], inference[:, 0], rtol=1e-5, atol=1e-6)

    for i, kernel in zip((1, 2), kernels):
        layer = dropped.get_layer(f"rnn_{i}")
        assert isinstance(layer.cell.recurrent_kernel, keras.Variable)  # the masked copy was put back
        np.testing.assert_array_equal(numpy(layer.cell.recurrent_kernel), kernel)  # and never written
    assert len(dropped.weights) == len(plain.weights)  # no mask or copy became a weight


def test_a_network_with_every_recipe_layer_infers_as_the_plain_one():
    keras.utils.set_random_seed(1)
    config = ModelConfig(cell="lstm", layers=2, units=16, embedding=8, dropout=0.5)
    trained = build_model(config, 12, ALL_RECIPE)
    plain = build_model(config, 12)
    copy_weights(trainable_weights(trained), plain)
    ids = np.random.default_rng(1).integers(0, 12, (2, 30)).astype("int32")
    np.testing.assert_allclose(numpy(trained(ids)), numpy(plain(ids)), rtol=1e-5, atol=1e-6)
    assert np.abs(numpy(trained(ids, training=True)) - numpy(plain(ids))).max() > 1e-3
    with pytest.raises(ValueError, match="expected 9 weight arrays, got 8"):
        copy_weights(trainable_weights(trained)[:-1], plain)


def dropout_masks(recipe: Recipe, name: str, shape=(4, 30, 64)) -> np.ndarray:
    """What the training network's dropout layer `name` does to ones, in training."""
    keras.utils.set_random_seed(2)
    model = build_model(ModelConfig(cell="lstm", layers=2, units=16, embedding=8, dropout=0.5), 12, recipe)
    return numpy(model.get_layer(name)(keras.ops.ones(shape), training=True))  # (B, T, F)


@pytest.mark.parametrize("name", ["input_dropout", "dropout_1", "output_dropout"])
def test_locked_dropout_keeps_one_mask_over_time(name):
    recipe = Recipe(input_dropout=0.5, output_dropout=0.5)
    locked = dropout_masks(Recipe(**{**recipe.to_dict(), "locked": True}), name)
    assert set(np.unique(locked)) == {0.0, 2.0}
    assert (locked == locked[:, :1, :]).all()  # every (window, feature) is kept or dropped at every step
    assert 0.3 < (locked[:, 0, :] == 0).mean() < 0.7  # but the features differ
    assert (locked[0, 0] != locked[1, 0]).any()  # and so do the windows

    free = dropout_masks(recipe, name)
    assert set(np.unique(free)) == {0.0, 2.0}
    assert (free != free[:, :1, :]).any(axis=1).mean() > 0.9  # a new mask at each step


def test_embedding_dropout_hides_whole_positions():
    masked = dropout_masks(Recipe(embedding_dropout=0.5), "embedding_dropout")  # (B, T, F)
    assert (masked == masked[:, :, :1]).all()  # all of a position's features at once
    hidden = masked[:, :, 0] == 0  # (B, T)
    assert 0.3 < hidden.mean() < 0.7 and (hidden != hidden[:, :1]).any()  # positions, not whole windows
    assert set(np.unique(masked[~hidden])) == {2.0}
    # with --locked too it still drops positions (the lock is for the other dropouts)
    both = dropout_masks(Recipe(embedding_dropout=0.5, locked=True), "embedding_dropout")
    assert (both == both[:, :, :1]).all() and (both[:, :, 0] != both[:, :1, 0]).any()


# ---------------------------------------------------------------- the schedule and the optimizer


def rate(schedule, step: int) -> float:
    return float(numpy(schedule(step)))


def test_warmup_then_cosine_linear_exponential_and_constant():
    WarmupDecay = _classes()["WarmupDecay"]
    lr, warmup, last = 0.01, 10, 110
    cosine = WarmupDecay(lr, warmup, "cosine", last, 0.1)
    for shape in ("cosine", "linear", "exponential", "constant"):
        schedule = WarmupDecay(lr, warmup, shape, last, 0.1, per_epoch=20, rate=0.5)
        for step in range(warmup):  # linear warm-up: lr / warmup more at each step, lr at its last
            assert rate(schedule, step) == pytest.approx(lr * (step + 1) / warmup, rel=1e-5)
        assert rate(schedule, warmup) == pytest.approx(lr, rel=1e-5)
    assert rate(cosine, last) == pytest.approx(0.1 * lr, rel=1e-5)  # the floor at the last step
    assert rate(cosine, last + 500) == pytest.approx(0.1 * lr, rel=1e-5)  # and after it
    assert rate(cosine, 60) == pytest.approx(0.1 * lr + 0.9 * lr * 0.5, rel=1e-5)
    assert rate(cosine, 35) == pytest.approx(0.1 * lr + 0.9 * lr * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-5)
    values = [rate(cosine, s) for s in range(warmup, last + 1)]
    assert all(a > b for a, b in itertools.pairwise(values))

    linear = WarmupDecay(lr, warmup, "linear", last, 0.1)
    assert rate(linear, 60) == pytest.approx(0.1 * lr + 0.9 * lr * 0.5, rel=1e-5)  # halfway at the middle
    assert rate(linear, 35) == pytest.approx(0.1 * lr + 0.9 * lr * 0.75, rel=1e-5)
    assert rate(linear, last) == pytest.approx(0.1 * lr, rel=1e-5)

    exponential = WarmupDecay(lr, warmup, "exponential", last, 0.1, per_epoch=20, rate=0.5)
    for step in (10, 30, 50, 75, 500):  # --lr-decay per epoch, counted from the end of the warm-up
        assert rate(exponential, step) == pytest.approx(lr * 0.5 ** ((step - warmup) / 20), rel=1e-4)
    assert rate(WarmupDecay(lr, warmup, "constant", last, 0.1), 10_000) == pytest.approx(lr)
    assert rate(WarmupDecay(lr, 0, "cosine", last, 0.1), 0) == pytest.approx(lr)  # no warm-up: lr at once

    # as a checkpoint stores it
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(cosine))
    assert type(again) is WarmupDecay and again.get_config() == cosine.get_config()
    assert [rate(again, s) for s in (0, 35, 110)] == [rate(cosine, s) for s in (0, 35, 110)]


def test_the_optimizer_follows_the_recipe():
    args = {"lr": 0.01, "lr_decay": 0.9, "clipnorm": 5.0, "steps_per_epoch": 20, "last_step": 200}
    today = optimizer(Recipe(), **args)
    before = keras.optimizers.Adam(  # what training built before recipes existed
        learning_rate=keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=20, decay_rate=0.9),
        global_clipnorm=5.0)
    assert type(today) is keras.optimizers.Adam
    unnamed = lambda opt: {k: v for k, v in opt.get_config().items() if k != "name"}  # (the names differ: adam, adam_1)
    assert unnamed(today) == unnamed(before)
    assert optimizer(Recipe(), **{**args, "clipnorm": 0}).global_clipnorm is None

    cosine = optimizer(Recipe(schedule="cosine", warmup=5, min_lr=0.2), **args)
    assert type(cosine) is keras.optimizers.Adam  # a schedule alone keeps Adam
    schedule = cosine._learning_rate
    assert type(schedule).__name__ == "WarmupDecay"
    assert rate(schedule, 0) == pytest.approx(0.01 / 5) and rate(schedule, 200) == pytest.approx(0.002)
    # exponential with a warm-up: --lr-decay per epoch after it
    assert rate(optimizer(Recipe(warmup=5), **args)._learning_rate, 45) == pytest.approx(0.01 * 0.9**2, rel=1e-5)

    averaged = optimizer(Recipe(ema=0.99), **args)
    assert type(averaged).__name__ == "AveragedAdam" and averaged.use_ema and averaged.ema_momentum == 0.99
    decayed = optimizer(Recipe(weight_decay=0.1), **args)
    assert type(decayed).__name__ == "AveragedAdamW" and decayed.weight_decay == 0.1 and not decayed.use_ema


def test_weight_decay_leaves_biases_alone():
    chosen = optimizer(Recipe(weight_decay=1.0), lr=0.1, lr_decay=1.0, clipnorm=5.0, steps_per_epoch=10, last_step=100)
    rebuilt = keras.optimizers.deserialize(keras.optimizers.serialize(chosen))  # as a resumed run's checkpoint has it
    for opt in (chosen, rebuilt):
        keras.utils.set_random_seed(3)
        variables = build_model(ModelConfig(cell="lstm", layers=1, units=8, embedding=4), 10).trainable_variables
        names = [v.name for v in variables]
        assert {"bias", "kernel", "recurrent_kernel", "embeddings"} <= set(names)
        before = [numpy(v) for v in variables]
        opt.apply([keras.ops.zeros(v.shape) for v in variables], variables)  # no gradient: the decay alone
        for v, w in zip(variables, before):
            if v.name == "bias":
                np.testing.assert_array_equal(numpy(v), w)
            else:  # decoupled: lr x weight decay of the weight itself
                np.testing.assert_allclose(numpy(v), w * (1 - 0.1 * 1.0), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_fit_keeps_the_raw_weights_and_the_optimizer_the_average():
    """fit() calls (a run makes one per evaluation): the weights go on from where the last step left
    them, and the average is the moving average of the weights after each step: the first step's
    weights, then a decay ramping up as (1 + t) / (10 + t) until it reaches --ema's."""
    config = ModelConfig(cell="lstm", layers=1, units=8, embedding=4)
    rng = np.random.default_rng(4)
    x = rng.integers(0, 10, (4, 20)).astype("int32")
    y = np.roll(x, -1, axis=1)

    def fitted(opt):
        keras.utils.set_random_seed(4)
        model = build_model(config, 10, Recipe(ema=0.5))
        model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      run_eagerly=True)  # no tracing: quicker for two steps
        after = []
        for _ in range(3):
            model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)  # one step each
            after.append(trainable_weights(model))
        return model, after

    args = {"lr": 0.05, "lr_decay": 1.0, "clipnorm": 5.0, "steps_per_epoch": 1, "last_step": 3}
    model, (first, second, third) = fitted(optimizer(Recipe(ema=0.2), **args))
    average = averaged_weights(model)
    assert any(np.abs(a - w).max() > 1e-4 for a, w in zip(average, third))
    for a, w1, w2, w3 in zip(average, first, second, third):  # decay 0 (a copy), 2/11 (the ramp), 0.2 (--ema)
        np.testing.assert_allclose(a, 0.2 * (2 / 11 * w1 + 9 / 11 * w2) + 0.8 * w3, rtol=1e-5, atol=1e-6)
    # (Keras' own Adam copies its average into the weights when fit() returns)
    plain, (_, _, kept) = fitted(keras.optimizers.Adam(0.05, global_clipnorm=5.0, use_ema=True, ema_momentum=0.2))
    for a, w in zip(averaged_weights(plain), kept):
        np.testing.assert_allclose(a, w)


# ---------------------------------------------------------------- a run with every recipe flag on


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus) -> Path:
    """6 steps with every recipe flag, one evaluation (at the stop), so the best artifact is the
    checkpoint's step. --max-minutes: a fresh run times one validation call before any step, when
    the optimizer has no average yet."""
    out = tmp_path_factory.mktemp("recipe") / "run"
    result = invoke("train", "--corpus", str(corpus), "--out", str(out), *ALL_FLAGS, *SMALL, "--max-steps", "6",
                    "--max-minutes", "10")
    assert result.exit_code == 0, result.output
    assert ("recipe: input-dropout 0.1, output-dropout 0.2, embedding-dropout 0.1, weight-drop 0.3, locked True, "
            "weight-decay 0.1, schedule cosine, warmup 2, min-lr 0.2, ema 0.9") in result.output
    return out


@pytest.mark.slow
def test_the_artifact_has_the_better_of_the_average_and_the_raw_weights(run):
    history = json.loads((run / "history.json").read_text())
    assert [row["step"] for row in history] == [6] and os.readlink(run / "best") == "artifacts/step-00000006"
    row = history[0]
    scores = {"average": row["val_average_nats_per_char"], "raw": row["val_raw_nats_per_char"]}
    assert scores["average"] != scores["raw"] and row["val_nats_per_char"] == min(scores.values())
    assert row["weights"] == min(scores, key=scores.get)
    published = artifacts.load_keras(run)
    checkpoint = load_checkpoint(run)
    assert int(numpy(checkpoint.optimizer.iterations)) == 6
    raw, average = trainable_weights(checkpoint), averaged_weights(checkpoint)
    # fit() did not copy the average into the weights: training goes on from its own
    assert max(np.abs(r - a).max() for r, a in zip(raw, average)) > 1e-3
    for kept, p in zip(average if row["weights"] == "average" else raw, trainable_weights(published.model)):
        np.testing.assert_allclose(p, kept, rtol=1e-6, atol=1e-7)
    assert published.meta.validation.nats_per_char == pytest.approx(row["val_nats_per_char"], abs=1e-5)


def test_validation_scores_the_average_and_the_raw_weights(run, corpus, tmp_path):
    text = corpus.read_text()
    held_out = tmp_path / "validation.txt"
    held_out.write_text(text[int(len(text) * 0.9):])  # the last 10%: what the run validated on
    recorded = json.loads((run / "history.json").read_text())[-1]
    result = invoke("evaluate", "--artifact", str(run), "--text", str(held_out), "--json")
    assert result.exit_code == 0, result.output
    scored = json.loads(result.output.strip().splitlines()[-1])
    assert scored["chars"] == recorded["val_chars_scored"] + 1
    assert scored["nats_per_char"] == pytest.approx(recorded["val_nats_per_char"], abs=2e-5)
    # each of the two figures is its weights' own, scored as chargen evaluate scores them
    from model.training.evaluate import StreamScorer

    loaded = artifacts.load_keras(run)
    checkpoint = load_checkpoint(run)
    ids = loaded.vocab.encode(held_out.read_text()).ids
    for weights, column in [(trainable_weights(checkpoint), "val_raw_nats_per_char"),
                            (averaged_weights(checkpoint), "val_average_nats_per_char")]:
        copy_weights(weights, loaded.model)
        assert StreamScorer().loss(loaded.model, ids).nats == pytest.approx(recorded[column], abs=2e-5)


@pytest.mark.slow
def test_the_whole_validation_at_the_end_scores_the_weights_the_artifact_kept(tmp_path, corpus):
    """Evaluations scored a sample (--eval-chars), so the best artifact is scored on the whole
    validation text at the end: with the weights it holds, the raw ones when the evaluation kept
    them, as `chargen evaluate` scores it."""
    out = tmp_path / "run"
    result = invoke("train", "--corpus", str(corpus), "--out", str(out), *ALL_FLAGS, *SMALL, "--max-steps", "6",
                    "--validation", "0.5", "--eval-chars", "1000")
    assert result.exit_code == 0, result.output
    history = json.loads((out / "history.json").read_text())
    assert history[-1]["weights"] == "raw" and history[-1]["val_chars_scored"] < 1000  # this run's choice
    whole = json.loads((out / "state.json").read_text())["best"]["whole_validation"]
    from model.training.evaluate import StreamScorer

    text = corpus.read_text()
    loaded, checkpoint = artifacts.load_keras(out), load_checkpoint(out)
    ids = loaded.vocab.encode(text[int(len(text) * 0.5):]).ids
    scores = {}
    for name, weights in [("raw", trainable_weights(checkpoint)), ("average", averaged_weights(checkpoint))]:
        copy_weights(weights, loaded.model)
        scores[name] = StreamScorer(n_streams=TrainSettings.eval_streams).loss(loaded.model, ids)
    assert whole["chars_scored"] == scores["raw"].chars > 1000
    assert whole["nats_per_char"] == pytest.approx(scores["raw"].nats, abs=2e-5)
    assert abs(scores["average"].nats - scores["raw"].nats) > 1e-3


LOAD_PLAIN = """
import json, sys
import keras
model = keras.saving.load_model(sys.argv[1], safe_mode=True)
try:
    keras.saving.load_model(sys.argv[2], safe_mode=True)
    checkpoint = "loaded"
except Exception as e:
    checkpoint = "refused, naming WeightDroppedLSTM" if "WeightDroppedLSTM" in str(e) else repr(e)[:300]
print(json.dumps({"layers": sorted({type(layer).__name__ for layer in model.layers}),
                  "chargen": sorted(m for m in sys.modules if m.split(".")[0] in ("model", "chargen", "service")),
                  "checkpoint": checkpoint}))
"""


@pytest.mark.slow
def test_the_artifact_is_a_plain_network(run, tmp_path):
    """Its model.keras loads in a process that never imports chargen (no custom classes), its
    model.onnx passes the serving load's checks; the checkpoint, which has the recipe's classes,
    does not load there."""
    best = run / "best"
    paths = [str(best / "model.keras"), str(run / "checkpoint.keras")]
    result = subprocess.run([sys.executable, "-c", LOAD_PLAIN, *paths],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False,
                            env={**ENV, "KERAS_BACKEND": "jax"})
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["layers"] == ["Dense", "Dropout", "Embedding", "InputLayer", "LSTM"] and found["chargen"] == []
    assert found["checkpoint"] == "refused, naming WeightDroppedLSTM"

    served = artifact.load(best)  # the serving load: model.onnx checked against meta.json, no Keras network
    assert served.model is None and served.onnx_path == best / "model.onnx"
    loaded = artifacts.load_keras(best)
    names = [layer.name for layer in loaded.model.layers]
    assert names == ["chars", "embedding", "rnn_1", "dropout_1", "rnn_2", "logits"]
    assert loaded.config == ModelConfig(cell="lstm", layers=2, units=16, embedding=8, dropout=0.2)

    import onnxruntime as ort  # the graph computes what the network does

    session = ort.InferenceSession(str(served.onnx_path), providers=["CPUExecutionProvider"])
    ids = loaded.vocab.encode("the of and to a in that is was").ids
    names = [i.name for i in session.get_inputs()][1:]
    state = {n: np.zeros((2, 1, 16), np.float32) for n in names}
    logits = session.run(None, {"ids": ids[None].astype(np.int64), **state})[0]
    np.testing.assert_allclose(logits, numpy(loaded.model.predict_on_batch(ids[None])), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_weight_drop_alone_scores_and_publishes_the_plain_network(tmp_path, corpus):
    """Without --ema (nor several devices) evaluations may score the training network itself; with
    weight drop it is not a plain one, so the samples' ONNX graph and the artifact are made from
    the plain network given its weights."""
    out = tmp_path / "run"
    result = invoke("train", "--corpus", str(corpus), "--out", str(out), "--layers", "1", "--units", "16",
                    "--embedding", "8", *SMALL, "--weight-drop", "0.3", "--max-steps", "2")
    assert result.exit_code == 0, result.output
    row = json.loads((out / "history.json").read_text())[-1]
    assert row["samples"] and all(sample["text"] for sample in row["samples"])
    published = artifacts.load_keras(out)
    assert type(published.model.get_layer("rnn_1")) is keras.layers.LSTM
    for w, p in zip(trainable_weights(load_checkpoint(out)), trainable_weights(published.model)):
        np.testing.assert_array_equal(p, w)  # no average: the weights trained


def test_run_json_and_meta_json_record_the_recipe(run):
    saved = json.loads((run / RUN_FILE).read_text())
    assert saved["recipe"] == ALL_RECIPE.to_dict()
    assert read_run(run / RUN_FILE)[0].recipe == ALL_RECIPE
    meta = json.loads((run / "best" / "meta.json").read_text())
    assert meta["training"]["recipe"] == ALL_RECIPE.to_dict()
    assert artifact.load(run).meta.training.recipe == ALL_RECIPE


def test_records_written_before_recipes_load_as_todays_recipe(run, corpus, tmp_path):
    saved = json.loads((run / RUN_FILE).read_text())
    del saved["recipe"], saved["command"]  # the command is run.json's own, beside the settings
    assert TrainSettings.from_dict(saved).recipe == Recipe()
    with pytest.raises(ValueError, match="unknown recipe keys: dropconnect"):
        Recipe.from_dict({"dropconnect": 0.5})

    meta = json.loads((run / "best" / "meta.json").read_text())
    del meta["training"]["recipe"]
    assert artifact.ArtifactMeta.from_json(json.dumps(meta)).training.recipe is None  # trained before recipes
    for field, value, problem in [("locked", "yes", "must be true or false"), ("locked", 1, "must be true or false"),
                                  ("weight_drop", True, "must be a number"), ("warmup", 2.5, "must be a whole number")]:
        meta["training"]["recipe"] = {**ALL_RECIPE.to_dict(), field: value}
        with pytest.raises(artifact.BadMeta, match=f"field 'training.recipe.{field}' {problem}"):
            artifact.ArtifactMeta.from_json(json.dumps(meta))
    for field, value, problem in [("schedule", "bogus", "--schedule must be one of"), ("ema", 1.5, "--ema must be in"),
                                  ("weight_drop", -0.1, "--weight-drop must be in")]:
        meta["training"]["recipe"] = {**ALL_RECIPE.to_dict(), field: value}
        with pytest.raises(artifact.BadMeta, match=f"invalid training.recipe: {problem}"):
            artifact.ArtifactMeta.from_json(json.dumps(meta))

    # an interrupted run of an older chargen resumes with today's recipe, and refuses a recipe flag
    old = tmp_path / "old"
    old.mkdir()
    before = TrainSettings(corpus=str(corpus), out=str(old), config=ModelConfig(units=16)).to_dict()
    del before["recipe"]
    (old / RUN_FILE).write_text(json.dumps(before))
    again = TrainSettings(corpus=str(corpus), out=str(old), config=ModelConfig(units=16))
    assert prepare(again, True, frozenset()).settings.recipe == Recipe()
    changed = TrainSettings(corpus=str(corpus), out=str(old), config=ModelConfig(units=16), recipe=Recipe(ema=0.9))
    with pytest.raises(TrainingError, match="--ema 0.9 differs from the run's 0.0"):
        prepare(changed, True, frozenset({"ema"}))


@pytest.mark.slow
def test_resume_keeps_the_recipe_and_refuses_a_changed_one(run, corpus, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    state = (copy / "state.json").read_text()
    for flag, value, problem in [("--weight-drop", "0.5", "--weight-drop 0.5 differs from the run's 0.3"),
                                 ("--schedule", "linear", "--schedule linear differs from the run's cosine"),
                                 ("--ema", "0", "--ema 0.0 differs from the run's 0.9"),
                                 ("--no-locked", None, "--locked False differs from the run's True")]:
        given = [flag, value] if value else [flag]
        result = invoke("train", "--corpus", str(corpus), "--out", str(copy), "--resume", *given)
        assert result.exit_code == 1 and problem in result.output, result.output
        assert "a resumed run keeps its settings" in result.output
    assert (copy / "state.json").read_text() == state

    # the same recipe flags again, or none, continue it: the checkpoint loads with the recipe's classes
    result = invoke("train", "--corpus", str(corpus), "--out", str(copy), "--resume", "--weight-drop", "0.3",
                    "--max-steps", "12")
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output and "optimizer step 6" in result.output
    history = json.loads((copy / "history.json").read_text())
    assert [row["step"] for row in history] == [6, 11, 12]  # the end of epoch 1, then the stop
    # the cosine's length was fixed when the run began (6 steps): the resumed steps stay at its floor
    assert history[-1]["learning_rate"] == pytest.approx(0.01 * 0.2, rel=1e-5)
    checkpoint = load_checkpoint(copy)
    assert int(numpy(checkpoint.optimizer.iterations)) == 12
    assert type(checkpoint.get_layer("rnn_1")).__name__ == "WeightDroppedLSTM"
    opt = checkpoint.optimizer
    assert type(opt).__name__ == "AveragedAdamW" and opt.use_ema and opt.ema_momentum == 0.9 and opt.weight_decay == 0.1
    assert json.loads((copy / RUN_FILE).read_text())["recipe"] == ALL_RECIPE.to_dict()
    best = artifacts.load_keras(copy)
    # still learning fast: the last is the best, with the weights its evaluation chose: the raw ones
    # or the average the checkpoint's optimizer carried on (restored, not started again)
    assert history[2]["val_nats_per_char"] < history[1]["val_nats_per_char"] < history[0]["val_nats_per_char"]
    assert os.readlink(copy / "best") == "artifacts/step-00000012"
    kept = averaged_weights(checkpoint) if history[-1]["weights"] == "average" else trainable_weights(checkpoint)
    for a, p in zip(kept, trainable_weights(best.model)):
        np.testing.assert_allclose(p, a, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- --preset and bad values


@pytest.mark.slow
def test_a_preset_sets_its_values(tmp_path, corpus):
    out = tmp_path / "run"
    result = invoke("train", "--preset", "tiny", "--corpus", str(corpus), "--out", str(out), "--max-steps", "1")
    assert result.exit_code == 0, result.output
    saved = json.loads((out / RUN_FILE).read_text())
    assert saved["config"] == {"cell": "lstm", "layers": 1, "units": 128, "embedding": 32, "dropout": 0.0}
    assert (saved["seq_len"], saved["batch_size"], saved["epochs"]) == (100, 32, 10)
    assert saved["recipe"] == Recipe().to_dict()


@pytest.mark.slow
def test_flags_given_override_the_preset(tmp_path, corpus):
    out = tmp_path / "run"
    # the medium preset's recipe on a tiny network; --no-locked and --ema 0 (the options' own defaults) override it too
    result = invoke("train", "--corpus", str(corpus), "--out", str(out), "--layers", "1", "--units", "16",
                    "--embedding", "8", "--seq-len", "40", "--batch-size", "8", "--no-locked", "--ema", "0",
                    "--epochs", "30", "--max-steps", "1", "--preset", "medium")  # after the others: the same
    assert result.exit_code == 0, result.output
    saved = json.loads((out / RUN_FILE).read_text())
    assert saved["config"] == {"cell": "lstm", "layers": 1, "units": 16, "embedding": 8, "dropout": 0.25}
    assert (saved["seq_len"], saved["batch_size"], saved["epochs"], saved["patience"]) == (40, 8, 30, 0)
    assert saved["recipe"] == Recipe(input_dropout=0.1, output_dropout=0.25, weight_drop=0.25, locked=False,
                                     weight_decay=0.1, schedule="cosine", warmup=200, ema=0.0).to_dict()


@pytest.mark.slow
def test_resume_with_a_preset_checks_its_values_against_the_run(tmp_path, corpus):
    """The same command line again with --resume continues; another preset's values are refused like flags."""
    out = tmp_path / "run"
    first = ["train", "--corpus", str(corpus), "--out", str(out), "--preset", "tiny", "--units", "16", "--max-steps", "2"]
    assert invoke(*first).exit_code == 0
    again = invoke(*first[:-1], "4", "--resume")
    assert again.exit_code == 0, again.output
    assert json.loads((out / "state.json").read_text())["step"] == 4
    other = invoke("train", "--corpus", str(corpus), "--out", str(out), "--preset", "medium", "--units", "16", "--resume")
    assert other.exit_code == 1
    assert "--resume: --batch-size 64 differs from the run's 32" in other.output  # the first that differs
    assert json.loads((out / "state.json").read_text())["step"] == 4


@pytest.mark.slow
def test_resume_with_a_preset_keeps_the_runs_own_epochs(tmp_path, corpus):
    """A setting a resumed run may change (--epochs) keeps the run's value when only the preset names
    it: `--preset tiny --epochs 1`, resumed with `--preset tiny` alone, does not train to tiny's 10."""
    out = tmp_path / "run"
    first = ["train", "--corpus", str(corpus), "--out", str(out), "--preset", "tiny", "--units", "16", "--epochs", "1"]
    assert invoke(*first).exit_code == 0
    step = json.loads((out / "state.json").read_text())["step"]
    again = invoke(*first[:-2], "--resume")
    assert again.exit_code == 0, again.output
    assert json.loads((out / "state.json").read_text())["step"] == step


def test_an_unknown_preset_is_a_usage_error(tmp_path, corpus):
    result = invoke("train", "--preset", "huge", "--corpus", str(corpus), "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    assert "Invalid value for '--preset': 'huge' is not one of 'tiny', 'small', 'medium', 'large'" in result.output
    assert not (tmp_path / "run").exists()


# Each bad command line in one fresh interpreter; afterwards, whether it had imported a backend.
REFUSE = """
import json, sys
from click.testing import CliRunner
from chargen.cli import main
results = [CliRunner().invoke(main, args) for args in json.loads(sys.argv[1])]
print(json.dumps({"results": [[r.exit_code, r.output] for r in results],
                  "heavy": sorted(m for m in ("keras", "tensorflow", "jax") if m in sys.modules)}))
"""

BAD = [
    (["--weight-drop", "1"], "Invalid value for '--weight-drop': 1.0 is not in the range 0<=x<1."),
    (["--input-dropout", "-0.1"], "Invalid value for '--input-dropout'"),
    (["--embedding-dropout", "1.5"], "Invalid value for '--embedding-dropout'"),
    (["--schedule", "bogus"],
     "Invalid value for '--schedule': 'bogus' is not one of 'exponential', 'cosine', 'linear', 'constant'."),
    (["--ema", "1"], "Invalid value for '--ema': 1.0 is not in the range 0<=x<1."),
    (["--min-lr", "2"], "Invalid value for '--min-lr': 2.0 is not in the range 0<=x<=1."),
    (["--warmup", "-1"], "Invalid value for '--warmup': -1 is not in the range x>=0."),
    (["--warmup", "0.5"], "Invalid value for '--warmup': '0.5' is not a valid integer range."),
    (["--weight-decay", "-1"], "Invalid value for '--weight-decay'"),
    (["--locked", "yes"], "Got unexpected extra argument (yes)"),
    # what the click types let through
    (["--weight-drop", "nan"], "--weight-drop must be in [0, 1), got nan"),
    (["--output-dropout", "nan"], "--output-dropout must be in [0, 1), got nan"),
    (["--weight-decay", "nan"], "--weight-decay must be >= 0, got nan"),
    (["--weight-decay", "inf"], "--weight-decay must be >= 0, got inf"),
    (["--ema", "nan"], "--ema must be in [0, 1) (0: no average), got nan"),
    (["--min-lr", "nan"], "--min-lr must be in [0, 1] (a fraction of --lr), got nan"),
]


def test_bad_recipe_values_are_one_line_before_keras_loads(tmp_path, corpus):
    runs = [["train", "--corpus", str(corpus), "--out", str(tmp_path / f"run{i}"), *args]
            for i, (args, _) in enumerate(BAD)]
    result = subprocess.run([sys.executable, "-c", REFUSE, json.dumps(runs)], capture_output=True, text=True,
                            timeout=120, cwd=ROOT, env=ENV, check=False)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["heavy"] == []
    for (args, problem), (code, output) in zip(BAD, found["results"]):
        assert code in (1, 2) and "Traceback" not in output, (args, output)
        errors = [line for line in output.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and problem in errors[0], (args, output)
    assert not list(tmp_path.glob("run*"))


# ---------------------------------------------------------------- both backends


@pytest.mark.slow
def test_every_recipe_flag_trains_on_jax(tmp_path, corpus):
    """`chargen --backend jax train` with every recipe flag (the `run` fixture is the same on
    TensorFlow, this process's backend); its checkpoint loads here with the recipe's classes."""
    out = tmp_path / "run"
    result = subprocess.run([CHARGEN, "--backend", "jax", "train", "--corpus", str(corpus), "--out", str(out),
                             *ALL_FLAGS, *SMALL, "--max-steps", "3"],
                            capture_output=True, text=True, timeout=240, env=ENV, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "backend jax" in result.stdout and "recipe: input-dropout 0.1," in result.stdout
    history = json.loads((out / "history.json").read_text())
    assert [row["step"] for row in history] == [3] and 0 < history[0]["val_nats_per_char"] < math.log(16) + 0.1
    best = artifact.load(out)  # model.onnx checked
    assert best.meta.versions.backend == "jax" and best.meta.training.recipe == ALL_RECIPE

    checkpoint = load_checkpoint(out)
    assert type(checkpoint.get_layer("rnn_2")).__name__ == "WeightDroppedLSTM"
    assert type(checkpoint.optimizer).__name__ == "AveragedAdamW" and int(numpy(checkpoint.optimizer.iterations)) == 3
    published = trainable_weights(artifacts.load_keras(out).model)
    raw, average = trainable_weights(checkpoint), averaged_weights(checkpoint)
    assert max(np.abs(w - a).max() for w, a in zip(raw, average)) > 1e-4  # an average of its own, as on TensorFlow
    for w, p in zip(average if history[0]["weights"] == "average" else raw, published):  # the better one
        np.testing.assert_allclose(p, w, rtol=1e-6, atol=1e-7)
