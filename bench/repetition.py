"""How often samples loop, and what each sampling control does to it: greedy and low-temperature
samples of the shipped model, with each control of model/runtime/sampling.py in turn. Prints the table in
README.md (the API section).

    .venv/bin/python bench/repetition.py [--artifact artifacts/default] [--samples 200] [--chars 200]

A sample loops when some run of --span (20) characters occurs in it twice or more: "the the the",
a speaker's name over and over, a line said again. The prompts are --samples lines of the
validation part of tinyshakespeare (the last tenth, which the shipped model did not learn from),
each the start of a speech, so greedy samples differ by prompt; sampled rows draw with seed i for
prompt i. Every row runs all its samples as one batch in the engine (the same code path the
service uses). Beside each share: the mean negative log-probability per character of the samples
under the model's own distribution (nats/char, before any control): what a control costs in
plausibility; greedy text scores low (it is the likeliest path), so a rising figure means the
control pushed the text off it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.runtime.artifact import load# noqa: E402
from model.runtime.engine import Engine, GenerationRequest  # noqa: E402
from model.runtime.sampling import SamplingSettings  # noqa: E402

CORPUS = ROOT.parent / "shared" / "corpora" / "tinyshakespeare.txt"
FALLBACK = ["ROMEO:\n", "JULIET:\n", "First Citizen:\n", "KING RICHARD III:\n", "MENENIUS:\n"]
CONTROLS = [  # (label, the settings beyond the temperature)
    ("none", {}),
    ("presence_penalty 0.5", {"presence_penalty": 0.5}),
    ("presence_penalty 1.0", {"presence_penalty": 1.0}),
    ("frequency_penalty 0.3", {"frequency_penalty": 0.3}),
    ("frequency_penalty 0.6", {"frequency_penalty": 0.6}),
    ("repetition_penalty 1.1, window 64", {"repetition_penalty": 1.1, "repetition_window": 64}),
    ("repetition_penalty 1.3, window 64", {"repetition_penalty": 1.3, "repetition_window": 64}),
    ("repetition_penalty 1.3, window 256", {"repetition_penalty": 1.3, "repetition_window": 256}),
    ("min_p 0.1", {"min_p": 0.1}),
    ("logit_bias newline -2", {"logit_bias": "\n"}),
]
TEMPERATURES = (0.0, 0.1, 0.2, 0.4)


def prompts(count: int) -> list[str]:
    """Starts of speeches from the validation part of the corpus ("NAME:\\n" and the speech's
    first line)."""
    if not CORPUS.exists():
        return [FALLBACK[i % len(FALLBACK)] for i in range(count)]
    text = CORPUS.read_text(encoding="utf-8")
    held_out = text[int(len(text) * 0.9):]
    speeches = [block for block in held_out.split("\n\n") if ":\n" in block]
    step = max(1, len(speeches) // count)
    chosen = []
    for block in speeches[::step][:count]:
        name, _, speech = block.partition(":\n")
        chosen.append(f"{name}:\n{speech.splitlines()[0]}\n")
    return chosen


def loops(text: str, span: int) -> bool:
    runs = [text[i : i + span] for i in range(len(text) - span + 1)]
    return len(set(runs)) < len(runs)


def run_row(engine: Engine, starts: list[str], temperature: float, extra: dict, chars: int) -> list:
    extra = dict(extra)
    if extra.get("logit_bias") == "\n":
        extra["logit_bias"] = ((engine.vocab.index["\n"], -2.0),)
    settings = SamplingSettings(temperature, **extra)
    streams = [engine.start(GenerationRequest(p, max_chars=chars, sampling=settings, seed=i, rank=True))
               for i, p in enumerate(starts)]
    while any(s.finish_reason is None for s in streams):
        engine.step([s for s in streams if s.finish_reason is None])
    return streams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", default=str(ROOT / "artifacts" / "default"))
    parser.add_argument("--samples", type=int, default=200, help="samples per cell (one per prompt)")
    parser.add_argument("--chars", type=int, default=200, help="characters per sample")
    parser.add_argument("--span", type=int, default=20, help="a repeated run of this many characters is a loop")
    args = parser.parse_args()

    artifact = load(args.artifact)
    engine = Engine(artifact, max_batch=args.samples)
    starts = prompts(args.samples)
    began = time.perf_counter()
    header = "| control | " + " | ".join(f"{'greedy' if t == 0 else f'T={t}'}: loops, nats/char" for t in TEMPERATURES) + " |"
    print(f"{artifact.path}: {len(starts)} prompts, {args.chars} characters per sample, a loop = a {args.span}-character run twice\n")
    print(header)
    print("|" + " --- |" * (len(TEMPERATURES) + 1))
    for label, extra in CONTROLS:
        cells = []
        for t in TEMPERATURES:
            streams = run_row(engine, starts, t, extra, args.chars)
            share = sum(loops(s.text, args.span) for s in streams) / len(streams)
            nats = -sum(s.logprob_sum for s in streams) / sum(s.generated for s in streams)
            cells.append(f"{share:.0%}, {nats:.2f}")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n{time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
