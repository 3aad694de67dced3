"""A training run's records on disk: state.json (`RunState`) and run.json (`TrainSettings` and the
command) are read strictly, every field of its type and unknown ones refused, with an error that
names the file and the field; and the `train` command's defaults and bounds are the records'."""

from __future__ import annotations

import copy
import json
from dataclasses import fields
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from conftest import PERIODIC

from chargen.cli import main
from chargen.cli import train as train_command
from model.records.config import MAX_EMBEDDING, MAX_LAYERS, MAX_UNITS, ModelConfig, Recipe
from model.training.run_state import RunState
from model.training.settings import (MAX_SAMPLE_CHARS, MAX_SEED, MAX_VALIDATION_FRACTION, RUN_FILE, TrainingError,
                                     TrainSettings, run_json)


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(PERIODIC * 20)
    return path


def invoke(*args: str):
    result = CliRunner().invoke(main, list(args))
    assert "Traceback" not in result.output, result.output
    return result


ROW = {"epoch": 1, "step": 7, "train_nats_per_char": 3.1, "train_bits_per_char": 4.47236, "val_nats_per_char": 3.0,
       "val_bits_per_char": 4.32809, "val_chars_scored": 269, "val_partial": False, "learning_rate": 0.0019,
       "seconds": 3.69, "chars_per_second": 607, "partial": False}
STATE = {
    "step": 10, "epoch": 1.4286,
    "best": {"step": 7, "epoch": 1, "val_nats": 3.0, "artifact": "artifacts/epoch-001",
             "whole_validation": {"nats_per_char": 3.1, "bits_per_char": 4.47236, "chars_scored": 2995}},
    "evaluations_without_improvement": 1,
    "history": [
        {**ROW, "weights": "raw", "val_average_nats_per_char": 3.05, "val_raw_nats_per_char": 3.0,
         "samples": [{"temperature": 0.5, "text": "ab\nc", "novelty": None}, {"temperature": 1.0, "text": "", "novelty": 0.5}]},
        {**ROW, "epoch": 1.4286, "step": 10, "val_chars_scored": 64, "val_partial": True, "partial": True},
    ],
    "training_seconds": 5.25, "chars_trained": 3200, "corpus_sha256": "ab" * 32, "seed_states": [[1234, 0], [1235, 0]],
    "resumed": ["chargen train --resume"],
}


def test_state_json_reads_back_as_written():
    text = json.dumps(STATE, indent=1)
    state = RunState.from_json(text)
    assert state.best.whole_validation.chars_scored == 2995 and state.history[0].samples[0].novelty is None
    assert state.to_json() == text  # the optional fields are written only when set
    no_whole = copy.deepcopy(STATE)
    del no_whole["best"]["whole_validation"]
    assert RunState.from_json(json.dumps(no_whole, indent=1)).to_json() == json.dumps(no_whole, indent=1)


def changed(change) -> dict:
    state = copy.deepcopy(STATE)
    change(state)
    return state


@pytest.mark.parametrize("state, problem", [
    (changed(lambda s: s.update(epochs_without_improvement=0)), "unknown field 'epochs_without_improvement'"),
    (changed(lambda s: s["best"].update(loss=3.0)), "unknown field 'best.loss'"),
    (changed(lambda s: s["history"][1].update(val_loss=3.0)), "unknown field 'history[1].val_loss'"),
    (changed(lambda s: s["history"][0]["samples"][0].update(seed=1)), "unknown field 'history[0].samples[0].seed'"),
    (changed(lambda s: s.update(step="10")), "field 'step' must be a whole number, got '10'"),
    (changed(lambda s: s.update(step=True)), "field 'step' must be a whole number, got True"),
    (changed(lambda s: s["best"].update(artifact=7)), "field 'best.artifact' must be a string, got 7"),
    (changed(lambda s: s["history"][0].update(val_partial=0)), "field 'history[0].val_partial' must be true or false"),
    (changed(lambda s: s.update(history={})), "field 'history' must be a list"),
    (changed(lambda s: s.update(seed_states=[[1.5]])), "field 'seed_states[0][0]' must be a whole number"),
    (changed(lambda s: s.pop("resumed")), "missing field 'resumed'"),
    (changed(lambda s: s["history"][0].pop("val_chars_scored")), "missing field 'history[0].val_chars_scored'"),
    ([STATE], "expected a JSON object"),
])
def test_the_state_reader_refuses_unknown_missing_and_mistyped_fields(tmp_path, state, problem):
    path = tmp_path / "state.json"
    path.write_text(json.dumps(state))
    with pytest.raises(TrainingError) as refused:
        RunState.read(path)
    assert str(refused.value).startswith(f"{path}: ") and problem in str(refused.value)


