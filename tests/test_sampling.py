"""The sampler (adjustments, temperature, min-p, top-k, top-p, seeds) and the `chargen sample` command."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from click.testing import CliRunner

from model.runtime.sampling import GREEDY, Adjustments, SamplingSettings, log_softmax, next_ids, pick, probabilities

RNG = np.random.default_rng(1234)
LOGITS = RNG.normal(0.0, 2.0, size=(16, 30)).astype(np.float32)  # 16 rows over 30 characters


def draws(logits: np.ndarray, settings: SamplingSettings, n: int, seed: int = 0) -> np.ndarray:
    """n picks from one row; one generator used n times in turn (rows share it)."""
    rng = np.random.default_rng(seed)
    return next_ids(np.tile(logits, (n, 1)), [settings] * n, [rng] * n)


def softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(x))


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize("kwargs", [
    {"temperature": -0.1}, {"temperature": float("nan")}, {"temperature": float("inf")},
    {"temperature": 1.0, "top_k": -1}, {"temperature": 1.0, "top_k": 2.5},
    {"temperature": 1.0, "top_p": 0.0}, {"temperature": 1.0, "top_p": 1.01}, {"temperature": 1.0, "top_p": float("nan")},
])
def test_settings_that_cannot_be_sampled_are_refused(kwargs):
    # a cheap check for code that builds settings; people's input is validated at the boundaries
    with pytest.raises(ValueError, match="invalid sampling settings"):
        SamplingSettings(**kwargs)


def test_the_temperature_has_no_default_and_the_filters_default_to_off():
    with pytest.raises(TypeError):
        SamplingSettings()  # the caller says (model/records/defaults.py: the command line's and the service's)
    assert SamplingSettings(1.0) == SamplingSettings(1.0, top_k=0, top_p=1.0) and GREEDY.greedy


def test_a_tiny_temperature_is_greedy_not_nan():
    # logits / 1e-310 would overflow to inf, and inf - inf is NaN: every weight NaN, the last id picked
    logits = LOGITS[:4]
    for temperature in (1e-310, 1e-320, 5e-324):
        ids = next_ids(logits, [SamplingSettings(temperature)] * 4, [np.random.default_rng(b) for b in range(4)])
        assert (ids == logits.argmax(axis=1)).all()
        assert probabilities(logits[0], SamplingSettings(temperature))[logits[0].argmax()] == 1.0


# ---------------------------------------------------------------- greedy and top-k 1


def test_temperature_zero_is_argmax_and_draws_nothing():
    rngs = [np.random.default_rng(b) for b in range(len(LOGITS))]
    before = [r.bit_generator.state for r in rngs]
    ids = next_ids(LOGITS, [GREEDY] * len(LOGITS), rngs)
    assert (ids == LOGITS.argmax(axis=1)).all()
    assert [r.bit_generator.state for r in rngs] == before


def test_greedy_ties_pick_the_lowest_id():
    tied = np.array([[0.0, 3.0, 1.0, 3.0, 3.0]], dtype=np.float32)
    assert next_ids(tied, [GREEDY], [np.random.default_rng(0)])[0] == 1
    for seed in range(20):
        assert next_ids(tied, [SamplingSettings(2.0, top_k=1)], [np.random.default_rng(seed)])[0] == 1


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_top_k_1_equals_greedy(temperature):
    settings = SamplingSettings(temperature, top_k=1)
    for seed in range(10):
        rngs = [np.random.default_rng(seed * 100 + b) for b in range(len(LOGITS))]
        assert (next_ids(LOGITS, [settings] * len(LOGITS), rngs) == LOGITS.argmax(axis=1)).all()


# ---------------------------------------------------------------- seeds


def test_seeded_runs_repeat_and_different_seeds_differ():
    settings = SamplingSettings(1.0)
    a = draws(LOGITS[0], settings, 500, seed=42)
    b = draws(LOGITS[0], settings, 500, seed=42)
    c = draws(LOGITS[0], settings, 500, seed=43)
    assert (a == b).all() and (a != c).any()


def test_a_rows_pick_does_not_depend_on_the_other_rows():
    mixed = [SamplingSettings(1.0), GREEDY, SamplingSettings(0.5, top_k=3), SamplingSettings(2.0, top_p=0.6)] * 4
    together = next_ids(LOGITS, mixed, [np.random.default_rng(b) for b in range(16)])
    alone = [next_ids(LOGITS[b : b + 1], [mixed[b]], [np.random.default_rng(b)])[0] for b in range(16)]
    assert together.tolist() == alone
    reordered = next_ids(LOGITS[::-1], mixed[::-1], [np.random.default_rng(b) for b in reversed(range(16))])
    assert reordered[::-1].tolist() == alone


def test_one_setting_and_generator_per_row():
    with pytest.raises(ValueError, match="one setting and one generator per row"):
        next_ids(LOGITS, [GREEDY], [np.random.default_rng(0)])


# ---------------------------------------------------------------- distributions

# With N draws a character of probability p has a frequency with standard deviation
# sqrt(p (1 - p) / N) <= 0.5 / sqrt(N) = 0.00112 at N = 200,000; the tests allow 0.005 (> 4 sd) and
# also require the chi-square statistic below its 99.9% quantile. The draws are seeded: no flakiness.
N = 200_000
MAX_FREQUENCY_ERROR = 0.005
# 99.9% quantiles of the chi-square distribution by degrees of freedom
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88, 10: 29.59, 11: 31.26}


def check_frequencies(ids: np.ndarray, expected: np.ndarray) -> None:
    counts = np.bincount(ids, minlength=len(expected))
    assert counts[expected == 0].sum() == 0  # filtered characters are never drawn
    kept = expected > 0
    frequencies = counts / len(ids)
    assert np.abs(frequencies - expected).max() < MAX_FREQUENCY_ERROR
    chi2 = (((counts - len(ids) * expected) ** 2)[kept] / (len(ids) * expected[kept])).sum()
    assert kept.sum() == 1 and chi2 == 0 or chi2 < CHI2_999[kept.sum() - 1]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_frequencies_match_softmax_of_logits_over_temperature(temperature):
    logits = np.array([2.0, 1.5, 0.3, -0.2, 0.0, 1.0, -1.0, 0.7], dtype=np.float32)
    expected = softmax(logits.astype(np.float64) / temperature)
    check_frequencies(draws(logits, SamplingSettings(temperature), N, seed=int(temperature * 10)), expected)


def test_frequencies_after_top_k_and_top_p_match_the_filtered_distribution():
    logits = np.linspace(3.0, -3.0, 12).astype(np.float32)[np.random.default_rng(5).permutation(12)]
    settings = SamplingSettings(1.5, top_k=8, top_p=0.9)
    expected = probabilities(logits, settings)
    kept = np.argsort(-logits)[: (expected > 0).sum()]
    assert 2 < len(kept) < 8  # top-p cut inside the top-k set
    full = softmax(logits.astype(np.float64) / 1.5)
    assert np.allclose(expected[kept], full[kept] / full[kept].sum())
    check_frequencies(draws(logits, settings, N, seed=9), expected)


def test_top_p_keeps_exactly_the_smallest_set_whose_mass_reaches_p():
    p = np.array([0.4, 0.3, 0.2, 0.1])
    logits = np.log(p)[[2, 0, 3, 1]]  # ids in a shuffled order: id 1 is 0.4, id 3 is 0.3, id 0 is 0.2
    for top_p, kept in [(0.4, {1}), (0.39, {1}), (0.41, {1, 3}), (0.7, {1, 3}), (0.70001, {1, 3, 0}), (0.9, {1, 3, 0}), (0.95, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})]:
        probs = probabilities(logits, SamplingSettings(1.0, top_p=top_p))
        assert set(np.flatnonzero(probs)) == kept, top_p
        assert math.isclose(probs.sum(), 1.0)


def test_a_top_p_below_the_slack_keeps_the_most_likely_character():
    # p - TOP_P_SLACK < 0: a set of mass 0 would already "reach" it, but the most likely one always stays
    logits = np.array([[0.5, 3.0, 1.0, -2.0]], dtype=np.float32)
    settings = SamplingSettings(1.0, top_p=1e-13)
    assert probabilities(logits[0], settings).tolist() == [0.0, 1.0, 0.0, 0.0]
    assert all(next_ids(logits, [settings], [np.random.default_rng(seed)])[0] == 1 for seed in range(20))


def test_a_batch_of_mixed_settings_is_one_vectorized_pick_equal_to_each_row_alone():
    """The engine's path: per-row arrays into model.runtime.sampling.pick, greedy and filtered rows mixed."""
    rng = np.random.default_rng(7)
    logits = rng.normal(0, 3, (64, 30)).astype(np.float32)
    temperature = rng.choice([0.0, 0.5, 1.0, 2.0], 64)
    top_k = rng.choice([0, 0, 1, 5], 64).astype(np.int64)
    top_p = rng.choice([1.0, 1.0, 0.3, 0.9], 64)
    u = rng.random(64)
    together = pick(logits, temperature, top_k, top_p, u)
    alone = [pick(logits[b : b + 1], temperature[b : b + 1], top_k[b : b + 1], top_p[b : b + 1], u[b : b + 1])[0] for b in range(64)]
    assert together.tolist() == alone
    for b in range(64):  # each row's pick is its inverse-CDF draw from its own distribution
        if temperature[b] == 0:
            assert together[b] == logits[b].argmax()
        else:
            cdf = np.cumsum(probabilities(logits[b], SamplingSettings(temperature[b], int(top_k[b]), top_p[b])))
            assert together[b] == np.searchsorted(cdf, u[b], side="right")


