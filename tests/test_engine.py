"""The generation engine (on the ONNX graph of a network) against the Keras model the graph was
built from, and its stream bookkeeping.

Exactness runs on tiny networks with random weights (no training): every cell and depth, weights
scaled up so states and predictions are far from trivial, but recurrent weights left at their
orthogonal initialization so the dynamics are not chaotic (a chaotic network amplifies float32
rounding in any two implementations, Keras against Keras on another backend included). Each
network's graph is built with model.training.onnx_graph and written to a temporary directory, as
`chargen export` writes an artifact's.
"""

from __future__ import annotations

import functools
import logging
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from model.runtime import network_step
from model.runtime.artifact import Artifact
from model.runtime.engine import CharLogprob, Engine, EngineFull, GenerationRequest, Stream
from model.runtime.network_step import NetworkStep
from model.runtime.onnx_step import OrtStep
from model.runtime.sampling import GREEDY, SamplingSettings, log_softmax, next_ids
from model.records.vocab import Vocab
from conftest import VOCAB, random_artifact

STEPS = 1000
TOLERANCE = 1e-4  # absolute, on natural-log probabilities
T1 = SamplingSettings(temperature=1.0)  # what a test's requests sample at unless it says otherwise
CASES = [(cell, layers) for cell in ("lstm", "gru", "rnn") for layers in (1, 2, 3)]
# From this many rows the tests' networks step on several threads: their own threshold (from their
# size) is above any batch a test runs.
ROWS_PER_THREAD = 8


@pytest.fixture(scope="session")
def artifact_for(tmp_path_factory):
    """artifact_for(cell, layers): the random network of that shape, made once per test session."""

    @functools.cache
    def make(cell: str, layers: int) -> Artifact:
        return random_artifact(cell, layers, tmp_path_factory.mktemp(f"{cell}-{layers}"))

    return make


def prompt_ids(prompt: str) -> list[int]:
    ids = VOCAB.encode(prompt).ids.tolist()
    return ids or [VOCAB.index["\n"]]  # the engine's rule for an empty prompt


def keras_logits(model: keras.Model, ids: list[int]) -> np.ndarray:
    """(len(ids), V): the Keras model's next-character logits after each prefix."""
    return keras.ops.convert_to_numpy(model.predict_on_batch(np.asarray(ids, dtype=np.int32)[None, :]))[0]


def keras_log_probs(model: keras.Model, ids: list[int]) -> np.ndarray:
    """(len(ids), V): the Keras model's next-character log-probabilities after each prefix."""
    return log_softmax(keras_logits(model, ids))


def run_collecting(engine: Engine, plan: list[tuple[int, GenerationRequest]], leave_at: dict[int, int] | None = None):
    """Start plan[i]'s request at its step, cancel stream i at step leave_at[i], step every running
    stream each step. Returns per request: (stream, [(V,) log-probabilities of each emitted char's
    position])."""
    leave_at = leave_at or {}
    out: list = [None] * len(plan)
    step = 0
    while step <= max(at for at, _ in plan) or any(s.finish_reason is None for s, _ in filter(None, out)):
        for i, (at, request) in enumerate(plan):
            if at == step:
                out[i] = (engine.start(request), [])
            if leave_at.get(i) == step:
                engine.cancel(out[i][0])
        live = [s for s, _ in filter(None, out) if s.finish_reason is None]
        for delta in engine.step(live):
            rows = next(rows for s, rows in filter(None, out) if s is delta.stream)
            for lp in delta.logprobs:
                row = np.full(len(VOCAB), np.nan)
                for char, value in lp.top:
                    row[VOCAB.index[char]] = value
                rows.append(row)
        step += 1
    return out


# ---------------------------------------------------------------- exactness against Keras


@pytest.mark.parametrize("cell,layers", CASES)
def test_single_stream_log_probs_match_keras_for_1000_steps(artifact_for, cell, layers):
    art = artifact_for(cell, layers)
    engine = Engine(art, max_batch=4)
    request = GenerationRequest("the cat sat on the mat", max_chars=STEPS, sampling=T1, seed=7, logprobs=len(VOCAB))
    ((stream, rows),) = run_collecting(engine, [(0, request)])
    assert len(stream.text) == STEPS and stream.finish_reason == "length"
    got = np.array(rows)  # (STEPS, V)
    ids = prompt_ids(request.prompt) + VOCAB.encode(stream.text).ids.tolist()
    want = keras_log_probs(art.model, ids[:-1])[len(prompt_ids(request.prompt)) - 1 :]
    assert np.abs(got - want).max() < TOLERANCE
    # the comparison means something: busy states, predictions far from uniform, varied text
    last = art.model.get_layer(f"rnn_{layers}")
    states = keras.Model(art.model.inputs, last.output).predict_on_batch(np.asarray(ids, np.int32)[None])
    assert np.abs(keras.ops.convert_to_numpy(states)).max() > 0.5
    entropy = -(np.exp(want) * want).sum(axis=1).mean()
    assert entropy < 0.8 * np.log(len(VOCAB))
    assert len(set(stream.text)) > 5


