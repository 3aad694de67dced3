"""Samples while training (model/training/samples.py): the novelty index of the training text, sampling the
network being trained as `chargen sample` does, and the log lines."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from model.runtime.artifact import Artifact
from model.runtime.engine import Engine, GenerationRequest
from model.training.onnx_graph import build_graph
from model.training.samples import BUDGET, Novelty, format_samples, samples
from model.runtime.sampling import SamplingSettings
from model.records.vocab import Vocab
from conftest import random_network

VOCAB = Vocab("\n abcdefghijklmnopqrstuvw.,")


def random_ids(n: int, low: int, high: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, n, dtype=np.uint8)


# ---------------------------------------------------------------- novelty


def test_a_piece_of_the_training_text_is_not_novel():
    train = random_ids(5000, 0, 50)
    novelty = Novelty(train)
    assert novelty.whole and novelty.indexed_chars == 5000
    assert novelty.novelty(train[1234:1434]) == 0.0
    assert novelty.novelty(train[-20:]) == 0.0  # the last n-gram is indexed
    assert novelty.novelty(train[:20]) == 0.0  # and the first


def test_text_sharing_no_n_gram_is_wholly_novel():
    train = random_ids(5000, 0, 50)
    assert Novelty(train).novelty(random_ids(200, 50, 100)) == 1.0
    # the same characters as the training text, in an order it never has
    periodic = Novelty(np.tile(np.arange(3, dtype=np.uint8), 300))
    assert periodic.novelty(np.tile(np.array([0, 2, 1], np.uint8), 30)) == 1.0
    assert periodic.novelty(np.tile(np.array([1, 2, 0], np.uint8), 30)) == 0.0


@pytest.mark.parametrize("n", [20, 5])
def test_novelty_is_the_share_of_new_n_grams(n):
    train = random_ids(3000, 0, 50)
    sample = np.concatenate([train[100:150], random_ids(30, 50, 100)])  # 50 seen characters, then 30 new ones
    m = len(sample) - n + 1
    novel = m - (50 - n + 1)  # every n-gram that reaches into the new part
    assert Novelty(train, n=n).novelty(sample) == novel / m


def test_a_sample_shorter_than_n_has_no_novelty():
    novelty = Novelty(random_ids(1000, 0, 50))
    assert novelty.novelty(random_ids(19, 0, 50)) is None
    assert novelty.novelty([]) is None
    assert novelty.novelty(random_ids(20, 50, 100)) == 1.0


def test_a_training_text_shorter_than_n_makes_everything_novel():
    novelty = Novelty(random_ids(10, 0, 50))
    assert novelty.count == 0 and novelty.whole
    assert novelty.novelty(random_ids(30, 0, 50)) == 1.0


def test_above_the_budget_evenly_spaced_pieces_are_indexed():
    train = random_ids(10_000, 0, 60)
    novelty = Novelty(train, budget=8 * 1000, piece=100)
    assert not novelty.whole
    assert novelty.indexed_chars == 1000 and novelty.training_chars == 10_000
    assert len(novelty.ranges) == 10 and novelty.ranges[0][0] == 0 and novelty.ranges[-1][1] == 10_000
    assert all(stop - start == 100 for start, stop in novelty.ranges)
    assert all(a[1] <= b[0] for a, b in zip(novelty.ranges, novelty.ranges[1:]))  # no overlap
    assert novelty.count == 10 * (100 - 19)
    for start, stop in novelty.ranges:
        assert novelty.novelty(train[start:stop]) == 0.0  # inside a piece: seen
        gap = train[stop + 50 : stop + 150]
        if len(gap) == 100:
            assert novelty.novelty(gap) == 1.0  # between pieces: not indexed
    assert novelty.nbytes == 8 * 10 * (100 - 19) <= novelty.budget
    assert ("measured against 810 of its 9,981 20-grams (10 evenly spaced pieces, 1,000 of its 10,000 characters; "
            in novelty.describe() and novelty.describe().endswith("): an upper bound"))


def test_a_budget_below_one_piece_indexes_the_start():
    train = random_ids(10_000, 0, 60)
    novelty = Novelty(train, budget=8 * 500, piece=1000)
    assert novelty.ranges == [(0, 500)] and novelty.indexed_chars == 500
    assert novelty.novelty(train[:500]) == 0.0 and novelty.novelty(train[600:700]) == 1.0
    assert "the first 500 of its 10,000 characters" in novelty.describe()
    assert "all 10,000 characters" in Novelty(train).describe()


@pytest.mark.parametrize("budget", [8 * 10**9, 8 * 3000])
def test_building_in_chunks_over_a_memmap_gives_the_same_index(tmp_path: Path, budget):
    path = tmp_path / "tokens.bin"
    random_ids(10_007, 0, 60).tofile(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    chunked = Novelty(mapped, budget=budget, piece=700, chunk=97)
    whole = Novelty(np.array(mapped), budget=budget, piece=700, chunk=10**9)
    assert chunked.ranges == whole.ranges
    assert chunked.count == sum(stop - start - 19 for start, stop in whole.ranges)
    assert np.array_equal(chunked.sorted_hashes(), whole.sorted_hashes())


def test_novelty_is_exact_for_a_text_within_the_budget():
    train = random_ids(1000, 0, 60)
    exact = Novelty(train, budget=8 * 1000)
    assert exact.whole and exact.nbytes == 8 * 981 and "all 1,000 characters" in exact.describe()
    assert all(exact.novelty(train[i : i + 40]) == 0.0 for i in range(0, 961, 10))
    assert "an upper bound" not in exact.describe()
    over = Novelty(train, budget=8 * 999)  # one character more than fits: a sample of the text, and it says so
    assert not over.whole and over.nbytes <= 8 * 999 and "an upper bound" in over.describe()


@pytest.mark.parametrize("block", [1, 7, 512, 10**6])
def test_every_n_gram_is_found_whichever_block_holds_it(block):
    train = random_ids(20_000, 0, 60)
    novelty = Novelty(train, block=block)
    assert novelty.novelty(train) == 0.0
    assert novelty.novelty(random_ids(300, 60, 100)) == 1.0
    sample = np.concatenate([train[5000:5100], random_ids(50, 60, 100)])
    assert novelty.novelty(sample) == 50 / (150 - 19)  # the n-grams reaching into the new part
    # a few hashes repeated across many blocks: each is found in whichever block its search lands
    periodic = Novelty(np.tile(np.arange(3, dtype=np.uint8), 3000), block=block)
    assert periodic.count == 9000 - 19 and periodic.novelty(np.tile(np.array([1, 2, 0], np.uint8), 30)) == 0.0
    assert periodic.novelty(np.tile(np.array([0, 2, 1], np.uint8), 30)) == 1.0


@pytest.mark.parametrize("length", [10_000, 1_000_000])
def test_a_small_budget_holds_however_long_the_text(length):
    novelty = Novelty(random_ids(length, 0, 60), budget=8 * 4096, piece=512)
    assert novelty.nbytes <= 8 * 4096 and len(novelty.ranges) == 8 and novelty.training_chars == length


def test_the_default_index_stays_within_its_budget_on_a_longer_corpus(tmp_path: Path):
    """A memory-mapped text of 12 Mi characters, half as long again as the budget's 8 Mi: the index
    and the build's peak (numpy's allocations, which tracemalloc sees) stay within the budget and a
    chunk's scratch, and once built it keeps a 512th of it in memory."""
    path = tmp_path / "tokens.bin"
    with open(path, "wb") as f:
        for i in range(12):
            f.write(random_ids(1 << 20, 0, 65, seed=i).tobytes())
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    tracemalloc.start()
    try:
        novelty = Novelty(mapped)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert novelty.nbytes <= 64 << 20  # the budget README.md and the log state
    assert novelty.nbytes <= BUDGET and peak <= BUDGET + (32 << 20)
    assert held <= (1 << 20) and novelty.resident_bytes <= novelty.nbytes // 512 + 8
    assert not novelty.whole and novelty.indexed_chars == BUDGET // 8
    assert novelty.novelty(mapped[:200]) == 0.0  # the first piece is indexed
    assert novelty.describe().endswith("of its 12,582,912 characters; an index of 64.0 MiB on disk, at most 64 MiB): "
                                       "an upper bound")


