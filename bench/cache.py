"""The prompt-state cache through the service: the time to the first character of a long prompt
sent again, and the cost of each turn of a long chat, with the cache on and off. Prints the figures
of bench/README.md ("The prompt cache").

    .venv/bin/python bench/cache.py [--artifact artifacts/default] [--prompts 5] [--turns 20]

Two servers in turn (gunicorn with the project's config, one worker, as bench/load.py starts it):
CHARGEN_PROMPT_CACHE_MB at its default (64) and 0. On each:
1. --prompts different 4,000-character prompts (pieces of tinyshakespeare), each sent twice in a
   row to /v1/generate (streamed, 20 characters, temperature 0.8, seed 1): the time from sending
   to the first event with text, and the server's prompt_ms (timings of the last event), for the
   first and the second sending; medians over the prompts.
2. A chat of --turns turns on /v1/chat/completions (streamed): each turn sends the whole
   conversation so far (the replies as the server gave them) and a new user message (a line of
   the corpus); per turn the transcript's length and the time to the first character.
Goals (issue 13): a second sending's first character in at most 10% of the first's; with the cache,
a turn costs the same whatever the transcript's length.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from bench.load import start_server, stop_server  # noqa: E402

CORPUS = ROOT.parent / "shared" / "corpora" / "tinyshakespeare.txt"
PROMPT_CHARS = 4000


def first_event(url: str, path: str, body: dict) -> tuple[float, dict, str]:
    """Seconds from sending to the first event that carries text, the last JSON event, and the text."""
    began = time.perf_counter()
    first, last, texts = None, {}, []
    with requests.post(url + path, json={**body, "stream": True}, stream=True, timeout=300) as r:
        r.raise_for_status()
        buffer = b""
        for chunk in r.iter_content(chunk_size=None):
            buffer += chunk
            while b"\n\n" in buffer:
                block, buffer = buffer.split(b"\n\n", 1)
                data = block.decode()[len("data: "):]
                if data == "[DONE]":
                    continue
                event = json.loads(data)
                text = event.get("text") or "".join(c.get("delta", {}).get("content") or "" for c in event.get("choices", []))
                if first is None and text:
                    first = time.perf_counter() - began
                texts.append(text)
                last = event
    return first, last, "".join(texts)


def measure(url: str, corpus: str, prompts: int, turns: int) -> dict:
    firsts, seconds, first_ms, second_ms = [], [], [], []
    for i in range(prompts):
        start = 10_000 + i * 50_000
        prompt = corpus[start : start + PROMPT_CHARS]
        ask = {"prompt": prompt, "max_chars": 20, "temperature": 0.8, "seed": 1}
        a, a_last, _ = first_event(url, "/v1/generate", ask)
        b, b_last, _ = first_event(url, "/v1/generate", ask)
        firsts.append(a)
        seconds.append(b)
        first_ms.append(a_last["timings"]["prompt_ms"])
        second_ms.append(b_last["timings"]["prompt_ms"])
    lines = [line for line in corpus[200_000:].splitlines() if len(line) > 30][:turns]
    messages, chat = [], []
    for turn, line in enumerate(lines):
        messages.append({"role": "user", "content": line})
        ttfc, last, reply = first_event(url, "/v1/chat/completions", {
            "messages": messages, "max_tokens": 200, "temperature": 0.8, "seed": turn, "stream_options": {"include_usage": True}})
        chat.append((turn + 1, last["usage"]["prompt_tokens"], ttfc))
        messages.append({"role": "assistant", "content": reply})
    return {"first": statistics.median(firsts), "second": statistics.median(seconds),
            "first_prompt_ms": statistics.median(first_ms), "second_prompt_ms": statistics.median(second_ms), "chat": chat}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", default=str(ROOT / "artifacts" / "default"))
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--turns", type=int, default=20)
    args = parser.parse_args()
    corpus = CORPUS.read_text(encoding="utf-8")
    results = {}
    for mb in ("64", "0"):
        os.environ["CHARGEN_PROMPT_CACHE_MB"] = mb
        with tempfile.TemporaryDirectory() as tmp:
            process, url = start_server(args.artifact, 1, None, Path(tmp) / "server.log")
            try:
                results[mb] = measure(url, corpus, args.prompts, args.turns)
            finally:
                stop_server(process)
    print(f"{args.artifact}: {PROMPT_CHARS:,}-character prompts, median of {args.prompts}\n")
    print("| cache | first sending: first char | prompt_ms | second sending: first char | prompt_ms | second / first |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mb, r in results.items():
        print(f"| {'on (64 MB)' if mb != '0' else 'off'} | {r['first'] * 1e3:.1f} ms | {r['first_prompt_ms']:.1f} | "
              f"{r['second'] * 1e3:.1f} ms | {r['second_prompt_ms']:.1f} | {r['second'] / r['first']:.1%} |")
    print(f"\nA chat of {args.turns} turns (streamed; first character of each reply)\n")
    print("| turn | transcript chars | cache on: first char | cache off: first char |")
    print("| --- | --- | --- | --- |")
    for on, off in zip(results["64"]["chat"], results["0"]["chat"]):
        print(f"| {on[0]} | {on[1]:,} | {on[2] * 1e3:.1f} ms | {off[2] * 1e3:.1f} ms |")


if __name__ == "__main__":
    main()