def test_top_p_against_brute_force_on_random_rows():
    rng = np.random.default_rng(3)
    for _ in range(200):
        logits = rng.normal(0, 2, size=20)
        top_p, top_k, temperature = rng.uniform(0.05, 1.0), int(rng.integers(0, 25)), rng.uniform(0.2, 3.0)
        settings = SamplingSettings(temperature, top_k=top_k, top_p=top_p)
        full = softmax(logits / temperature)
        order = np.argsort(-full, kind="stable")[: top_k or 20]
        ranked = full[order] / full[order].sum()
        smallest = next(n for n in range(1, len(ranked) + 1) if ranked[:n].sum() >= top_p - 1e-12)
        probs = probabilities(logits, settings)
        assert set(np.flatnonzero(probs)) == set(order[:smallest].tolist())
        assert np.allclose(probs[order[:smallest]], ranked[:smallest] / ranked[:smallest].sum())


def test_filters_passed_as_off_pick_what_their_neutral_values_pick():
    # the engine passes None for what no row of the step uses, and some_greedy=False when no row is greedy
    rng = np.random.default_rng(4)
    n = len(LOGITS)
    temperature, u = rng.uniform(0.2, 2.0, n), rng.random(n)
    neutral = pick(LOGITS, temperature, np.zeros(n, np.int64), np.ones(n), u, np.zeros(n))
    assert (pick(LOGITS, temperature, None, None, u, None, None, some_greedy=False) == neutral).all()
    temperature[::3] = 0.0  # some rows greedy: only the filters may be passed as off
    mixed = pick(LOGITS, temperature, np.zeros(n, np.int64), np.ones(n), u, np.zeros(n))
    assert (pick(LOGITS, temperature, None, None, u) == mixed).all()
    assert (mixed[::3] == LOGITS[::3].argmax(axis=1)).all() and (mixed != neutral).any()


