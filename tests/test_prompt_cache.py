"""The prompt-state cache (model/runtime/prompt_cache.py) and the engine reading prompts through it: the
longest cached prefix, bytes bounded, least recently used evicted, and the same text with and
without it."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import VOCAB, random_artifact

from model.runtime.engine import Engine, GenerationRequest
from model.runtime.network_step import State
from model.runtime.prompt_cache import MIN_CHARS, PromptCache
from model.runtime.sampling import GREEDY, SamplingSettings

T1 = SamplingSettings(temperature=1.0)


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return random_artifact("lstm", 2, tmp_path_factory.mktemp("cache"))


def state(value: float, size: int = 100) -> State:
    return State((np.full((1, 1, size), value, np.float32),), np.full(4, value, np.float32))


def ids(text: str) -> np.ndarray:
    return VOCAB.encode(text).ids


def test_the_longest_cached_prefix_is_found():
    cache = PromptCache(1 << 20)
    a, b = "the first prompt of all", "the first prompt of all, and more of it"
    cache.put(ids(a), state(1.0))
    cache.put(ids(b), state(2.0))
    assert cache.longest(ids(b + " and the rest"))[0] == len(b)
    length, found = cache.longest(ids(a + " but not the other"))
    assert length == len(a) and found.logits[0] == 1.0
    assert cache.longest(ids(b))[0] == len(b)  # the whole prompt
    assert cache.longest(ids("the first prompt of al")) == (0, None)  # shorter than every entry
    assert cache.longest(ids("a different prompt altogether")) == (0, None)
    assert (cache.stats.hits, cache.stats.misses, cache.stats.chars_saved) == (3, 2, 2 * len(b) + len(a))


def test_a_hash_collision_gives_no_wrong_state(monkeypatch):
    cache = PromptCache(1 << 20)
    cache.put(ids("a" * 20), state(1.0))
    monkeypatch.setattr(cache, "hashes", lambda ids: np.zeros(len(ids), np.uint64))  # every prefix collides
    cache._entries = {(20, 0): next(iter(cache._entries.values()))}
    assert cache.longest(ids("b" * 30)) == (0, None)  # same length, same hash, other characters


def test_bytes_are_bounded_and_the_least_recently_used_goes_first():
    one = state(0.0).nbytes + 20  # a 20-character key of uint8 ids
    cache = PromptCache(3 * one)
    prompts = [f"prompt number {c * 6}" for c in "abcde"]  # 20 characters each
    for p in prompts[:3]:
        cache.put(ids(p), state(0.0))
    assert len(cache) == 3 and cache.bytes == 3 * one
    cache.longest(ids(prompts[0]))  # used: now the most recent
    cache.put(ids(prompts[3]), state(0.0))
    assert len(cache) == 3 and cache.bytes == 3 * one
    assert cache.longest(ids(prompts[1]))[0] == 0  # the least recently used was evicted
    assert cache.longest(ids(prompts[0]))[0] == 20 and cache.longest(ids(prompts[3]))[0] == 20
    cache.put(ids("short"), state(0.0))  # under MIN_CHARS: not worth an entry
    cache.put(ids("a" * 5000), state(0.0))  # larger than the whole cache: not kept, nothing evicted for it
    assert len(cache) == 3 and MIN_CHARS > len("short")


def test_a_prompt_read_from_the_cache_gives_the_same_text_as_without_it(art):
    prompt = "the prompt a client sends twice, then continues, " * 8
    without = Engine(art)
    engine = Engine(art, max_batch=8, prompt_cache_bytes=1 << 20)
    requests = [GenerationRequest(prompt, max_chars=200, sampling=T1, seed=4),
                GenerationRequest(prompt, max_chars=200, sampling=T1, seed=4),  # the whole prompt cached
                GenerationRequest(prompt + "and more.", max_chars=200, sampling=T1, seed=4),  # a prefix cached
                GenerationRequest(prompt[:100], max_chars=200, sampling=SamplingSettings(0.7, top_k=5), seed=9),
                GenerationRequest(prompt + "and more.", max_chars=150, sampling=GREEDY)]
    for request in requests:
        assert engine.generate(request).text == without.generate(request).text
    stats = engine.cache.stats
    assert (stats.hits, stats.misses) == (3, 2) and stats.chars_saved == 3 * len(prompt) + len("and more.")
    # the prediction after a cached prompt is bit for bit the one after feeding it whole
    engine.start(GenerationRequest(prompt, max_chars=5, sampling=T1))
    without.start(GenerationRequest(prompt, max_chars=5, sampling=T1))
    assert np.array_equal(engine.network.logits[0], without.network.logits[0])


def test_cache_at_keeps_the_states_at_turn_ends_so_the_next_turn_resumes_there(art):
    turns = ["user\nhello there\n\n", "assistant\nwell met\n\n", "user\nand now\n\n"]
    engine = Engine(art, prompt_cache_bytes=1 << 20)
    first = "".join(turns) + "assistant\n"
    cuts = np.cumsum([len(t) for t in turns]).tolist()
    a = engine.generate(GenerationRequest(first, max_chars=30, sampling=T1, seed=1, cache_at=tuple(cuts)))
    assert len(engine.cache) == 4  # three turn ends and the prompt's end
    second = first + a.text + "\n\nuser\nmore\n\nassistant\n"
    b = engine.start(GenerationRequest(second, max_chars=30, sampling=T1, seed=1))
    assert b.cached_chars == len(first)  # the previous prompt: only the reply and the new turn are fed
    edited = "".join(turns[:2]) + "user\nsomething else\n\nassistant\n"
    c = engine.start(GenerationRequest(edited, max_chars=30, sampling=T1, seed=1))
    assert c.cached_chars == cuts[1]  # an edited last turn resumes after the turns before it
    # the same text as an engine without a cache, cache_at or not
    for stream in (b, c):
        request = stream.request
        while stream.finish_reason is None:
            engine.step([stream])
        assert stream.text == Engine(art).generate(request).text


@pytest.mark.parametrize("cache_bytes", [1 << 20, 0])
def test_a_long_prompt_read_ahead_in_pieces_gives_what_reading_it_at_once_gives(art, cache_bytes):
    from model.runtime.engine import READ_PIECE

    turns = ["user\n" + "the quick brown fox jumps over the lazy dog. " * 15 + "\n\n", "assistant\nwell met\n\n",
             "user\n" + "and so on, " * 80 + "\n\n"]
    prompt = "".join(turns) + "assistant\n"
    cuts = tuple(np.cumsum([len(t) for t in turns]).tolist())
    request = GenerationRequest(prompt, max_chars=60, sampling=T1, seed=5, cache_at=cuts)
    at_once = Engine(art, prompt_cache_bytes=cache_bytes)
    expected = at_once.generate(request)
    engine = Engine(art, prompt_cache_bytes=cache_bytes)
    reading = engine.reading(request)
    pieces = []
    while not reading.finished:
        engine.read_more(reading)
        pieces.append(reading.done)
    assert len(pieces) >= len(reading.ids) // READ_PIECE + 1 and all(b - a <= READ_PIECE for a, b in zip([0, *pieces], pieces))
    assert len(reading.boundaries) == 3 and set(reading.boundaries) <= set(pieces)  # pieces stop at turn ends (in ids)
    stream = engine.start(request, reading)
    while stream.finish_reason is None:
        engine.step([stream])
    assert stream.text == expected.text
    whole = at_once.network.prompt(reading.ids)  # bit for bit the state of reading it in one call
    assert all(np.array_equal(a, b) for a, b in zip(reading.state.arrays, whole.arrays))
    assert np.array_equal(reading.state.logits, whole.logits)
    if cache_bytes:  # the turn ends and the end are kept, as reading at once keeps them
        assert len(engine.cache) == len(at_once.cache) == 4
        assert engine.cache.stats.misses == 1 and engine.cache.stats.hits == 0
        again = engine.reading(GenerationRequest(prompt, max_chars=5, sampling=T1))
        assert again.finished and again.cached == len(again.ids)  # cached whole: nothing to read ahead
        assert (engine.cache.stats.hits, engine.cache.stats.misses) == (1, 1)
    # short prompts, and prompts to score, are read at their start
    assert engine.reading(GenerationRequest("the quick", max_chars=5, sampling=T1)) is None
    assert engine.reading(GenerationRequest(prompt, max_chars=5, sampling=T1, prompt_logprobs=1)) is None
    with pytest.raises(ValueError, match="another request's reading"):
        engine.start(GenerationRequest(prompt, max_chars=5, sampling=T1), reading)


def test_a_scored_prompt_is_fed_whole_and_then_cached(art):
    prompt = "a text to score, then to continue from its cached state"
    engine = Engine(art, prompt_cache_bytes=1 << 20)
    engine.generate(GenerationRequest(prompt, max_chars=3, sampling=T1))
    scored = engine.start(GenerationRequest(prompt, max_chars=0, sampling=T1, prompt_logprobs=1))
    assert scored.cached_chars == 0 and scored.prompt_score.scored == len(ids(prompt)) - 1  # every character's prediction is needed
    again = engine.start(GenerationRequest(prompt + " more", max_chars=3, sampling=T1))
    assert again.cached_chars == len(ids(prompt))


# ---------------------------------------------------------------- through the service


def metric(client, name: str, model: str = "run") -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(client.get("/metrics").get_data(as_text=True)):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("model") == model:
                return sample.value
    return 0.0


@pytest.fixture(scope="module")
def apps(tiny_artifact):
    from service.app import create_app

    made = {mb: create_app({"ARTIFACT": str(tiny_artifact), "TESTING": True, "PROMPT_CACHE_MB": mb, "MAX_PROMPT_CHARS": 5000})
            for mb in (64, 0)}
    for app in made.values():
        assert app.extensions["chargen"].scheduler.wait_ready(120)
    yield made
    for app in made.values():
        app.extensions["chargen"].scheduler.close()


def test_the_service_gives_the_same_text_with_and_without_the_cache_and_counts_it(apps):
    from conftest import PERIODIC

    cached, uncached = apps[64].test_client(), apps[0].test_client()
    prompt = PERIODIC * 40  # 1,800 characters
    before = {name: metric(cached, name) for name in ("chargen_prompt_cache_hits_total", "chargen_prompt_cache_misses_total",
                                                      "chargen_prompt_cache_chars_saved_total")}
    asks = [{"prompt": prompt, "max_chars": 100, "temperature": 1.0, "seed": 3},
            {"prompt": prompt, "max_chars": 100, "temperature": 1.0, "seed": 3},
            {"prompt": prompt + "the quick", "max_chars": 100, "temperature": 1.5, "seed": 4, "n": 2}]
    for ask in asks:
        with_cache, without = (c.post("/v1/generate", json=ask).get_json() for c in (cached, uncached))
        assert [x["text"] for x in with_cache["choices"]] == [x["text"] for x in without["choices"]]
    assert metric(cached, "chargen_prompt_cache_misses_total") - before["chargen_prompt_cache_misses_total"] == 1
    assert metric(cached, "chargen_prompt_cache_hits_total") - before["chargen_prompt_cache_hits_total"] == 3  # n=2: each choice
    saved = metric(cached, "chargen_prompt_cache_chars_saved_total") - before["chargen_prompt_cache_chars_saved_total"]
    assert saved == 3 * len(prompt) + len("the quick")  # the second choice of the last finds the first's whole prompt
    assert 0 < metric(cached, "chargen_prompt_cache_bytes") < 64 << 20
    assert apps[0].extensions["chargen"].default.engine.cache is None  # (both apps count into this process's one registry)


def test_a_chats_next_turn_feeds_only_what_is_new(apps):
    client = apps[64].test_client()
    messages = [{"role": "user", "content": "the quick brown fox jumps over the lazy dog. " * 10}]
    saved = []
    for turn in range(3):
        before = metric(client, "chargen_prompt_cache_chars_saved_total")
        r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 30, "temperature": 1.0, "seed": turn})
        reply = r.get_json()["choices"][0]["message"]["content"]
        saved.append(metric(client, "chargen_prompt_cache_chars_saved_total") - before)
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": f"and then turn {turn}"}]
    transcript = r.get_json()["usage"]["prompt_tokens"]
    assert saved[0] == 0 and saved[1] > 400 and transcript - saved[2] < 60  # only the last reply and message were fed


def test_a_long_prompt_is_read_between_the_steps_of_the_running_streams(apps, monkeypatch):
    # a chat transcript can be tens of thousands of characters: read in one call it held every
    # running stream of the worker (seconds for a full one); read ahead, a piece between steps
    import threading
    import time

    from conftest import PERIODIC

    app = apps[64]
    engine, client = app.extensions["chargen"].default.engine, app.test_client()
    events, step, read_more = [], engine.step, engine.read_more

    def slow_step(streams):  # the running stream takes a few seconds, so the long prompt comes while it runs
        events.append("step")
        time.sleep(0.002)
        return step(streams)

    def logged_read_more(reading):
        events.append("read")
        return read_more(reading)

    monkeypatch.setattr(engine, "step", slow_step)
    monkeypatch.setattr(engine, "read_more", logged_read_more)
    running = {}
    thread = threading.Thread(target=lambda: running.update(r=client.post(
        "/v1/generate", json={"prompt": "the", "max_chars": 2000, "temperature": 1.0, "seed": 1}).get_json()))
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while "step" not in events and time.monotonic() < deadline:
            time.sleep(0.01)
        long_prompt = (PERIODIC[::-1] * 80)[:3500] + "the quick"  # nothing of it cached by the tests before
        answer = client.post("/v1/generate", json={"prompt": long_prompt, "max_chars": 20, "temperature": 0}).get_json()
    finally:
        thread.join(120)
    assert len(answer["choices"][0]["text"]) == 20 and len(running["r"]["choices"][0]["text"]) == 2000
    reads = [k for k, e in enumerate(events) if e == "read"]
    assert len(reads) >= 3500 // 512  # read in pieces...
    assert all("step" in events[a:b] for a, b in zip(reads, reads[1:]))  # ...with the running stream stepped between each


def test_a_long_prompt_on_an_idle_worker_is_read_in_pieces_so_a_drain_ends_it_in_time(tiny_artifact, monkeypatch):
    # read in one call on a worker with nothing else running, a long prompt held the loop past the
    # drain's cutoff, and the worker was stopped with the request unanswered
    import threading
    import time

    from conftest import PERIODIC, loaded_app

    with loaded_app(tiny_artifact, MAX_PROMPT_CHARS=5000) as app:
        scheduler, client = app.extensions["chargen"].scheduler, app.test_client()
        engine, read_more, reads = scheduler.engine, scheduler.engine.read_more, []

        def slow_read_more(reading):  # a big model's prompt: 0.2 s a piece
            reads.append(time.monotonic())
            time.sleep(0.2)
            return read_more(reading)

        monkeypatch.setattr(engine, "read_more", slow_read_more)
        got = {}
        thread = threading.Thread(target=lambda: got.update(r=client.post("/v1/generate", json={
            "prompt": (PERIODIC[::-1] * 80)[:4500], "max_chars": 5, "temperature": 0})))
        thread.start()
        deadline = time.monotonic() + 60
        while not reads and time.monotonic() < deadline:
            time.sleep(0.01)
        scheduler.drain(0.3)

        thread.join(60)
        r = got["r"]
        assert r.status_code == 503 and r.get_json()["error"]["code"] == "shutting_down", r.get_json()
        assert len(reads) < 4500 // 512  # ended between pieces, not after reading all of them
