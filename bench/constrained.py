"""Constrained generation, side by side in one run: throughput of 32 streams all constrained (a
regex, a small grammar) against 32 unconstrained; compile times; first-character latency with and
without a constraint. Prints one table; see bench/README.md.

    .venv/bin/python bench/constrained.py [--artifact artifacts/default] [--streams 32] [--seconds 6] [--rounds 3]

Throughput: three engines of --streams slots each (unconstrained, the regex, the grammar) take
turns of 10 steps, --seconds of turns in all for each, in --rounds rounds; a stream that finishes
(a constrained one at the end of its match, any at --max-chars) is replaced at once by a new one
with the next seed, and its start (the prompt read) counts in its engine's time. Rates are
characters delivered per second over all streams (forced runs included: they are characters the
user gets); the table gives each one's median round and the median of the per-round ratios to the
unconstrained rate (goal: at least 85%). Every stream samples at temperature 0.8.

Compile: each example compiled afresh (the cache emptied first), the median of --repeats; a JSON
schema is compiled over the shipped vocabulary plus JSON's punctuation, as the shipped model cannot
write `{` or `"`. First character: start() and steps until the first character is delivered, one
stream alone, with and without the regex, the median of --repeats.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.records.vocab import Vocab  # noqa: E402
from model.runtime import constraints  # noqa: E402
from model.runtime.artifact import load  # noqa: E402
from model.runtime.engine import Engine  # noqa: E402
from model.runtime.sampling import SamplingSettings  # noqa: E402
from model.runtime.streams import GenerationRequest  # noqa: E402

TEMPERATURE = 0.8
PROMPT = "\n\n"
STEPS_PER_TURN = 10
# Patterns the shipped model's vocabulary can write: a speaker's turn of a play, long enough that
# streams mostly run to --max-chars
REGEX = r"([A-Z]+( [A-Z]+)?:\n([A-Z][a-z ,;']*[.!?]\n){1,4}\n){1,20}"
GRAMMAR = r"""
root   ::= turn+
turn   ::= name ":\n" line{1,4} "\n"
name   ::= [A-Z]+ (" " [A-Z]+)?
line   ::= [A-Z] [a-z ,;']* end "\n"
end    ::= "." | "!" | "?"
"""
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "lines": {"type": "array", "items": {"type": "string"}},
                                           "act": {"type": "integer", "minimum": 1, "maximum": 5}},
          "required": ["name", "lines", "act"]}


def fifty_rules() -> str:
    """A 50-rule grammar: a chain of rules, each with alternatives, classes and repetition."""
    rules = ["root ::= r0 (\" \" r0)*"]
    for i in range(49):
        rules.append(f'r{i} ::= [a-z]{{1,3}} r{i + 1} | "{chr(97 + i % 26)}" [A-Z]? r{i + 1}')
    rules.append('r49 ::= [a-z]+ ("." | "!")')
    return "\n".join(rules) + "\n"


class Pool:
    """`streams` streams of one engine kept running: a finished one is replaced by a new one."""

    def __init__(self, engine: Engine, streams: int, max_chars: int, constraint):
        self.engine, self.max_chars, self.constraint = engine, max_chars, constraint
        self.seed = 0
        self.streams = [self._start() for _ in range(streams)]

    def _start(self):
        self.seed += 1
        return self.engine.start(GenerationRequest(PROMPT, self.max_chars, SamplingSettings(TEMPERATURE), seed=self.seed,
                                                   constraint=self.constraint))

    def run(self, steps: int) -> tuple[int, float]:
        """(characters delivered, seconds) over `steps` steps."""
        chars, began = 0, time.perf_counter()
        for _ in range(steps):
            for d in self.engine.step(self.streams):
                chars += len(d.text)
            if any(s.finish_reason for s in self.streams):
                self.streams = [s if s.finish_reason is None else self._start() for s in self.streams]
        return chars, time.perf_counter() - began


def throughput(artifact, streams: int, seconds: float, rounds: int, max_chars: int, kinds: dict) -> dict:
    pools = {name: Pool(Engine(artifact, max_batch=streams), streams, max_chars, c) for name, c in kinds.items()}
    rates = {name: [] for name in pools}
    for _ in range(rounds):
        totals = {name: [0, 0.0] for name in pools}
        end = time.perf_counter() + seconds * len(pools)
        while time.perf_counter() < end:
            for name, pool in pools.items():
                chars, spent = pool.run(STEPS_PER_TURN)
                totals[name][0] += chars
                totals[name][1] += spent
        for name, (chars, spent) in totals.items():
            rates[name].append(chars / spent)
    return rates


def compile_ms(kind: str, source, vocab: Vocab, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        constraints.clear_cache()
        began = time.perf_counter()
        constraints.compile_constraint(kind, source, vocab)
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e3


def first_char_ms(artifact, constraint, repeats: int) -> float:
    engine = Engine(artifact, max_batch=1)
    times = []
    for seed in range(repeats):
        began = time.perf_counter()
        stream = engine.start(GenerationRequest(PROMPT, 100, SamplingSettings(TEMPERATURE), seed=seed, constraint=constraint))
        while not any(d.text for d in engine.step([stream])) and stream.finish_reason is None:
            pass
        times.append(time.perf_counter() - began)
        if stream.finish_reason is None:
            engine.cancel(stream)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", default=str(ROOT / "artifacts" / "default"))
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=6.0, help="seconds of turns per engine and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-chars", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=20, help="compiles and first characters measured")
    parser.add_argument("--precision", default="auto", choices=["auto", "int8", "float32"],
                        help="the graph the engines run (auto: what a server runs: int8 where the artifact has it)")
    args = parser.parse_args()

    artifact = load(args.artifact, precision=args.precision)
    vocab = artifact.vocab
    regex = constraints.compile_constraint("regex", REGEX, vocab)
    grammar = constraints.compile_constraint("grammar", GRAMMAR, vocab)
    print(f"{artifact.path} ({artifact.precision} graph): {len(vocab)} characters, {args.streams} streams, temperature {TEMPERATURE}\n")

    rates = throughput(artifact, args.streams, args.seconds, args.rounds, args.max_chars,
                       {"unconstrained": None, "regex": regex, "grammar": grammar})
    base = rates["unconstrained"]
    print(f"| {args.streams} streams | chars/s (median of {args.rounds}) | share of unconstrained |")
    print("| --- | --- | --- |")
    for name, r in rates.items():
        share = statistics.median(x / b for x, b in zip(r, base))
        print(f"| {name} | {statistics.median(r):,.0f} | {share:.0%} |")

    json_vocab = Vocab(list(vocab.chars) + [c for c in '{}[]":,0123456789' if c not in vocab])
    print(f"\n| compile (median of {args.repeats}, cache emptied) | ms |")
    print("| --- | --- |")
    for label, kind, source, v in [("regex (a play's turns)", "regex", REGEX, vocab), ("grammar (the same, 5 rules)", "grammar", GRAMMAR, vocab),
                                   ("grammar, 50 rules", "grammar", fifty_rules(), vocab),
                                   ("JSON schema (3 properties)", "json_schema", SCHEMA, json_vocab)]:
        print(f"| {label} | {compile_ms(kind, source, v, args.repeats):.1f} |")

    print(f"\n| first character, one stream (median of {args.repeats}) | ms |")
    print("| --- | --- |")
    print(f"| unconstrained | {first_char_ms(artifact, None, args.repeats):.2f} |")
    print(f"| regex | {first_char_ms(artifact, regex, args.repeats):.2f} |")
    print(f"| grammar | {first_char_ms(artifact, grammar, args.repeats):.2f} |")


if __name__ == "__main__":
    main()