@pytest.mark.parametrize("cell,layers", CASES)
def test_batched_streams_log_probs_match_keras(artifact_for, cell, layers):
    """Streams with their own prompts (one empty, one with unknown characters) join at different
    steps and one leaves early; each matches Keras run on its own text alone."""
    art = artifact_for(cell, layers)
    engine = Engine(art, max_batch=8)
    plan = [
        (0, GenerationRequest("a long prompt, with words.", max_chars=STEPS, sampling=T1, seed=1, logprobs=len(VOCAB))),
        (3, GenerationRequest("", max_chars=STEPS, seed=2, sampling=SamplingSettings(1.3), logprobs=len(VOCAB))),
        (10, GenerationRequest("xyz ☃ éa", max_chars=400, seed=3, sampling=GREEDY, logprobs=len(VOCAB))),
        (250, GenerationRequest("b", max_chars=STEPS, seed=4, sampling=SamplingSettings(1.0, top_k=5), logprobs=len(VOCAB))),
    ]
    results = run_collecting(engine, plan, leave_at={3: 700})
    for (_, request), (stream, rows) in zip(plan, results):
        got = np.array(rows)
        n = len(rows)
        assert n == len(stream.text) and n >= 400
        ids = prompt_ids(request.prompt) + VOCAB.encode(stream.text).ids.tolist()
        want = keras_log_probs(art.model, ids[:-1])[len(prompt_ids(request.prompt)) - 1 :]
        assert np.abs(got - want).max() < TOLERANCE, request.prompt
    cancelled = results[3][0]
    assert cancelled.finish_reason == "cancelled" and len(cancelled.text) == 700 - 250
    assert engine.active == 0


# ---------------------------------------------------------------- the reference sampler


class KerasReference:
    """The reference sampler: the Keras model run on the whole text so far, then the same sampler.

    A recurrent model's prediction at a position depends only on the text before it, so the
    predictions along a `guess` of the continuation are computed in one call and reused for as long
    as the generated text follows the guess; anywhere else the model is run on the text so far.
    """

    def __init__(self, model: keras.Model):
        self.model = model

    def generate(self, request: GenerationRequest, guess: str = "") -> tuple[str, str]:
        start = prompt_ids(request.prompt)
        guess_ids = VOCAB.encode(guess).ids.tolist()
        known = keras_logits(self.model, start + guess_ids)  # raw logits: the repetition penalty depends on their sign
        rng = np.random.default_rng(request.seed)
        settings, prompt = request.sampling, VOCAB.encode(request.prompt).ids.tolist()  # the prompt without the empty one's newline
        window = settings.repetition_window if settings.repeats else 0
        generated: list[int] = []
        for _ in range(request.max_chars):
            if generated != guess_ids[: len(generated)] or len(generated) > len(guess_ids):
                known = keras_logits(self.model, start + generated)
            logits = known[len(start) + len(generated) - 1]
            # the penalties' counts, plainly: the last `window` characters (prompt included), and the generated ones
            recent = np.bincount((prompt + generated)[max(0, len(prompt) + len(generated) - window):] if window else [],
                                 minlength=len(VOCAB))
            counts = np.bincount(generated, minlength=len(VOCAB))
            generated.append(int(next_ids(logits[None, :], [settings], [rng], recent[None], counts[None])[0]))
            text = VOCAB.decode(generated)
            found = [text.find(s) for s in request.stop if s in text]
            if found:
                return text[: min(found)], "stop"
        return VOCAB.decode(generated), "length"


SETTINGS = [GREEDY, SamplingSettings(1.0), SamplingSettings(0.7, top_k=4), SamplingSettings(1.2, top_p=0.8)]
# penalties and biases, greedy and sampled; a window shorter than the prompt and one longer than it
PENALIZED = [SamplingSettings(0.0, presence_penalty=0.8, frequency_penalty=0.4),
             SamplingSettings(0.0, repetition_penalty=1.6, repetition_window=8),
             SamplingSettings(0.9, repetition_penalty=1.3, repetition_window=40, min_p=0.05),
             SamplingSettings(1.0, frequency_penalty=1.0, logit_bias=((VOCAB.index["e"], -100.0), (VOCAB.index["a"], 2.0))),
             SamplingSettings(0.8, presence_penalty=-0.5, repetition_penalty=0.8, repetition_window=3, top_k=5, min_p=0.1)]