def test_ids_of_any_integer_type_hash_alike():
    train = random_ids(2000, 0, 50)
    for dtype in (np.uint16, np.int32, np.int64):
        assert np.array_equal(Novelty(train.astype(dtype)).sorted_hashes(), Novelty(train).sorted_hashes())
    assert Novelty(train).novelty(list(train[10:60])) == 0.0


# ---------------------------------------------------------------- sampling


@pytest.fixture(scope="module")
def network():
    return random_network("lstm", 2, len(VOCAB))


def test_samples_have_the_asked_shape(network):
    rows = samples(network, VOCAB, temperatures=(0.5, 0.8, 1.0), length=120, seed=3)
    assert [row["temperature"] for row in rows] == [0.5, 0.8, 1.0]
    for row in rows:
        assert len(row["text"]) == 120 and set(row["text"]) <= set(VOCAB.chars)
        assert row["novelty"] is None
    assert samples(network, VOCAB, temperatures=(0.0,), length=0) == [{"temperature": 0.0, "text": "", "novelty": None}]


def test_samples_are_deterministic_for_a_seed(network):
    first = samples(network, VOCAB, length=100, seed=7)
    assert samples(network, VOCAB, length=100, seed=7) == first
    other = samples(network, VOCAB, length=100, seed=8)
    assert all(a["text"] != b["text"] for a, b in zip(first, other))