class Fixed:
    """A stand-in generator whose draws are given."""

    def __init__(self, value: float):
        self.value = value

    def random(self) -> float:
        return self.value


def test_extreme_draws_never_pick_a_filtered_character():
    logits = np.array([[0.0, 2.0, -1.0, 1.9, 5.0, -3.0]], dtype=np.float32)
    top3 = SamplingSettings(1.0, top_k=3)  # keeps ids 4, 1, 3
    largest = np.nextafter(1.0, 0.0)
    assert next_ids(logits, [top3], [Fixed(0.0)])[0] == 1  # the first kept id in id order
    assert next_ids(logits, [top3], [Fixed(largest)])[0] == 4  # the last kept id, even if u * total rounds up
    assert next_ids(logits, [SamplingSettings(1e-3)], [Fixed(largest)])[0] == 4  # the others underflow to 0


def test_tiny_temperature_does_not_overflow():
    probs = probabilities(np.array([1.0, 1.0 + 1e-3, -5.0]), SamplingSettings(1e-6))
    assert probs.tolist() == [0.0, 1.0, 0.0]


# ---------------------------------------------------------------- adjustments and min-p


def reference_distribution(logits, settings: SamplingSettings, recent=None, generated=None) -> np.ndarray:
    """The distribution a row is sampled from, computed plainly, character by character, from the
    definitions in model/runtime/sampling.py's docstring (OpenAI's penalties, llama.cpp's repeat penalty)."""
    V = len(logits)
    recent = [0] * V if recent is None else list(recent)
    generated = [0] * V if generated is None else list(generated)
    z = [float(x) for x in logits]
    for i, bias in settings.logit_bias:
        z[i] += bias
    r = settings.repetition_penalty
    for j in range(V):
        if settings.repetition_window > 0 and recent[j] > 0:
            z[j] = z[j] / r if z[j] > 0 else z[j] * r
        z[j] -= settings.frequency_penalty * generated[j] + settings.presence_penalty * (1 if generated[j] > 0 else 0)
    if settings.greedy:
        out = np.zeros(V)
        out[max(range(V), key=lambda j: (z[j], -j))] = 1.0
        return out
    top = max(z)
    p = [math.exp((x - top) / settings.temperature) for x in z]
    total = sum(p)
    p = [x / total for x in p]
    kept = [j for j in range(V) if p[j] >= settings.min_p * max(p)]  # min-p
    kept.sort(key=lambda j: (-p[j], j))
    if settings.top_k:
        kept = kept[: settings.top_k]
    mass = sum(p[j] for j in kept)
    chosen, running = [], 0.0
    for j in kept:  # top-p: the smallest set of the most likely whose mass reaches top_p
        chosen.append(j)
        running += p[j] / mass
        if running >= settings.top_p - 1e-12:
            break
    out = np.zeros(V)
    for j in chosen:
        out[j] = p[j]
    return out / out.sum()