PENALIZED_IDS = ["greedy-presence-frequency", "greedy-repetition", "repetition-min_p", "frequency-bias", "all"]


@pytest.mark.parametrize("cell,layers", [("lstm", 2), ("gru", 1)])
@pytest.mark.parametrize("settings", PENALIZED, ids=PENALIZED_IDS)
def test_engine_penalties_equal_the_reference_sampler(artifact_for, cell, layers, settings):
    """The engine's per-slot counts and ring buffers give what counting the text plainly gives."""
    art = artifact_for(cell, layers)
    request = GenerationRequest("to be or not to be", max_chars=250, sampling=settings, seed=12)
    stream = Engine(art).generate(request)
    assert (stream.text, stream.finish_reason) == KerasReference(art.model).generate(request, guess=stream.text)
    assert stream.text != Engine(art).generate(GenerationRequest(request.prompt, max_chars=250, seed=12,
                                                                 sampling=SamplingSettings(settings.temperature))).text
    assert Engine(art).generate(request).text == stream.text  # same seed and settings: the same text
    if settings.logit_bias:
        assert "e" not in stream.text


@pytest.mark.parametrize("cell,layers", [("lstm", 2), ("gru", 3), ("rnn", 1)])
@pytest.mark.parametrize("settings", SETTINGS, ids=["greedy", "t1", "topk", "topp"])
def test_engine_text_equals_reference_sampler(artifact_for, cell, layers, settings):
    art = artifact_for(cell, layers)
    reference = KerasReference(art.model)
    request = GenerationRequest("to be or not", max_chars=300, sampling=settings, seed=11)
    stream = Engine(art).generate(request)
    assert (stream.text, stream.finish_reason) == reference.generate(request, guess=stream.text)
    assert len(stream.text) == 300 and stream.finish_reason == "length"


@pytest.mark.parametrize("cell,layers", [("lstm", 1), ("gru", 2)])
def test_stop_sequences_behave_as_in_reference_sampler(artifact_for, cell, layers):
    art = artifact_for(cell, layers)
    reference = KerasReference(art.model)
    base = GenerationRequest("once upon", max_chars=300, sampling=SamplingSettings(0.9), seed=5)
    free_text = Engine(art).generate(base).text
    # stop sequences taken from the text itself, so they are met; one never occurs
    stops = (free_text[120:123], free_text[200:202], "zzzzzzzz")
    request = GenerationRequest(base.prompt, max_chars=300, sampling=base.sampling, seed=5, stop=stops)
    engine = Engine(art)
    stream = engine.start(request)
    emitted = []
    while stream.finish_reason is None:
        (delta,) = engine.step([stream])
        emitted.append(delta.text)
    assert stream.finish_reason == "stop"
    assert "".join(emitted) == stream.text
    assert all(s not in stream.text for s in stops)
    assert free_text.startswith(stream.text)  # same seed: the same text up to the stop
    assert (stream.text, stream.finish_reason) == reference.generate(request, guess=stream.text)


def test_greedy_reproduces_the_learned_periodic_text(tiny_artifact):
    from model.training.artifacts import load_keras
    from conftest import PERIODIC

    art = load_keras(tiny_artifact)  # the engine runs its model.onnx; Keras checks it below
    stream = Engine(art).generate(GenerationRequest("the quick ", max_chars=200, sampling=GREEDY))
    assert stream.text == (PERIODIC * 6)[10:210]
    # the Keras model agrees at every position (its vocabulary is not VOCAB, so no KerasReference)
    ids = art.vocab.encode("the quick " + stream.text).ids
    logits = keras.ops.convert_to_numpy(art.model.predict_on_batch(ids[None, :-1]))[0, 9:]
    assert art.vocab.decode(logits.argmax(axis=1)) == stream.text


# ---------------------------------------------------------------- streams joining and leaving


