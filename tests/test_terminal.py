"""train, sample and evaluate typed in a terminal: what a person sees on the screen (tests/terminal.py
gives each command a pseudo-terminal; output piped to a file once hid a crash of the progress bar)."""

from __future__ import annotations

import json
import shlex
import signal
from pathlib import Path

import pytest
from conftest import PERIODIC
from terminal import CHARGEN, run_on_terminal

from model.runtime import artifact


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(PERIODIC * 60)
    return path


@pytest.mark.slow
def test_train_on_a_terminal_shows_the_bar_the_epoch_lines_and_the_samples(tmp_path, corpus):
    run = tmp_path / "run"
    screen = run_on_terminal([CHARGEN, "train", "--corpus", str(corpus), "--out", str(run), "--layers", "1",
                              "--units", "16", "--embedding", "8", "--seq-len", "20", "--batch-size", "8",
                              "--epochs", "2", "--sample-chars", "30"])
    assert screen.returncode == 0, screen.raw[-3000:]
    assert "Traceback" not in screen.raw
    # the run's own header above each epoch's bar, and no "Epoch 1/1" of Keras' per fit() call
    assert "Epoch 1/2" in screen.text and "Epoch 2/2" in screen.text and "Epoch 1/1" not in screen.raw
    steps = (len(PERIODIC * 60) * 9 // 10 // 20) // 8
    assert f"{steps}/{steps}" in screen.text and "loss: " in screen.text  # the bar, drawn to its end
    assert screen.raw.count("\r") > screen.raw.count("\r\n")  # redrawn in place: more \r than line ends
    assert "epoch 1: train " in screen.text and "epoch 2: train " in screen.text and " bits), validation " in screen.text
    assert "  T=0.5 novelty " in screen.text and "  T=1 novelty " in screen.text  # the samples after each evaluation
    assert f"artifact {run / 'best'}" in screen.text
    assert artifact.load(run).meta.training.epochs in (1, 2)


@pytest.mark.slow
def test_ctrl_c_says_how_to_continue_and_the_artifact_records_each_command(tmp_path, corpus):
    """Ctrl-C during training prints the command that continues the run (the one typed, with
    --resume); running it finishes the run, and meta.json keeps how the model was made: the command
    that started the run and each resume."""
    run = tmp_path / "run"
    args = ["train", "--corpus", str(corpus), "--out", str(run), "--layers", "1", "--units", "16", "--embedding", "8",
            "--seq-len", "20", "--batch-size", "8", "--epochs", "40", "--patience", "0", "--sample-chars", "0"]
    screen = run_on_terminal([CHARGEN, *args], interrupt_at="Epoch 3/40")
    assert screen.returncode == 130, screen.raw[-3000:]
    assert "Traceback" not in screen.raw
    lines = screen.text.splitlines()
    continue_with = lines[lines.index(f"interrupted; the run in {run} keeps its last evaluation. Continue it with:") + 1]
    assert continue_with == "  " + shlex.join([CHARGEN, *args, "--resume"])
    assert json.loads((run / "state.json").read_text())["epoch"] == 2

    resumed = run_on_terminal(shlex.split(continue_with.replace(CHARGEN, CHARGEN + " --backend tensorflow", 1)))
    assert resumed.returncode == 0, resumed.raw[-3000:]
    assert f"resuming {run} after epoch 2" in resumed.text and "epoch 40: train " in resumed.text
    meta = artifact.load(run).meta
    assert meta.command == "chargen " + shlex.join(args)
    assert meta.resumed == ["chargen --backend tensorflow " + shlex.join([*args, "--resume"])]
    assert json.loads((run / "best" / "meta.json").read_text())["resumed"] == meta.resumed


@pytest.mark.slow
def test_a_narrow_terminal_gets_the_lines_without_the_bar(tmp_path, corpus):
    """At 40 columns Keras' bar wrapped, and each redraw left a line behind: the run writes its
    evaluation lines only, as to a file."""
    run = tmp_path / "run"
    screen = run_on_terminal([CHARGEN, "train", "--corpus", str(corpus), "--out", str(run), "--layers", "1", "--units", "8",
                              "--embedding", "4", "--seq-len", "20", "--batch-size", "8", "--epochs", "1",
                              "--sample-chars", "0"], columns=40)
    assert screen.returncode == 0, screen.raw[-3000:]
    assert "epoch 1: train " in screen.text and "━" not in screen.raw
    assert screen.raw.count("\r") == screen.raw.count("\r\n")  # nothing redrawn in place


@pytest.mark.slow
def test_sigterm_stops_a_run_as_ctrl_c_does(tmp_path, corpus):
    """docker stop, Kubernetes and supervisors stop a training with SIGTERM: it ended the process
    silently (status -15); it now stops at the end of the batch and says how to continue, as Ctrl-C."""
    run = tmp_path / "run"
    args = ["train", "--corpus", str(corpus), "--out", str(run), "--layers", "1", "--units", "16", "--embedding", "8",
            "--seq-len", "20", "--batch-size", "8", "--epochs", "40", "--patience", "0", "--sample-chars", "0"]
    screen = run_on_terminal([CHARGEN, *args], interrupt_at="Epoch 3/40", interrupt_with=signal.SIGTERM)
    assert screen.returncode == 143, screen.raw[-3000:]
    assert "Traceback" not in screen.raw
    lines = screen.text.splitlines()
    continue_with = lines[lines.index(f"stopped (SIGTERM); the run in {run} keeps its last evaluation. Continue it with:") + 1]
    assert continue_with == "  " + shlex.join([CHARGEN, *args, "--resume"])
    assert json.loads((run / "state.json").read_text())["epoch"] == 2


@pytest.mark.slow
def test_a_signal_as_an_evaluation_is_reported_waits_for_its_save(tmp_path, corpus):
    """The evaluation's line is printed before its artifact and state are saved: a SIGTERM then used
    to drop what the line had just reported ("keeps its last evaluation" meant the one before)."""
    run = tmp_path / "run"
    args = ["train", "--corpus", str(corpus), "--out", str(run), "--layers", "1", "--units", "16", "--embedding", "8",
            "--seq-len", "20", "--batch-size", "8", "--epochs", "40", "--patience", "0", "--sample-chars", "0"]
    screen = run_on_terminal([CHARGEN, *args], interrupt_at="epoch 2: train ", interrupt_with=signal.SIGTERM)
    assert screen.returncode == 143, screen.raw[-3000:]
    assert f"stopped (SIGTERM); the run in {run} keeps its last evaluation." in screen.text
    assert json.loads((run / "state.json").read_text())["epoch"] >= 2  # the one reported, saved


@pytest.mark.slow
def test_ctrl_c_before_the_first_evaluation_says_the_run_starts_over(tmp_path, corpus):
    run = tmp_path / "run"
    args = ["train", "--corpus", str(corpus), "--out", str(run), "--layers", "1", "--units", "16", "--embedding", "8",
            "--seq-len", "20", "--batch-size", "8", "--epochs", "40", "--sample-chars", "0"]
    screen = run_on_terminal([CHARGEN, *args], interrupt_at="untrained loss would be")
    assert screen.returncode == 130, screen.raw[-3000:]
    assert "Traceback" not in screen.raw and not (run / "state.json").exists()
    lines = screen.text.splitlines()
    continue_with = lines[lines.index(f"interrupted; the run in {run} has no evaluation yet: it starts over. Continue it with:") + 1]
    assert continue_with == "  " + shlex.join([CHARGEN, *args, "--resume"])


def test_sample_on_a_terminal_ends_its_text_with_a_newline(tiny_artifact):
    screen = run_on_terminal([CHARGEN, "sample", "--artifact", str(tiny_artifact), "--prompt", "the quick",
                              "--temperature", "0", "--max-chars", "40"])
    assert screen.returncode == 0, screen.raw
    assert screen.raw.startswith("the quick brown fox")
    assert screen.raw.endswith("\r\n")  # the shell's prompt starts on a line of its own

    stopped = run_on_terminal([CHARGEN, "sample", "--artifact", str(tiny_artifact), "--prompt", "the quick",
                               "--temperature", "0", "--stop", "lazy"])
    assert stopped.returncode == 0, stopped.raw
    assert stopped.raw == "the quick brown fox jumps over the \r\n"


@pytest.mark.slow
def test_evaluate_on_a_terminal(tmp_path, tiny_artifact):
    text = tmp_path / "text.txt"
    text.write_text(PERIODIC * 10)
    screen = run_on_terminal([CHARGEN, "evaluate", "--artifact", str(tiny_artifact), "--text", str(text)])
    assert screen.returncode == 0, screen.raw
    assert "Traceback" not in screen.raw
    lines = screen.text.splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("artifact  ")):]  # after TensorFlow's notices
    assert lines[0].startswith(f"artifact  {tiny_artifact}") and lines[1].startswith(f"text      {text}: 450 characters")
    assert lines[2].startswith("carried ") and lines[3].startswith("window ") and " bits/char " in lines[3]