ADJUSTED = [
    SamplingSettings(1.0, presence_penalty=1.5),
    SamplingSettings(1.0, frequency_penalty=0.7),
    SamplingSettings(0.8, presence_penalty=-1.0, frequency_penalty=-0.5),
    SamplingSettings(1.0, repetition_penalty=1.8, repetition_window=16),
    SamplingSettings(1.3, repetition_penalty=0.5),
    SamplingSettings(1.0, min_p=0.2),
    SamplingSettings(1.0, min_p=1.0),
    SamplingSettings(0.7, logit_bias=((3, 5.0), (0, -100.0), (7, 1.5))),
    SamplingSettings(1.2, top_k=6, top_p=0.8, min_p=0.05, presence_penalty=0.4, frequency_penalty=0.3,
                     repetition_penalty=1.3, logit_bias=((2, -2.0),)),
]


@pytest.mark.parametrize("settings", ADJUSTED, ids=["presence", "frequency", "negative", "repetition", "repetition<1",
                                                    "min_p", "min_p=1", "logit_bias", "all"])
def test_each_adjustment_gives_the_reference_distribution(settings):
    rng = np.random.default_rng(11)
    logits = rng.normal(0.0, 2.0, 10).astype(np.float32)
    logits[4] = -logits[4] if logits[4] > 0 else logits[4]  # negative logits too: the repetition penalty multiplies them
    recent = rng.integers(0, 3, 10)
    generated = rng.integers(0, 4, 10) * (rng.random(10) < 0.6)
    expected = reference_distribution(logits, settings, recent, generated)
    assert np.allclose(probabilities(logits, settings, recent, generated), expected, atol=1e-12)
    assert not np.allclose(expected, reference_distribution(logits, SamplingSettings(settings.temperature)))  # it changed something
    rngs = [np.random.default_rng(4)] * N
    ids = next_ids(np.tile(logits, (N, 1)), [settings] * N, rngs, np.tile(recent, (N, 1)), np.tile(generated, (N, 1)))
    check_frequencies(ids, expected)


def test_greedy_picks_the_most_likely_character_after_the_adjustments():
    logits = np.array([[1.0, 3.0, 2.5, -1.0]], dtype=np.float32)
    generated = np.array([[0, 2, 0, 0]])
    assert next_ids(logits, [GREEDY], [Fixed(0.5)], generated=generated)[0] == 1  # no penalty: unchanged
    for settings, want in [(SamplingSettings(0.0, frequency_penalty=0.5), 2),  # 3 - 2 * 0.5 = 2 < 2.5
                           (SamplingSettings(0.0, presence_penalty=0.4), 1),  # 3 - 0.4 > 2.5
                           (SamplingSettings(0.0, repetition_penalty=1.5), 2),  # 3 / 1.5 = 2 < 2.5
                           (SamplingSettings(0.0, logit_bias=((3, 100.0),)), 3)]:
        recent = generated  # the last characters: the generated ones
        assert next_ids(logits, [settings], [Fixed(0.5)], recent, generated)[0] == want, settings
        assert reference_distribution(logits[0], settings, recent[0], generated[0])[want] == 1.0