def test_streams_joining_and_leaving_give_the_same_text_as_each_run_alone(artifact_for):
    art = artifact_for("lstm", 2)
    free = Engine(art).generate(GenerationRequest("fifth", max_chars=300, sampling=T1, seed=5)).text
    requests = [
        GenerationRequest("first", max_chars=150, seed=1, sampling=SamplingSettings(1.0)),
        GenerationRequest("second one", max_chars=90, seed=2, sampling=GREEDY),
        GenerationRequest("", max_chars=200, seed=3, sampling=SamplingSettings(0.8, top_k=3), logprobs=2),
        GenerationRequest("fourth", max_chars=120, seed=4, sampling=SamplingSettings(1.5, top_p=0.9)),
        GenerationRequest("fifth", max_chars=300, sampling=T1, seed=5, stop=(free[200:203], "zz")),
        GenerationRequest("x", max_chars=400, seed=21, sampling=SamplingSettings(1.0)),
        *(GenerationRequest(f"penalized {i}", max_chars=100 + 37 * i, seed=30 + i, sampling=settings)
          for i, settings in enumerate(PENALIZED)),  # their counts and rings move with their slots
    ]
    alone = [Engine(art, max_batch=1).generate(r) for r in requests]
    assert alone[4].finish_reason == "stop" and alone[0].finish_reason == "length"

    engine = Engine(art, max_batch=4)  # fewer slots than requests: some wait for others to finish
    joins = {0: 0, 1: 5, 2: 5, 3: 40, 4: 60, 5: 61, 6: 2, 7: 3, 8: 70, 9: 71, 10: 90}
    waiting = sorted(joins, key=joins.get)
    streams, deltas = {}, {i: [] for i in range(len(requests))}
    step = 0
    while waiting or any(s.finish_reason is None for s in streams.values()):
        while waiting and joins[waiting[0]] <= step and engine.active < engine.max_batch:
            i = waiting.pop(0)
            streams[i] = engine.start(requests[i])
        live = [s for s in streams.values() if s.finish_reason is None]
        if step % 7 == 3 and len(live) > 1:
            live = live[1:]  # sometimes a stream sits a step out; its text must not change
        for delta in engine.step(live[::-1]):
            i = next(k for k, s in streams.items() if s is delta.stream)
            deltas[i].append(delta)
        step += 1
        assert step < 5000
    for i, request in enumerate(requests):
        assert streams[i].text == alone[i].text, i
        assert streams[i].finish_reason == alone[i].finish_reason
        assert "".join(d.text for d in deltas[i]) == streams[i].text
        assert [d.finish_reason for d in deltas[i]].count(streams[i].finish_reason) == 1
        assert deltas[i][-1].finish_reason == streams[i].finish_reason
    assert engine.active == 0
    for d in deltas[2]:
        assert len(d.logprobs) == len(d.text)
        for lp, char in zip(d.logprobs, d.text):
            assert lp.char == char and len(lp.top) == 2 and lp.top[0][1] >= lp.top[1][1] and lp.logprob <= 0


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_a_large_batch_on_several_threads_matches_streams_run_alone(artifact_for, cell):
    art = artifact_for(cell, 2)
    streams = ROWS_PER_THREAD + 8
    requests = [GenerationRequest(f"stream {i}", max_chars=60, sampling=T1, seed=i, logprobs=len(VOCAB)) for i in range(streams)]
    engine = Engine(art, max_batch=streams, threads=2)
    engine.network.min_rows_per_thread = ROWS_PER_THREAD
    batch = run_collecting(engine, [(0, r) for r in requests])
    for request, (stream, rows) in zip(requests, batch):
        ((alone, alone_rows),) = run_collecting(Engine(art, max_batch=1), [(0, request)])
        assert stream.text == alone.text
        assert np.abs(np.array(rows) - np.array(alone_rows)).max() < 1e-5


def test_a_waiting_stream_keeps_its_state(artifact_for):
    """A stream left out of steps for a while continues exactly where it was."""
    art = artifact_for("gru", 2)
    request = GenerationRequest("abc", max_chars=100, sampling=T1, seed=9)
    alone = Engine(art).generate(request).text
    engine = Engine(art, max_batch=8)
    target = engine.start(request)
    others = [engine.start(GenerationRequest(p, max_chars=1000, sampling=T1, seed=i)) for i, p in enumerate(["q", "rr", "sss"])]
    for k in range(250):
        engine.step(others if 10 <= k < 60 else [*others, target])
    assert target.finish_reason == "length" and target.text == alone