def resumable_run(tmp_path: Path, corpus: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    settings = TrainSettings(corpus=str(corpus), out=str(run), config=ModelConfig(units=16))
    (run / RUN_FILE).write_text(run_json(settings, "chargen train"))
    return run


def test_resume_refuses_a_state_json_it_cannot_read_before_any_work(tmp_path, corpus):
    run = resumable_run(tmp_path, corpus)
    (run / "state.json").write_text(json.dumps({**STATE, "epochs_without_improvement": 0}))
    before = sorted(p.name for p in run.iterdir())
    result = invoke("train", "--corpus", str(corpus), "--out", str(run), "--resume")
    assert result.exit_code == 1
    assert f"{run / 'state.json'}: unknown field 'epochs_without_improvement'" in result.output
    assert sorted(p.name for p in run.iterdir()) == before


def test_run_json_and_the_settings_refuse_unknown_keys(tmp_path, corpus):
    settings = TrainSettings(corpus=str(corpus), out=str(tmp_path / "run")).to_dict()
    assert TrainSettings.from_dict(settings).to_dict() == settings
    with pytest.raises(TrainingError, match="unknown training settings: batch, command"):
        TrainSettings.from_dict({**settings, "command": "chargen train", "batch": 8})

    run = resumable_run(tmp_path, corpus)
    saved = json.loads((run / RUN_FILE).read_text())
    (run / RUN_FILE).write_text(json.dumps({**saved, "seqlen": 50}))
    result = invoke("train", "--corpus", str(corpus), "--out", str(run), "--resume")
    assert result.exit_code == 1 and f"{run / RUN_FILE}: unknown training settings: seqlen" in result.output
    (run / RUN_FILE).write_text(json.dumps({**saved, "seq_len": "50"}))
    result = invoke("train", "--corpus", str(corpus), "--out", str(run), "--resume")
    assert result.exit_code == 1 and f"{run / RUN_FILE}: --seq-len must be a whole number >= 1, got '50'" in result.output


def test_the_train_command_takes_its_defaults_and_bounds_from_the_records():
    params = {p.name: p for p in train_command.params}
    ctx = click.Context(train_command)
    checked = 0
    for record in (TrainSettings(corpus=[], out=""), ModelConfig(), Recipe()):
        for f in fields(record):
            param = params.get(f.name)
            if param is None or param.multiple or f.name in ("corpus", "out"):
                continue
            given = param.type_cast_value(ctx, param.get_default(ctx))
            assert given == getattr(record, f.name), f.name
            checked += 1
    assert checked == 33  # every option that sets a field of the three records
    ranges = {name: params[name].type.max for name in ("layers", "units", "embedding", "sample_chars", "seed",
                                                         "validation_fraction")}
    assert ranges == {"layers": MAX_LAYERS, "units": MAX_UNITS, "embedding": MAX_EMBEDDING,
                      "sample_chars": MAX_SAMPLE_CHARS, "seed": MAX_SEED, "validation_fraction": MAX_VALIDATION_FRACTION}
    for name, most in (("layers", MAX_LAYERS), ("units", MAX_UNITS), ("embedding", MAX_EMBEDDING)):
        ModelConfig(**{name: most})
        with pytest.raises(ValueError, match=f"{name} must be at most {most}, got {most + 1}"):
            ModelConfig(**{name: most + 1})


@pytest.mark.parametrize("name", ["state.json", RUN_FILE])
def test_a_record_nested_too_deeply_is_named_not_a_traceback(tmp_path, corpus, name):
    run = resumable_run(tmp_path, corpus)
    (run / name).write_text("[" * 200_000)
    result = invoke("train", "--corpus", str(corpus), "--out", str(run), "--resume")
    assert result.exit_code == 1 and f"{run / name}: " in result.output and "not valid JSON: nested too deeply" in result.output