def test_a_batch_with_adjusted_and_plain_rows_is_one_pick_equal_to_each_row_alone():
    rng = np.random.default_rng(8)
    logits = rng.normal(0, 2, (32, 12)).astype(np.float32)
    settings = [ADJUSTED[b % len(ADJUSTED)] if b % 3 else SamplingSettings(1.0) for b in range(32)]
    recent, generated = rng.integers(0, 3, (32, 12)), rng.integers(0, 3, (32, 12))
    u = rng.random(32)
    adjustments = Adjustments.of(settings, 12, recent, generated)
    together = pick(logits, np.array([s.temperature for s in settings]), np.array([s.top_k for s in settings]),
                    np.array([s.top_p for s in settings]), u, np.array([s.min_p for s in settings]), adjustments)
    for b in range(32):
        cdf = np.cumsum(reference_distribution(logits[b], settings[b], recent[b], generated[b]))
        assert together[b] == min(np.searchsorted(cdf, u[b], side="right"), 11), b


def test_an_id_beyond_the_vocabulary_biases_nothing():
    logits = LOGITS[0]
    assert np.allclose(probabilities(logits, SamplingSettings(1.0, logit_bias=((99, 50.0),))), probabilities(logits, SamplingSettings(1.0)))


@pytest.mark.parametrize("kwargs", [
    {"min_p": -0.1}, {"min_p": 1.1}, {"presence_penalty": 2.5}, {"frequency_penalty": -3}, {"repetition_penalty": 0},
    {"repetition_penalty": 11}, {"repetition_window": -1}, {"repetition_window": 5000}, {"repetition_window": 1.5},
    {"logit_bias": ((1, 101.0),)}, {"logit_bias": ((-1, 1.0),)}, {"logit_bias": ((1, 1.0), (1, 2.0))},
])
def test_adjustments_that_cannot_be_applied_are_refused(kwargs):
    with pytest.raises(ValueError, match="invalid sampling settings"):
        SamplingSettings(1.0, **kwargs)


# ---------------------------------------------------------------- chargen sample


@pytest.fixture(scope="module")
def cli():
    from chargen.cli import main

    def run(*args):
        result = CliRunner().invoke(main, list(args), catch_exceptions=False)
        return result

    return run


