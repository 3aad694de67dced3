"""The engine's unchecked streams (no stop sequences, no logprobs): their slots keep the ids picked
for them and the stream takes them as text in bulk, and a step's Deltas are made when read. None of
that may show: the same text, deltas and finish as a stream that checks every character, whenever
and however often the text is read, across slot moves, buffer refills and cancels; and the service
still streams each choice's text as it is generated."""

from __future__ import annotations

import random
import time

import pytest

from conftest import random_network
from polling import wait_for
from model.runtime.artifact import Artifact
from model.runtime.engine import UNREAD, Engine, GenerationRequest
from model.training.onnx_graph import build_graph
from model.runtime.sampling import SamplingSettings
from model.records.vocab import Vocab

VOCAB = Vocab("\n abcdefghijklmnopqrstuvw.,")
T1 = SamplingSettings(temperature=1.0)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Artifact:
    path = tmp_path_factory.mktemp("lstm-2")
    model = random_network("lstm", 2, len(VOCAB), 24, 0)
    (path / "model.onnx").write_bytes(build_graph(model).SerializeToString())
    return Artifact(path, model, VOCAB, {}, path / "model.onnx")


def requests(logprobs: int) -> list[GenerationRequest]:
    """Streams that finish at different steps (max_chars, a stop sequence), some past UNREAD
    characters, so slots move and buffers fill; with logprobs > 0 every one checks each character."""
    lengths = [UNREAD + 70, 3, UNREAD, 40, 2 * UNREAD + 1, 1, 90, UNREAD - 1]
    out = [GenerationRequest("the ", max_chars=n, sampling=T1, seed=i, logprobs=logprobs) for i, n in enumerate(lengths)]
    out.append(GenerationRequest("a", max_chars=600, sampling=T1, seed=99, stop=("h,", "qqq"), logprobs=logprobs))  # always checked
    return out


def run(engine: Engine, reqs: list[GenerationRequest], read_deltas: bool, read_text_every: int = 0):
    """Start half the requests, the rest after 5 steps; step them in a shuffled order until all
    finish. Returns the streams and, when read, each one's deltas (checked in the order given)."""
    order = random.Random(0)
    streams = [engine.start(r) for r in reqs[::2]]
    deltas = {id(s): [] for s in streams}
    for k in range(3000):
        if k == 5:
            late = [engine.start(r) for r in reqs[1::2]]
            deltas.update({id(s): [] for s in late})
            streams += late
        live = [s for s in streams if s.finish_reason is None]
        if not live:
            break
        order.shuffle(live)
        got = engine.step(live)
        if read_deltas:
            assert len(got) == len(live) and [d.stream for d in got] == live
            for d in got:
                deltas[id(d.stream)].append(d)
        if read_text_every and k % read_text_every == 0:
            for s in streams:
                assert len(s.text) <= s.generated
    assert all(s.finish_reason is not None for s in streams)
    return streams, deltas


def test_unchecked_streams_give_what_checked_ones_give(artifact):
    checked, checked_deltas = run(Engine(artifact, max_batch=16), requests(logprobs=1), read_deltas=True)
    for read_deltas, every in [(True, 0), (False, 0), (False, 7), (True, 1)]:
        unchecked, deltas = run(Engine(artifact, max_batch=16), requests(logprobs=0), read_deltas, every)
        for a, b in zip(checked, unchecked):
            assert (b.text, b.finish_reason, b.generated) == (a.text, a.finish_reason, a.generated)
            if read_deltas:
                ds, ref = deltas[id(b)], checked_deltas[id(a)]
                assert [(d.text, d.finish_reason) for d in ds] == [(d.text, d.finish_reason) for d in ref]
                if not b.request.stop:
                    assert all(d.logprobs == [] for d in ds)
    assert {UNREAD + 70, 2 * UNREAD + 1} <= {len(s.text) for s in unchecked}  # past a full buffer or two
    assert [s.finish_reason for s in unchecked if s.request.stop] == ["stop"]


def test_text_grows_a_character_per_step_and_cancel_keeps_it(artifact):
    engine = Engine(artifact, max_batch=4)
    a, b = (engine.start(GenerationRequest("the ", max_chars=10**6, sampling=T1, seed=s)) for s in (1, 2))
    delivered = ""
    for k in range(1, UNREAD + 40):
        da, db = engine.step([a, b])
        assert len(da.text) == len(db.text) == 1 and da.finish_reason is None and da.stream is a
        delivered += da.text
        if k % 50 == 0:  # read in the middle: what the deltas delivered so far, no more
            assert a.text == delivered and a.generated == k
    engine.cancel(a)
    assert a.finish_reason == "cancelled" and a.text == delivered and a.generated == UNREAD + 39
    (db,) = engine.step([a, b])  # b moved into a's slot and kept its unread characters
    assert db.stream is b and len(b.text) == UNREAD + 40


def test_deltas_read_late_or_twice_are_the_same(artifact):
    engine = Engine(artifact, max_batch=4)
    s = engine.start(GenerationRequest("the ", max_chars=5, sampling=T1, seed=3))
    steps = [engine.step([s]) for _ in range(5)]
    assert "".join(d.text for got in steps for d in got) == s.text and len(s.text) == 5
    assert [got[0].finish_reason for got in steps] == [None] * 4 + ["length"]
    assert steps[0] == list(steps[0]) and steps[0][0] is steps[0][0]
    assert engine.step([s]) == [] and engine.active == 0


def test_the_service_streams_unchecked_text_as_it_is_generated(tiny_artifact):
    from service.app import create_app
    from service.scheduler import Job

    app = create_app({"ARTIFACT": str(tiny_artifact), "TESTING": True})
    scheduler = app.extensions["chargen"].scheduler
    try:
        assert scheduler.wait_ready(120), scheduler.failure
        now = time.perf_counter()
        request = GenerationRequest("the", max_chars=10**6, sampling=T1, seed=5)
        job = Job([request], incremental=True, deadline=now + 60, arrived=now)
        scheduler.submit(job)
        events = scheduler.events(job)
        received, chunks = "", 0
        for chunks, items in enumerate(events, 1):  # a few chunks while the generation goes on
            assert [c.index for c in items] == [0] and items[0].text
            received += items[0].text
            if chunks == 5:
                break
        assert not job.done and len(received) < 10**5  # far from a million characters: it streamed
        events.close()  # the consumer leaves: the job is cancelled
        assert wait_for(lambda: job.done, interval=0.01)
        (stream,) = job.streams
        assert stream.finish_reason == "cancelled" and stream.text.startswith(received)
    finally:
        scheduler.close()