def test_samples_carry_their_novelty(network):
    rows = samples(network, VOCAB, length=100, seed=1)
    novelty = Novelty(VOCAB.encode(rows[0]["text"]).ids)
    scored = samples(network, VOCAB, length=100, seed=1, novelty=novelty)
    assert [row["text"] for row in scored] == [row["text"] for row in rows]
    assert scored[0]["novelty"] == 0.0
    for row in scored:
        assert row["novelty"] == novelty.novelty(VOCAB.encode(row["text"]).ids)


@pytest.mark.parametrize("vocab, prime", [(VOCAB, None), (VOCAB, "the "), (Vocab("abc\nde ."), None), (Vocab("abcde ."), None)])
def test_a_sample_is_what_the_engine_generates(tmp_path: Path, vocab, prime):
    """Temperature and seed mean what they mean in `chargen sample` (the engine, from the artifact's
    graph): an empty prompt starts after a newline, or after the first character without one; row i
    draws with seed + i."""
    model = random_network("lstm", 2, len(vocab), seed=4)
    (tmp_path / "model.onnx").write_bytes(build_graph(model).SerializeToString())
    engine = Engine(Artifact(tmp_path, model, vocab, {}, tmp_path / "model.onnx"), max_batch=1, threads=1)
    rows = samples(model, vocab, temperatures=(0.8, 1.0), length=150, seed=5, prime=prime)
    for i, row in enumerate(rows):  # row i: seed + i
        request = GenerationRequest(prompt=prime or "", max_chars=150, sampling=SamplingSettings(row["temperature"]),
                                    seed=5 + i)
        assert engine.generate(request).text == row["text"]


def test_samples_refuse_what_does_not_fit(network):
    with pytest.raises(ValueError, match="predicts 27 characters but the vocabulary has 3"):
        samples(network, Vocab("abc"), length=10)
    with pytest.raises(ValueError, match="no character of the vocabulary"):
        samples(network, VOCAB, length=10, prime="XYZ")
    with pytest.raises(ValueError, match="temperature"):
        samples(network, VOCAB, temperatures=(-1.0,), length=10)


# ---------------------------------------------------------------- the log


def test_format_samples_shows_one_line_per_temperature():
    rows = [{"temperature": 0.5, "text": "To be,\nor not", "novelty": 0.9375},
            {"temperature": 1.0, "text": "x" * 300, "novelty": None}]
    assert format_samples(rows).split("\n") == ["  T=0.5 novelty  93%: To be,⏎or not",
                                                "  T=1 novelty  n/a: " + "x" * 159 + "…"]
    assert format_samples(rows[1:], width=None) == "  T=1 novelty  n/a: " + "x" * 300
    assert "novelty 100%" in format_samples([{"temperature": 0.8, "text": "a", "novelty": 1.0}])
    # a corpus of coloured logs: its samples' escape sequences, bell and overrides are shown, not obeyed
    shown = format_samples([{"temperature": 1.0, "text": "\x1b[31mred\x1b]0;title\x07\u202eevil\x9b\tok", "novelty": None}])
    assert shown == "  T=1 novelty  n/a: ␛[31mred␛]0;title␇\\u202eevil\\u009b\tok"
    assert not any(c in shown for c in "\x1b\x07\u202e\x9b")