def continuation(prompt: str, n: int) -> str:
    from conftest import PERIODIC

    text = PERIODIC * (2 + n // len(PERIODIC))
    start = text.index(prompt) + len(prompt)
    return text[start : start + n]


def test_sample_greedy_reproduces_the_periodic_text(cli, tiny_artifact):
    result = cli("sample", "--artifact", str(tiny_artifact), "--prompt", "the quick ", "--max-chars", "120", "--temperature", "0")
    assert result.exit_code == 0, result.output
    assert result.stdout == "the quick " + continuation("the quick ", 120)
    assert result.stderr == ""
    quiet = cli("sample", "--artifact", str(tiny_artifact), "--prompt", "lazy ", "--max-chars", "30", "--temperature", "0", "--no-prompt")
    assert quiet.stdout == continuation("lazy ", 30)


def test_sample_takes_its_defaults_from_model_defaults(cli, tiny_artifact):
    from model.records.defaults import DEFAULTS

    result = cli("sample", "--artifact", str(tiny_artifact), "--prompt", "the quick ", "--temperature", "0", "--no-prompt")
    assert result.exit_code == 0, result.output
    assert result.stdout == continuation("the quick ", DEFAULTS.max_chars)
    shown = cli("sample", "--help").stdout
    for option, value in [("--max-chars", DEFAULTS.max_chars), ("--temperature", DEFAULTS.temperature)]:
        assert re.search(rf"default: {value}\b", shown.split(option, 1)[1].split("\n  --", 1)[0]), option
    unseeded = cli("sample", "--artifact", str(tiny_artifact), "--prompt", "the ", "--max-chars", "20")
    assert unseeded.exit_code == 0 and "seed: " in unseeded.stderr  # not greedy: the default temperature is not 0


def test_sample_seeds_repeat(cli, tiny_artifact):
    args = ["sample", "--artifact", str(tiny_artifact), "--prompt", "the ", "--max-chars", "200", "--temperature", "3"]
    a, b, c = cli(*args, "--seed", "5"), cli(*args, "--seed", "5"), cli(*args, "--seed", "6")
    assert a.exit_code == b.exit_code == c.exit_code == 0
    assert a.stdout == b.stdout != c.stdout
    assert a.stdout != "the " + continuation("the ", 200)  # really sampled, not greedy
    unseeded = cli(*args)
    seed = unseeded.stderr.split("seed: ")[1].split()[0]
    assert cli(*args, "--seed", seed).stdout == unseeded.stdout


def test_sample_top_k_1_and_top_p_small_are_greedy(cli, tiny_artifact):
    base = ["sample", "--artifact", str(tiny_artifact), "--prompt", "jumps", "--max-chars", "60"]
    greedy = cli(*base, "--temperature", "0").stdout
    assert cli(*base, "--temperature", "2", "--top-k", "1", "--seed", "1").stdout == greedy
    assert cli(*base, "--temperature", "1", "--top-p", "0.01", "--seed", "1").stdout == greedy


def test_sample_stop_sequences(cli, tiny_artifact):
    result = cli("sample", "--artifact", str(tiny_artifact), "--prompt", "the quick ", "--max-chars", "200",
                 "--temperature", "0", "--stop", "lazy", "--stop", "nothing like this")
    assert result.exit_code == 0
    assert result.stdout == "the quick brown fox jumps over the "


def test_sample_unknown_prompt_characters_are_dropped_with_a_note(cli, tiny_artifact):
    args = ["sample", "--artifact", str(tiny_artifact), "--max-chars", "50", "--temperature", "0"]
    result = cli(*args, "--prompt", "the qu☃ick ")
    assert result.exit_code == 0
    assert result.stdout == "the qu☃ick " + continuation("the quick ", 50)  # the user's prompt, as typed
    assert "dropped 1 prompt character" in result.stderr
    accented = cli(*args, "--prompt", "thé quick ")  # é -> e: kept, no note
    assert accented.stdout == "thé quick " + continuation("the quick ", 50) and accented.stderr == ""
    nothing_known = cli(*args, "--prompt", "☃☃")
    assert nothing_known.exit_code == 0 and "dropped 2" in nothing_known.stderr
    assert nothing_known.stdout == "☃☃" + cli(*args, "--prompt", "\n").stdout[1:]  # as after a newline


@pytest.mark.parametrize(
    "args,message",
    [
        (["--temperature", "-1"], "--temperature"),
        (["--temperature", "nan"], "temperature"),
        (["--temperature", "inf"], "temperature"),
        (["--temperature", "11"], "--temperature"),  # above model.records.defaults.MAX_TEMPERATURE
        (["--temperature", "warm"], "--temperature"),
        (["--top-k", "-2"], "--top-k"),
        (["--top-k", "1.5"], "--top-k"),
        (["--top-p", "0"], "--top-p"),
        (["--top-p", "1.5"], "--top-p"),
        (["--max-chars", "0"], "--max-chars"),
        (["--seed", "-3"], "--seed"),
        (["--stop", ""], "--stop"),
        (["--bogus"], "--bogus"),
    ],
)
def test_sample_bad_values_are_usage_errors(cli, tiny_artifact, args, message):
    result = cli("sample", "--artifact", str(tiny_artifact), *args)
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.output


def test_sample_artifact_errors_exit_1_without_traceback(cli, tiny_artifact, tmp_path):
    (tmp_path / "a-file").write_text("x")
    broken, old = tmp_path / "broken", tmp_path / "old"
    for directory in (broken, old):
        directory.mkdir()
        for name in ("vocab.json", "meta.json", "model.keras", "model.int8.onnx"):  # all but model.onnx
            (directory / name).write_bytes((tiny_artifact / name).read_bytes())
    (broken / "model.onnx").write_bytes(b"not a graph")  # the int8 graph served is checked against it
    cases = [
        (tmp_path / "missing", "no such artifact directory"),
        (tmp_path / "a-file", "is a file"),
        (tmp_path, "missing model.onnx, vocab.json, meta.json"),
        (broken, "not an ONNX model"),
        (old, "chargen export --artifact"),  # made before artifacts held their graph: says how to add it
    ]
    for path, message in cases:
        result = cli("sample", "--artifact", str(path), "--prompt", "x")
        assert result.exit_code == 1, path
        assert message in result.stderr and "Traceback" not in result.output
        assert result.stdout == ""
    assert cli("sample", "--prompt", "x").exit_code == 2  # --artifact is required
