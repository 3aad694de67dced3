"""`chargen evaluate`: nats and bits per character on any text, with the state carried and in
windows from a fresh state (nanoGPT's measure), characters outside the vocabulary."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner
from conftest import PERIODIC, ROOT

from chargen.cli import main


def evaluate(*args: str):
    result = CliRunner().invoke(main, ["evaluate", *args])
    assert "Traceback" not in result.output, result.output
    return result


def test_loss_on_the_text_it_learned(tiny_artifact, tmp_path):
    text = tmp_path / "periodic.txt"
    text.write_text(PERIODIC * 20)
    result = evaluate("--artifact", str(tiny_artifact), "--text", str(text), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["nats_per_char"] < 0.05
    assert data["bits_per_char"] == pytest.approx(data["nats_per_char"] / math.log(2), abs=1e-4)
    assert data["chars"] == len(PERIODIC) * 20 and data["outside_vocabulary"] == 0 and data["dropped"] == 0
    assert data["chars_scored"] == len(PERIODIC) * 20 - 1  # one stream: every character but the first
    assert data["streams"] == 1
    window = data["window"]
    assert window["window"] == 256 and window["chars_scored"] == 3 * 256  # whole blocks only: 899 // 256
    assert window["nats_per_char"] < 0.1 and window["bits_per_char"] == pytest.approx(window["nats_per_char"] / math.log(2), abs=1e-4)


def test_the_validation_part_scores_as_training_reported(tiny_artifact, tmp_path):
    """The same scorer on the same characters gives the loss recorded in meta.json."""
    meta = json.loads((tiny_artifact / "meta.json").read_text())
    corpus = (tiny_artifact.parent.parent / f"{tiny_artifact.parent.name}-corpus.txt").read_text()
    n_train = meta["split"]["train_chars"]
    (tmp_path / "validation.txt").write_text(corpus[n_train:])
    run_dir = tiny_artifact.parent  # a run directory stands for its best artifact
    result = evaluate("--artifact", str(run_dir), "--text", str(tmp_path / "validation.txt"), "--json")
    data = json.loads(result.stdout)
    assert data["nats_per_char"] == pytest.approx(meta["validation"]["nats_per_char"], abs=1e-4)
    assert data["chars_scored"] == meta["validation"]["chars_scored"]


def test_characters_outside_the_vocabulary_are_replaced_or_dropped_and_counted(tiny_artifact, tmp_path):
    text = tmp_path / "odd.txt"
    text.write_text("thé quick brown fox jumps over the lazy dog.€\r\n" * 3)  # é -> e; € is dropped
    result = evaluate("--artifact", str(tiny_artifact), "--text", str(text))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"artifact  {tiny_artifact}: lstm 1x32, vocabulary 29, trained on ")
    assert lines[1] == f"text      {text}: 138 characters, 6 outside the vocabulary (3 replaced by their base form, 3 dropped)"
    nats, bits = (float(x) for x in lines[2].split()[1:5:3])
    assert nats < 0.1 and bits == pytest.approx(nats / math.log(2), abs=2e-4)
    assert lines[2].startswith("carried ") and "nats/char" in lines[2] and "bits/char" in lines[2]
    assert lines[2].endswith("(134 characters predicted, state carried through each of 1 stream)")
    assert lines[3].startswith("window ") and lines[3].endswith(
        "(134 characters predicted, windows of 134 from a fresh state)")  # shorter than one block: one block


@pytest.mark.parametrize("content, problem", [
    (None, "no such file"),
    (b"", "the file is empty"),
    (b"caf\xe9", "not UTF-8 text (byte 0xe9 at offset 3 is invalid)"),
    ("t".encode(), "only 1 character(s) the model knows; at least 2 are needed"),
    ("€€€ ☃☃".encode(), "only 1 character(s) the model knows"),
])
def test_bad_texts(tiny_artifact, tmp_path, content, problem):
    text = tmp_path / "t.txt"
    if content is not None:
        text.write_bytes(content)
    result = evaluate("--artifact", str(tiny_artifact), "--text", str(text))
    assert result.exit_code == 1
    assert problem in result.output and "t.txt" in result.output


def test_bad_artifacts(tmp_path):
    (tmp_path / "t.txt").write_text(PERIODIC)
    result = evaluate("--artifact", str(tmp_path / "nothing"), "--text", str(tmp_path / "t.txt"))
    assert result.exit_code == 1 and "nothing: no such artifact directory" in result.output
    (tmp_path / "empty").mkdir()
    result = evaluate("--artifact", str(tmp_path / "empty"), "--text", str(tmp_path / "t.txt"))
    assert result.exit_code == 1 and "missing model.keras, vocab.json, meta.json" in result.output
    result = evaluate("--artifact", str(tmp_path / "empty"), "--text", str(tmp_path))
    assert result.exit_code == 1 and "is a directory" in result.output


def test_a_deadline_scores_a_prefix_of_whole_groups(tiny_artifact):
    """Training's --max-minutes bounds validation: scoring stops between network calls, after at
    least one, and the loss is that of the streams scored so far (a prefix of the text)."""
    import time

    import numpy as np

    from model.training import artifacts
    from model.training.evaluate import StreamScorer

    loaded = artifacts.load_keras(tiny_artifact)
    ids = loaded.vocab.encode(PERIODIC * 400).ids  # 18,000 characters
    scorer = StreamScorer(n_streams=16, batch=4)  # 16 streams of 1,125 characters, 4 per call
    assert scorer.groups(ids) == 4 and scorer.scored(ids) == 16 * 1124
    whole = scorer.loss(loaded.model, ids)
    assert whole.chars == scorer.scored(ids) == scorer.loss(loaded.model, ids, deadline=time.monotonic() + 600).chars
    first = scorer.loss(loaded.model, ids, deadline=0.0)  # already passed: exactly one call
    assert first.chars == 4 * 1124
    prefix = StreamScorer(n_streams=4, batch=4).loss(loaded.model, ids[: 4 * 1125])  # the first 4 streams alone
    assert (prefix.chars, prefix.nats) == (first.chars, pytest.approx(first.nats, abs=1e-6))
    assert np.isfinite(first.nats) and first.nats < 0.1


def test_window_256_is_nanogpts_block_of_257_characters(tiny_artifact):
    """Block k is characters 256k .. 256k+256 run from a zero state: its first target is predicted
    from one character, its last from 256; only whole blocks count."""
    import keras

    from model.training import artifacts
    from model.training.evaluate import StreamScorer, nats_of, window_loss

    loaded = artifacts.load_keras(tiny_artifact)
    ids = loaded.vocab.encode((PERIODIC + "the lazy fox.\n") * 11).ids  # 649 characters
    total = 0.0
    for start in (0, 256):  # the last 136 targets do not fill a block
        block = ids[start : start + 257][None, :]
        total += nats_of(keras.ops.convert_to_numpy(loaded.model.predict_on_batch(block[:, :-1])), block[:, 1:])
    loss = window_loss(loaded.model, ids, 256, batch=1)
    assert loss.chars == 512 and loss.nats == pytest.approx(total / 512, abs=1e-6)
    assert window_loss(loaded.model, ids, 256).nats == pytest.approx(loss.nats, abs=1e-6)  # batching changes nothing

    # window 1: every character predicted from the one before it alone
    single = keras.ops.convert_to_numpy(loaded.model.predict_on_batch(ids[:-1, None]))  # (N, 1, V)
    first = window_loss(loaded.model, ids, 1)
    assert first.chars == len(ids) - 1 and first.nats == pytest.approx(nats_of(single, ids[1:, None]) / first.chars, abs=1e-6)
    # one window as long as the text: the carried state through one stream
    whole = StreamScorer(n_streams=1, max_len=len(ids)).loss(loaded.model, ids)
    assert window_loss(loaded.model, ids, len(ids) - 1).nats == pytest.approx(whole.nats, abs=1e-6)
    assert loss.nats < first.nats  # one character of context knows less


def test_the_window_option(tiny_artifact, tmp_path):
    text = tmp_path / "periodic.txt"
    text.write_text(PERIODIC * 20)  # 900 characters
    result = evaluate("--artifact", str(tiny_artifact), "--text", str(text), "--window", "100")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[3].endswith("(800 characters predicted, windows of 100 from a fresh state)")
    result = evaluate("--artifact", str(tiny_artifact), "--text", str(text))
    assert result.stdout.splitlines()[3].endswith(
        "(768 characters predicted, windows of 256 from a fresh state, as nanoGPT estimates)")


@pytest.mark.slow  # dynamic evaluation of the shipped 3x384 model over 20,000 characters
def test_the_shipped_model_on_shakespeare(shakespeare, tmp_path):
    """The three measures on the first 20,000 characters of tinyshakespeare's validation split (its
    last 10%), scored by the shipped model: a window from a fresh state knows less than a carried
    stream, and dynamic evaluation with its defaults adapts to the text."""
    text = shakespeare.read_text(encoding="utf-8")
    (tmp_path / "val.txt").write_text(text[int(len(text) * 0.9):][:20_000], encoding="utf-8")
    result = evaluate("--artifact", str(ROOT / "artifacts" / "default"), "--text", str(tmp_path / "val.txt"),
                      "--dynamic", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    carried, window = data["nats_per_char"], data["window"]["nats_per_char"]
    static, dynamic = data["dynamic"]["static"]["nats_per_char"], data["dynamic"]["dynamic"]["nats_per_char"]
    assert 1.0 < dynamic < static < window < 2.0 and carried < window
    assert dynamic < static - 0.02