def test_the_network_step_keeps_each_slots_state_through_what_the_engine_does_with_slots(artifact_for):
    """Prompts, steps of any number of rows (across the one-thread and multi-thread sizes), swaps
    and copies in a random order: each slot's prediction stays that of its own characters, as the
    graph gives it for them in one call from the zero state."""
    import onnxruntime

    art = artifact_for("lstm", 2)
    network = network_step.load(art, max_batch=ROWS_PER_THREAD + 8, threads=2)
    network.min_rows_per_thread = ROWS_PER_THREAD
    whole = onnxruntime.InferenceSession(str(art.onnx_path), providers=["CPUExecutionProvider"])
    zero = {n: np.zeros((2, 1, 24), np.float32) for n in ("h", "c")}
    rng = np.random.default_rng(0)
    history: list[list[int]] = []  # slot i's characters since its prompt; slots 0..len-1 are live
    sizes = set()  # rows of the steps taken

    def check():
        for slot, ids in enumerate(history):
            want = whole.run(["logits"], {"ids": np.array([ids], np.int64), **zero})[0][0, -1]
            np.testing.assert_allclose(network.logits[slot], want, atol=1e-5, err_msg=f"slot {slot}")

    for k in range(600):
        op = rng.choice(["start", "restart", "step", "swap", "release"], p=[0.25, 0.05, 0.5, 0.1, 0.1])
        if op == "start" and len(history) < network.max_batch or not history:
            history.append(rng.integers(0, len(VOCAB), int(rng.integers(1, 30))).tolist())
            network.consume(len(history) - 1, np.array(history[-1]))
        elif op == "restart":
            slot = int(rng.integers(len(history)))
            history[slot] = rng.integers(0, len(VOCAB), int(rng.integers(1, 30))).tolist()
            network.consume(slot, np.array(history[slot]))
        elif op == "step":
            n = int(rng.integers(1, len(history) + 1)) if rng.random() < 0.3 else len(history)
            ids = rng.integers(0, len(VOCAB), n)
            network.advance(n, ids)
            sizes.add(n)
            for slot in range(n):
                history[slot].append(int(ids[slot]))
        elif op == "swap":
            i, j = rng.integers(len(history), size=2).tolist()
            network.swap(i, j)
            history[i], history[j] = history[j], history[i]
        elif op == "release":
            slot = int(rng.integers(len(history)))
            network.copy(len(history) - 1, slot)
            history[slot] = history[-1]
            history.pop()
        if k % 30 == 29:
            check()
    check()
    assert max(map(len, history)) > 100 and min(sizes) < 4 and max(sizes) >= ROWS_PER_THREAD  # one thread and several


def test_a_network_with_more_work_per_character_takes_several_threads_at_fewer_rows(artifact_for):
    """The shipped 3x384 LSTM gains from a second thread at a few rows, a small network only at many
    (bench/README.md, "Threads per step"); below its threshold a step stays on one thread."""
    shipped = OrtStep(Path(__file__).resolve().parents[1] / "artifacts" / "default" / "model.onnx", 64, threads=2)
    tiny = OrtStep(artifact_for("lstm", 2).onnx_path, 64, threads=2)
    assert 2 <= shipped.min_rows_per_thread <= 8 < 64 < tiny.min_rows_per_thread
    rows = shipped.min_rows_per_thread
    assert [shipped._binding(n, 0)[0] is shipped._large for n in (rows - 1, rows)] == [False, True]


class InterfaceOnly:
    """A network step that lets through nothing but NetworkStep's members."""

    ALLOWED = {name for name in vars(NetworkStep) if not name.startswith("_")} | set(NetworkStep.__annotations__)

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        if name not in self.ALLOWED:
            raise AttributeError(f"the engine used {name}, which is not part of NetworkStep")
        return getattr(self._inner, name)


def test_the_engine_uses_the_network_step_through_its_interface_only(artifact_for, monkeypatch):
    art = artifact_for("gru", 2)
    free = Engine(art).generate(GenerationRequest("w", max_chars=120, sampling=T1, seed=6)).text
    requests = [GenerationRequest("w", max_chars=120, sampling=T1, seed=6, stop=(free[90:92],), logprobs=3),
                *(GenerationRequest(p, max_chars=60 + 10 * i, sampling=SamplingSettings(0.9, top_k=6), seed=i)
                  for i, p in enumerate(["", "ab", "cd", "e"] * 4))]
    alone = [Engine(art, max_batch=1).generate(r) for r in requests]
    load = network_step.load
    monkeypatch.setattr(network_step, "load", lambda *args: InterfaceOnly(load(*args)))
    engine = Engine(art, max_batch=20, threads=2)  # 17 streams
    assert isinstance(engine.network, InterfaceOnly)
    plan = [(i % 3, r) for i, r in enumerate(requests)]  # streams join over 3 steps; finished ones leave
    results = run_collecting(engine, plan, leave_at={5: 30})
    for i, ((stream, _), want) in enumerate(zip(results, alone)):
        if i == 5:
            assert stream.finish_reason == "cancelled" and want.text.startswith(stream.text)
        else:
            assert (stream.text, stream.finish_reason) == (want.text, want.finish_reason), i
    assert results[0][0].finish_reason == "stop" and len(results[0][1]) == len(results[0][0].text)
    assert engine.active == 0


# ---------------------------------------------------------------- requests, slots, errors


