"""`chargen train` from the command line: every bad input is refused before any work starts, and a
run killed with SIGKILL continues with --resume as if it had never stopped."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import keras
import pytest
from click.testing import CliRunner
from conftest import PERIODIC, words
from polling import wait_for

from model.runtime import artifact
from chargen.cli import main

CHARGEN = str(Path(sys.executable).with_name("chargen"))


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(PERIODIC * 20)  # 900 characters
    return path


def invoke(*args: str):
    result = CliRunner().invoke(main, list(args))
    assert "Traceback" not in result.output, result.output
    return result


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("args, problem", [
    (["--units", "-5"], "Invalid value for '--units': -5 is not in the range"),
    (["--units", "0"], "Invalid value for '--units'"),
    (["--units", "many"], "Invalid value for '--units': 'many' is not a valid integer"),
    (["--cell", "transformer"], "Invalid value for '--cell': 'transformer' is not one of 'lstm', 'gru', 'rnn'"),
    (["--layers", "0"], "Invalid value for '--layers'"),
    (["--layers", "17"], "Invalid value for '--layers'"),
    (["--embedding", "0"], "Invalid value for '--embedding'"),
    (["--dropout", "1"], "Invalid value for '--dropout'"),
    (["--dropout", "-0.1"], "Invalid value for '--dropout'"),
    (["--dropout", "nan"], "dropout must be in [0, 1), got nan"),
    (["--seq-len", "0"], "Invalid value for '--seq-len'"),
    (["--seq-len", "5000"], "--seq-len 5000 is longer than the training part of the corpus (810 characters)"),
    (["--seq-len", "810"], "--seq-len 810 is longer than the training part of the corpus"),
    (["--batch-size", "0"], "Invalid value for '--batch-size'"),
    (["--batch-size", "99999999999999999999"], "--batch-size must be at most 1,048,576 windows"),
    (["--lr", "0"], "Invalid value for '--lr'"),
    (["--lr", "-0.01"], "Invalid value for '--lr'"),
    (["--lr", "nan"], "--lr must be a positive number, got nan"),
    (["--lr", "inf"], "--lr must be a positive number, got inf"),
    (["--lr-decay", "0"], "Invalid value for '--lr-decay'"),
    (["--lr-decay", "1.5"], "Invalid value for '--lr-decay'"),
    (["--lr-decay", "nan"], "--lr-decay must be in (0, 1], got nan"),
    (["--clipnorm", "-1"], "Invalid value for '--clipnorm'"),
    (["--clipnorm", "nan"], "--clipnorm must be >= 0"),
    (["--epochs", "0"], "Invalid value for '--epochs'"),
    (["--max-minutes", "0"], "Invalid value for '--max-minutes'"),
    (["--max-minutes", "nan"], "--max-minutes must be positive, got nan"),
    (["--patience", "-1"], "Invalid value for '--patience'"),
    (["--validation", "0"], "Invalid value for '--validation'"),
    (["--validation", "0.6"], "Invalid value for '--validation'"),
    (["--validation", "nan"], "--validation must be in (0, 0.5], got nan"),
    (["--validation", "0.001"], "the validation part of the corpus has only 1 characters; raise --validation"),
    (["--seed", "-1"], "Invalid value for '--seed'"),
    (["--seed", str(2**32)], "Invalid value for '--seed'"),
    (["--optimizer", "sgd"], "No such option '--optimizer'"),
    (["--eval-every", "0"], "Invalid value for '--eval-every'"),
    (["--eval-chars", "lots"], "'lots' is neither a whole number nor 'all'"),
    (["--eval-chars", "1"], "1 is too few characters to score"),
    (["--max-steps", "0"], "Invalid value for '--max-steps'"),
    (["--precision", "float8"], "Invalid value for '--precision'"),
    (["--validation", "0.2", "--validation-files", "*.txt"], "--validation and --validation-files: choose one"),
    (["--validation-files", "*.md"], "--validation-files *.md: matches none of the 1 corpus files"),
    (["--corpus", "no-such-corpus"], "no-such-corpus: no such file or directory (nor the name of a known corpus: tinyshakespeare)"),
    (["--resume"], "holds no run to resume (no run.json); start one without --resume"),
])
def test_bad_settings_are_refused_before_any_work(tmp_path, corpus, args, problem):
    out = tmp_path / "run"
    result = invoke("train", "--corpus", str(corpus), "--out", str(out), *args)
    assert result.exit_code != 0
    assert problem in result.output
    assert not out.exists()


@pytest.mark.parametrize("data, problem", [
    (None, "no such file"),
    (b"", "the file is empty"),
    (b"\xff\xfe" + "text".encode("utf-16-le") * 100, "not UTF-8 text (byte 0xff at offset 0"),
    (b"ab\x00" * 100, "a binary file, not text (a NUL byte at offset 2)"),
    (b"too short\n", "only 10 characters; at least 200 are needed"),
    (b"a" * 5000, "has 1 distinct character ('a'): a model needs at least two to choose between"),
])
def test_bad_corpora_are_refused_before_any_work(tmp_path, data, problem):
    corpus = tmp_path / "text.txt"
    if data is not None:
        corpus.write_bytes(data)
    out = tmp_path / "run"
    out.mkdir()  # an existing empty directory stays empty
    result = invoke("train", "--corpus", str(corpus), "--out", str(out))
    assert result.exit_code == 1
    assert problem in result.output and "text.txt" in result.output
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("where, problem", [
    ("{tmp}/file/sub", "{tmp}/file is a file, not a directory"),
    ("/proc/chargen-test/run", "cannot write in /proc"),  # no file can be made there, root or not
])
def test_an_out_or_data_that_cannot_be_written_is_refused_before_any_work(tmp_path, corpus, where, problem):
    (tmp_path / "file").write_text("x")
    where, problem = where.format(tmp=tmp_path), problem.format(tmp=tmp_path)
    for flag in ("--out", "--data"):
        args = ["--out", where] if flag == "--out" else ["--out", str(tmp_path / "run"), "--data", where]
        result = invoke("train", "--corpus", str(corpus), *args)
        assert result.exit_code == 1 and f"{flag} {where}: {problem}" in result.output, result.output
        assert not (tmp_path / "run").exists()


def test_resume_reads_the_corpus_where_it_is_now_and_refuses_another(tmp_path, corpus, monkeypatch):
    """--corpus on --resume is where the run's corpus is now (a relative path given from another
    folder, a moved file); state.json's sha256 says whether it is the run's."""
    from model.training.run_state import STATE_FILE, RunState
    from model.training.train import RUN_FILE, TrainSettings

    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.chdir(tmp_path)
    (run / RUN_FILE).write_text(json.dumps(TrainSettings(corpus="corpus.txt", out=str(run), seq_len=20).to_dict()))
    (run / STATE_FILE).write_text(RunState.start(hashlib.sha256(corpus.read_bytes()).hexdigest(), []).to_json())
    moved = tmp_path / "elsewhere" / "same.txt"
    moved.parent.mkdir()
    corpus.rename(moved)
    other = tmp_path / "other.txt"
    other.write_text(PERIODIC[::-1] * 20)

    result = invoke("train", "--corpus", "corpus.txt", "--out", str(run), "--resume", "--max-steps", "1")
    assert result.exit_code == 1 and "corpus.txt: no such file" in result.output
    assert "give its path now with --corpus" in result.output
    result = invoke("train", "--corpus", str(other), "--out", str(run), "--resume", "--max-steps", "1")
    assert result.exit_code == 1, result.output
    assert f"--resume: {other} is not the corpus the run started on (corpus.txt): its sha256 differs" in result.output
    monkeypatch.chdir(moved.parent)
    result = invoke("train", "--corpus", "same.txt", "--out", str(run), "--resume", "--max-steps", "1", "--eval-every", "1")
    assert result.exit_code == 0, result.output
    assert "prepared same.txt" in result.output and "stopped (max-steps) after epoch 1" in result.output
    assert "\nint8 graph: int8 " in result.output and " nats/char against float32 " in result.output  # which graph serves


def test_a_directory_of_files_with_held_out_ones(tmp_path):
    """--corpus DIR with --include/--exclude and --validation-files: the run records the files it
    read (name, size, sha256) beside their token file, and validates on the held-out one only."""
    books = tmp_path / "books"
    books.mkdir()
    for name, seed in (("a.txt", 1), ("b.txt", 2), ("notes.md", 3), ("held.txt", 4)):
        (books / name).write_text(words(3000, seed=seed))
    run = tmp_path / "run"
    result = invoke("train", "--corpus", str(books), "--include", "*.txt", "--exclude", "b.*",
                    "--validation-files", "held.txt", "--out", str(run), "--layers", "1", "--units", "16",
                    "--seq-len", "50", "--batch-size", "8", "--max-steps", "3")
    assert result.exit_code == 0, result.output
    sources = json.loads((run / "data" / "sources.json").read_text())
    assert [(s["name"], s["held_out"]) for s in sources["sources"]] == [(f"{books}/a.txt", False), (f"{books}/held.txt", True)]
    assert sources["sources"][1]["sha256"] == hashlib.sha256((books / "held.txt").read_bytes()).hexdigest()
    meta = artifact.load(run).meta
    assert meta.corpus.name == "books/ (2 files)" and meta.split.validation_chars == 3000
    ends_with_newline = (books / "a.txt").read_text().endswith("\n")
    assert meta.split.train_chars == 3000 + (1 if ends_with_newline else 2)  # a.txt, then "\n\n" between documents


def test_a_directory_says_what_it_left_out_and_a_run_keeps_its_drop_control(tmp_path, capsys):
    """A directory like Debian's fortunes (links to its texts, binary indexes, bells and backspaces)
    trains in one try; the lines say what was left out, and --drop-control stays with the run."""
    from model.training.train import RUN_FILE, TrainSettings, prepare

    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a").write_text(PERIODIC * 10 + "ring\x07 ba\x08ck\n")
    (texts / "a.u8").symlink_to("a")
    (texts / "a.dat").write_bytes(b"\x00\x00\x00\x02" + bytes(60))
    run = tmp_path / "run"
    got = prepare(TrainSettings(corpus=str(texts), out=str(run), seq_len=20, drop_control=True), False)
    assert "\x07" not in got.corpus.vocabulary and "\x08" not in got.corpus.vocabulary
    assert capsys.readouterr().out.splitlines() == [
        f"{texts}: skipped 1 link to a file already in the corpus (a.u8 -> a)",
        f"{texts}: skipped 1 binary file (a.dat)",
        "texts/ (1 files): 2 control characters (not printable text, newline or tab) in 1 file (a): "
        "U+0007 BEL ×1, U+0008 BS ×1; left out of the text and the vocabulary (--drop-control)",
        "warning: the validation text has only 46 characters: its loss, which picks the best model and stops the run, "
        "says little (raise --validation, or hold out more with --validation-files)"]

    # a resumed run keeps the setting it started with: its token file is made with it
    run.mkdir()
    (run / RUN_FILE).write_text(json.dumps(got.settings.to_dict()))
    assert prepare(TrainSettings(corpus=str(texts), out=str(run)), True, frozenset()).settings.drop_control
    (run / RUN_FILE).write_text(json.dumps(TrainSettings(corpus=str(texts), out=str(run), seq_len=20).to_dict()))
    result = invoke("train", "--corpus", str(texts), "--out", str(run), "--resume", "--drop-control")
    assert result.exit_code == 1 and "--drop-control True differs from the run's False" in result.output


def test_out_that_is_a_file(tmp_path, corpus):
    (tmp_path / "file").write_text("keep me")
    result = invoke("train", "--corpus", str(corpus), "--out", str(tmp_path / "file"))
    assert result.exit_code == 2 and "is a file" in result.output
    assert (tmp_path / "file").read_text() == "keep me"
    assert not (tmp_path / "run").exists()


def test_tensorboard_without_the_package_is_refused(tmp_path, corpus, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    result = invoke("train", "--corpus", str(corpus), "--out", str(tmp_path / "run"), "--tensorboard")
    assert result.exit_code == 1 and "--tensorboard needs the tensorboard package" in result.output
    assert not (tmp_path / "run").exists()


def test_resume_in_an_empty_directory(tmp_path, corpus):
    (tmp_path / "run").mkdir()
    result = invoke("train", "--corpus", str(corpus), "--out", str(tmp_path / "run"), "--resume")
    assert result.exit_code == 1 and "holds no run to resume" in result.output
    assert list((tmp_path / "run").iterdir()) == []


def test_defaults_are_the_library_defaults(tmp_path, corpus):
    """`chargen train` with no flags trains what TrainSettings and ModelConfig describe."""
    from model.records.config import ModelConfig
    from model.training.train import TrainSettings

    run = tmp_path / "run"
    result = invoke("train", "--corpus", str(corpus), "--out", str(run), "--epochs", "1")
    assert result.exit_code == 0, result.output
    assert "epoch 1: train " in result.output and " bits), validation " in result.output
    saved = json.loads((run / "run.json").read_text())
    expected = TrainSettings(corpus=str(corpus), out=str(run), epochs=1).to_dict()
    assert {k: saved[k] for k in expected} == expected
    assert saved["config"] == ModelConfig().to_dict() == {"cell": "lstm", "layers": 2, "units": 256, "embedding": 64, "dropout": 0.0}
    assert (saved["seq_len"], saved["batch_size"], saved["lr"], saved["lr_decay"], saved["clipnorm"]) == (100, 64, 2e-3, 0.95, 5.0)
    assert (saved["patience"], saved["validation_fraction"], saved["tensorboard"]) == (5, 0.1, False)
    assert artifact.load(run).config == ModelConfig()


# ---------------------------------------------------------------- kill -9, then --resume


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_completed_epoch(tmp_path):
    corpus = tmp_path / "words.txt"
    corpus.write_text(words(20_000))
    run = tmp_path / "run"
    epochs, seq_len, batch_size, lr, decay = 6, 50, 16, 0.005, 0.9
    command = [CHARGEN, "train", "--corpus", str(corpus), "--out", str(run), "--layers", "1", "--units", "32",
               "--embedding", "16", "--seq-len", str(seq_len), "--batch-size", str(batch_size), "--lr", str(lr),
               "--lr-decay", str(decay), "--epochs", str(epochs), "--patience", "0", "--tensorboard"]
    steps_per_epoch = (int(20_000 * 0.9) // seq_len) // batch_size

    # start it and SIGKILL it once state.json records epoch 2 (it is then somewhere in epoch 3)
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            def past_epoch_2() -> bool:
                state = run / "state.json"
                return first.poll() is not None or (state.exists() and json.loads(state.read_text())["epoch"] >= 2)

            wait_for(past_epoch_2, timeout=180, interval=0.02)
            assert first.poll() is None, f"the run ended before it could be killed:\n{(tmp_path / 'first.log').read_text()}"
            first.send_signal(signal.SIGKILL)
        finally:
            first.kill()
            first.wait(timeout=30)
    killed_at = json.loads((run / "state.json").read_text())["epoch"]
    assert 2 <= killed_at < epochs
    first_log = (tmp_path / "first.log").read_text()
    assert "\x1b" not in first_log and "\b" not in first_log  # no progress-bar codes when stdout is a file
    assert f"epoch {killed_at}: train " in first_log
    assert artifact.load(run).meta.training.epochs <= killed_at + 1  # whole (maybe not yet in state.json)

    # a second start without --resume refuses to touch the run
    before = (run / "state.json").read_text()
    result = invoke(*command[1:])
    assert result.exit_code == 1 and "already holds a training run: pass --resume" in result.output
    assert (run / "state.json").read_text() == before

    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming {run} after epoch {killed_at} (optimizer step {killed_at * steps_per_epoch})" in resumed.stdout
    assert f"epoch {killed_at + 1}: train " in resumed.stdout and f"epoch {killed_at}: train " not in resumed.stdout

    state = json.loads((run / "state.json").read_text())
    history = json.loads((run / "history.json").read_text())
    assert state["epoch"] == epochs
    assert [row["epoch"] for row in history] == list(range(1, epochs + 1))  # each epoch exactly once
    assert (run / "history.csv").read_text().count("\n") == epochs + 1
    checkpoint = keras.saving.load_model(run / "checkpoint.keras", compile=True, safe_mode=True)
    assert int(keras.ops.convert_to_numpy(checkpoint.optimizer.iterations)) == epochs * steps_per_epoch
    # the learning-rate schedule went on from the carried-over step count
    assert history[-1]["learning_rate"] == pytest.approx(lr * decay**epochs, rel=1e-4)
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))

    best = artifact.load(run)
    assert best.meta.validation.nats_per_char == pytest.approx(min(r["val_nats_per_char"] for r in history), abs=1e-5)
    assert best.meta.command.startswith("chargen train --corpus ")
    assert sorted(p.name for p in (run / "artifacts").iterdir()) == [best.path.resolve().name]


def test_the_presets_are_described_as_command_lines():
    described = " ".join(invoke("train", "--help").output.split())
    assert "--locked, --weight-decay 0.1" in described and "--locked True" not in described


def test_a_run_directory_another_training_writes_is_refused(tmp_path, corpus):
    """Two trainings on one --out at once overwrote each other's files: the process writing a run
    directory holds its lock, and a second (new or --resume) is refused, naming it, writing nothing."""
    from model.training.train import LOCK_FILE, RUN_FILE

    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys\n"
        f"fd = os.open({str(run / LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'%d' % os.getpid()); print('held', flush=True)\n"
        "sys.stdin.read()")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        tiny = ("--corpus", str(corpus), "--out", str(run), "--units", "8", "--embedding", "4", "--seq-len", "20",
                "--max-steps", "1", "--eval-every", "1", "--sample-chars", "0")
        result = invoke("train", *tiny)
        assert result.exit_code == 1
        assert f"{run} is being written by another training (pid {holder.pid})" in result.output, result.output
        assert not (run / RUN_FILE).exists()
    finally:
        holder.communicate("", timeout=10)
    result = invoke("train", *tiny)  # the holder has ended: its lock went with it
    assert result.exit_code == 0, result.output
    assert (run / RUN_FILE).exists()


def test_a_shared_data_folder_says_when_it_makes_the_token_file_again(tmp_path, corpus):
    other = tmp_path / "other.txt"
    other.write_text(PERIODIC[::-1] * 20)
    data = tmp_path / "tokens"
    tiny = ("--data", str(data), "--units", "8", "--embedding", "4", "--seq-len", "20", "--max-steps", "1",
            "--eval-every", "1", "--sample-chars", "0")
    first = invoke("train", "--corpus", str(corpus), "--out", str(tmp_path / "a"), *tiny)
    assert first.exit_code == 0, first.output
    assert "is made again" not in first.output  # there was none
    assert "warning: the validation text has only 90 characters: its loss" in first.output  # a tenth of 900
    second = invoke("train", "--corpus", str(other), "--out", str(tmp_path / "b"), *tiny)
    assert second.exit_code == 0, second.output
    made_again = [line for line in second.output.splitlines() if "is made again" in line]
    assert made_again == [f"the token file in {data} is made again: it holds other files ({corpus}, not {other})"], made_again


def test_a_lock_that_is_not_a_file_is_named(tmp_path, corpus):
    from model.training.train import LOCK_FILE

    run = tmp_path / "run"
    (run / LOCK_FILE).mkdir(parents=True)
    result = invoke("train", "--corpus", str(corpus), "--out", str(run), "--units", "8", "--seq-len", "20", "--max-steps", "1")
    assert result.exit_code == 1 and f"{run / LOCK_FILE}: cannot be used as the run's lock: Is a directory" in result.output


def test_resume_refuses_a_changed_network_or_data_setting(tmp_path, corpus):
    """A resumed run keeps its settings; a differing flag is an error, not silently ignored."""
    from model.records.config import ModelConfig
    from model.training.train import RUN_FILE, TrainingError, TrainSettings, prepare

    run = tmp_path / "run"
    run.mkdir()
    saved = TrainSettings(corpus=str(corpus), out=str(run), config=ModelConfig(units=32), seq_len=20)
    (run / RUN_FILE).write_text(json.dumps(saved.to_dict()))
    before = sorted(p.name for p in run.iterdir())

    result = invoke("train", "--corpus", str(corpus), "--out", str(run), "--resume", "--units", "64")
    assert result.exit_code == 1 and "--units 64 differs from the run's 32" in result.output
    result = invoke("train", "--corpus", str(corpus), "--out", str(run), "--resume", "--seq-len", "30")
    assert result.exit_code == 1 and "--seq-len 30 differs from the run's 20" in result.output
    assert sorted(p.name for p in run.iterdir()) == before

    # the same values, or the settings a resumed run may change, are accepted
    given = TrainSettings(corpus=str(corpus), out=str(run), config=ModelConfig(units=32), seq_len=20, epochs=99)
    settings = prepare(given, True, frozenset({"units", "seq_len", "epochs"})).settings
    assert settings.config.units == 32 and settings.epochs == 99
    with pytest.raises(TrainingError, match="--validation 0.2 differs"):
        prepare(TrainSettings(corpus=str(corpus), out=str(run), validation_fraction=0.2), True, frozenset({"validation_fraction"}))