def test_empty_and_all_unknown_prompts_start_as_after_a_newline(artifact_for):
    art = artifact_for("rnn", 2)
    engine = Engine(art)
    after_newline = engine.generate(GenerationRequest("\n", max_chars=50, sampling=T1, seed=3)).text
    empty = engine.generate(GenerationRequest("", max_chars=50, sampling=T1, seed=3))
    unknown = engine.generate(GenerationRequest("☃☃Z", max_chars=50, sampling=T1, seed=3))
    assert empty.text == after_newline == unknown.text
    assert (empty.prompt_chars, empty.dropped_chars) == (0, 0)
    assert (unknown.prompt_chars, unknown.dropped_chars) == (0, 3)
    mixed = engine.start(GenerationRequest("ab☃é", max_chars=5, sampling=T1))
    assert (mixed.prompt_chars, mixed.dropped_chars) == (3, 1)  # é -> e is kept, ☃ is dropped
    engine.cancel(mixed)


def test_seed_none_draws_one_that_reproduces_the_text(artifact_for):
    engine = Engine(artifact_for("lstm", 1))
    first = engine.generate(GenerationRequest("ab", max_chars=80, sampling=T1))
    again = engine.generate(GenerationRequest("ab", max_chars=80, sampling=T1, seed=first.seed))
    other = engine.generate(GenerationRequest("ab", max_chars=80, sampling=T1, seed=first.seed + 1))
    assert isinstance(first.seed, int) and again.text == first.text and other.text != first.text


def test_max_chars_releases_held_back_text(artifact_for):
    engine = Engine(artifact_for("lstm", 1))
    free = engine.generate(GenerationRequest("ab", max_chars=60, sampling=T1, seed=2)).text
    stop = free[58:] + "@"  # never completed, but its first two characters end the text
    stream = engine.start(GenerationRequest("ab", max_chars=60, sampling=T1, seed=2, stop=(stop,)))
    deltas = []
    while stream.finish_reason is None:
        deltas.extend(engine.step([stream]))
    assert deltas[-2].text == "" and deltas[-1].text == free[58:]  # held back, then released
    assert stream.text == free and stream.finish_reason == "length"


def test_stop_sequence_inside_a_held_back_prefix(artifact_for):
    """Stops 'abc' and 'b': after 'ab' the second completes inside the first's held-back prefix."""
    engine = Engine(artifact_for("lstm", 1))
    free = engine.generate(GenerationRequest("q", max_chars=200, seed=8, sampling=SamplingSettings(1.5))).text
    a, b = free[150], free[151]
    request = GenerationRequest("q", max_chars=200, seed=8, sampling=SamplingSettings(1.5), stop=(a + b + "@@", b))
    stream = engine.generate(request)
    first = min(i for i in range(len(free)) if free[i] == b or free[i : i + 4] == a + b + "@@")
    assert stream.finish_reason == "stop" and stream.text == free[:first]


def test_engine_full_and_slots_freed_by_finishing_and_cancelling(artifact_for):
    engine = Engine(artifact_for("gru", 1), max_batch=2)
    a = engine.start(GenerationRequest("a", max_chars=3, sampling=T1))
    b = engine.start(GenerationRequest("b", max_chars=50, sampling=T1))
    with pytest.raises(EngineFull):
        engine.start(GenerationRequest("c", max_chars=50, sampling=T1))
    for _ in range(3):
        engine.step([a, b])
    assert a.finish_reason == "length" and engine.active == 1
    c = engine.start(GenerationRequest("c", max_chars=50, sampling=T1))
    engine.cancel(b)
    assert b.finish_reason == "cancelled" and engine.active == 1
    assert engine.step([a, b]) == []  # finished streams are skipped
    engine.cancel(b)  # cancelling twice is harmless
    (delta,) = engine.step([a, b, c])
    assert delta.stream is c and len(c.text) + len(delta.text) >= 1
    other = Engine(artifact_for("gru", 1))
    with pytest.raises(ValueError, match="did not start"):
        other.step([c])
    with pytest.raises(ValueError, match="twice"):
        engine.step([c, c])


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"prompt": None}, "prompt"),
        ({"max_chars": -1}, "max_chars"),
        ({"max_chars": 2.5}, "max_chars"),
        ({"max_chars": True}, "max_chars"),
        ({"seed": -1}, "seed"),
        ({"seed": "7"}, "seed"),
        ({"stop": "\n"}, "stop"),
        ({"stop": ("",)}, "stop"),
        ({"stop": (3,)}, "stop"),
        ({"logprobs": -1}, "logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"cache_at": (0,)}, "cache_at"),
        ({"cache_at": (1, 1)}, "cache_at"),
        ({"cache_at": (3, 2)}, "cache_at"),
        ({"cache_at": (5,)}, "cache_at"),
        ({"sampling": {"temperature": 1}}, "sampling"),
    ],
)
def test_bad_requests_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GenerationRequest(**{"prompt": "xxxx", "max_chars": 5, "sampling": T1, **kwargs})


def test_too_many_logprobs_is_a_value_error(artifact_for):
    engine = Engine(artifact_for("rnn", 1))
    with pytest.raises(ValueError, match="logprobs"):
        engine.start(GenerationRequest("x", max_chars=5, sampling=T1, logprobs=len(VOCAB) + 1))
    assert engine.active == 0


def test_an_artifact_without_its_graph_is_refused_with_the_command_that_adds_it(artifact_for):
    art = artifact_for("gru", 1)
    with pytest.raises(ValueError, match=r"no model.onnx.*chargen export --artifact"):
        Engine(Artifact(art.path, art.model, VOCAB, {}, None))


def test_a_graph_of_another_vocabulary_is_refused(artifact_for):
    art = artifact_for("gru", 1)
    with pytest.raises(ValueError, match=f"predicts {len(VOCAB)} characters but the vocabulary has {len(VOCAB) - 1}"):
        Engine(Artifact(art.path, art.model, Vocab(VOCAB.chars[:-1]), {}, art.onnx_path))


def test_the_engine_runs_without_keras_tensorflow_or_numba(artifact_for):
    """What serving needs: the graph, the vocabulary, ONNX Runtime and numpy."""
    art = artifact_for("lstm", 2)
    request = GenerationRequest("ab", max_chars=40, sampling=T1, seed=1)
    code = (
        "import sys; from pathlib import Path; from model.runtime.artifact import Artifact; from model.records.vocab import Vocab\n"
        "from model.runtime.engine import Engine, GenerationRequest; from model.runtime.sampling import SamplingSettings\n"
        f"art = Artifact(Path({str(art.path)!r}), None, Vocab({''.join(VOCAB.chars)!r}), {{}}, Path({str(art.onnx_path)!r}))\n"
        "stream = Engine(art).generate(GenerationRequest('ab', max_chars=40, sampling=SamplingSettings(1.0), seed=1))\n"
        "loaded = [m for m in ('keras', 'tensorflow', 'jax', 'numba', 'llvmlite', 'scipy', 'threadpoolctl') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "sys.stdout.write(stream.text)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout == Engine(art).generate(request).text


def test_cuda_without_onnxruntime_gpu_runs_on_the_cpu_with_one_warning(artifact_for, caplog):
    """This machine's ONNX Runtime has no CUDA provider (onnxruntime, not onnxruntime-gpu)."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this ONNX Runtime has CUDA: the fallback is not reachable here")
    art = artifact_for("lstm", 2)
    request = GenerationRequest("ab", max_chars=80, sampling=T1, seed=3)
    with caplog.at_level(logging.WARNING, logger="model.runtime.onnx_step"):
        engine = Engine(art, device="cuda")
    (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "CUDAExecutionProvider" in warning.getMessage() and "pip install onnxruntime-gpu" in warning.getMessage()
    assert engine.generate(request).text == Engine(art, device="cpu").generate(request).text


def test_an_unknown_device_is_refused(artifact_for):
    with pytest.raises(ValueError, match="device must be one of cpu, cuda, got 'tpu'"):
        Engine(artifact_for("rnn", 1), device="tpu")


# ---------------------------------------------------------------- a stream's text, alone


def emitting(text: str, max_chars: int = 100, stop=(), logprobs: bool = False) -> tuple[Stream, list]:
    """A stream (no engine) fed `text` one character at a time, until it finishes; its deltas as
    (text, finish_reason) or, with logprobs, (text, the chars of its logprobs, finish_reason)."""
    stream = Stream(GenerationRequest("", max_chars=max_chars, sampling=T1, stop=stop), 0, 0, 0)
    out = []
    for char in text:
        lp = CharLogprob(char, -1.0, []) if logprobs else None
        d = stream.emit(char, lp)
        assert d.stream is stream and d.finish_reason == stream.finish_reason
        out.append((d.text, "".join(x.char for x in d.logprobs), d.finish_reason) if logprobs else (d.text, d.finish_reason))
        if d.finish_reason:
            break
    return stream, out


def test_emit_without_stops_passes_each_character_and_ends_at_max_chars():
    stream, deltas = emitting("abcdef", max_chars=3)
    assert deltas == [("a", None), ("b", None), ("c", "length")]
    assert stream.text == "abc" and stream.generated == 3


def test_emit_holds_back_a_possible_stop_and_releases_it_when_it_breaks():
    stream, deltas = emitting("xabyabcz", stop=("abc",))
    assert deltas == [("x", None), ("", None), ("", None), ("aby", None), ("", None), ("", None), ("", "stop")]
    assert stream.text == "xaby" and stream.generated == 7


def test_emit_stop_at_the_first_character_and_single_character_stops():
    assert emitting("\nabc", stop=("\n",))[1] == [("", "stop")]
    assert emitting("ab.c", stop=(".", "!"))[1] == [("a", None), ("b", None), ("", "stop")]


def test_emit_ends_at_the_earliest_stop_when_one_completes_inside_another():
    """'b' completes inside the held 'ab' of 'abc': the text ends before the 'b'."""
    assert emitting("xabc", stop=("abc", "b"))[0].text == "xa"
    assert emitting("xabc", stop=("abc", "bc"))[0].text == "x"  # both complete at 'c': the longer starts first
    assert emitting("aab", stop=("ab",))[1] == [("", None), ("a", None), ("", "stop")]  # the held 'a' is dropped, the new one kept


def test_emit_at_max_chars_releases_held_text():
    stream, deltas = emitting("xab", max_chars=3, stop=("abc",))
    assert deltas == [("x", None), ("", None), ("ab", "length")]
    assert stream.text == "xab"


def test_emit_keeps_each_logprob_with_its_held_character():
    stream, deltas = emitting("xabyabcz", stop=("abc",), logprobs=True)
    assert [(t, chars) for t, chars, _ in deltas] == [("x", "x"), ("", ""), ("", ""), ("aby", "aby"), ("", ""), ("", ""), ("", "")]
    stream, deltas = emitting("abab", max_chars=4, stop=("abc",), logprobs=True)
    assert deltas[-1] == ("ab", "ab", "length")  # the held 'ab' of the first try was released at the second 'a'
    assert emitting("ab", logprobs=True)[1] == [("a", "a", None), ("b", "b", None)]


def test_requests_have_no_defaults_for_what_a_user_sets():
    with pytest.raises(TypeError):
        GenerationRequest("x")  # max_chars and sampling come from the caller (the service's settings, the CLI's options)
    with pytest.raises(TypeError):
        GenerationRequest("x", max_chars=5)


# ---------------------------------------------------------------- scoring prompts, max_chars 0, rank


@pytest.mark.parametrize("chunk", [None, 7])
def test_a_scored_prompt_has_the_keras_log_probs_of_each_character_after_the_first(artifact_for, monkeypatch, chunk):
    import model.runtime.engine

    if chunk:  # long texts are fed in chunks: the state carries across them
        monkeypatch.setattr(model.runtime.engine, "PROMPT_CHUNK", chunk)
    art = artifact_for("gru", 2)
    text = "to be, or not to be, that is the question."
    ids = VOCAB.encode(text).ids.tolist()
    want = keras_log_probs(art.model, ids)  # row t predicts ids[t + 1]
    engine = Engine(art)
    stream = engine.start(GenerationRequest(text, max_chars=0, sampling=GREEDY, prompt_logprobs=3))
    assert stream.finish_reason == "length" and stream.text == "" and engine.active == 0
    score = stream.prompt_score
    assert score.chars == list(text) and np.isnan(score.logprobs[0]) and score.scored == len(text) - 1
    np.testing.assert_allclose(score.logprobs[1:], want[np.arange(len(ids) - 1), ids[1:]], atol=TOLERANCE)
    for t in range(1, len(ids)):
        top = score.alternatives(t)
        assert [c for c, _ in top] == [VOCAB.chars[i] for i in np.argsort(-want[t - 1], kind="stable")[:3]]
        assert top[0][1] >= top[1][1] >= top[2][1]
    assert score.nats == pytest.approx(-want[np.arange(len(ids) - 1), ids[1:]].sum(), abs=1e-3)
    # scoring changes nothing about what follows: the same text as an unscored prompt
    plain = Engine(art).generate(GenerationRequest(text, max_chars=80, sampling=T1, seed=3)).text
    assert Engine(art).generate(GenerationRequest(text, max_chars=80, sampling=T1, seed=3, prompt_logprobs=0)).text == plain


def test_a_rank_request_sums_the_log_probs_of_its_characters(artifact_for):
    art = artifact_for("lstm", 1)
    engine = Engine(art, max_batch=4)
    ranked = engine.start(GenerationRequest("ab", max_chars=50, sampling=T1, seed=2, rank=True, logprobs=1))
    other = engine.start(GenerationRequest("cd", max_chars=80, sampling=T1, seed=3))
    lps = []
    while ranked.finish_reason is None:
        for d in engine.step([other, ranked] if other.finish_reason is None else [ranked]):
            if d.stream is ranked:
                lps.extend(lp.logprob for lp in d.logprobs)
    assert len(lps) == 50 and ranked.logprob_sum == pytest.approx(sum(lps), abs=1e-9)
    assert other.logprob_sum == 0.0  # not asked for
