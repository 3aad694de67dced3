"""POST /v1/inspect through the service: the time an answer takes, and its size, for 1,000- and
4,000-character texts (pieces of the last 10% of tinyshakespeare). Prints the figures of
bench/README.md ("Look inside").

    .venv/bin/python bench/inside.py [--artifact artifacts/default] [--repeats 5] [--corpus ../shared/corpora/tinyshakespeare.txt]

One gunicorn worker with the project's config (as bench/load.py starts it); each request is sent
--repeats times, one at a time, after one unmeasured request that reads the weights; the table gives
the median and the fastest, from sending to the whole body received. The requests (layer 3 is the
shipped model's last):
  1,000 characters, layer 3, every quantity (hidden, cell, 4 gates), as lists and as float16;
  4,000 characters, layer 3, the hidden state, as lists and as float16;
  each length with cells 10 (the ranking and saturation, every layer traced), hidden of layer 3 in float16.

(Not named inspect.py: a script of that name in bench/ shadows the standard library's `inspect` for
every bench script, as Python puts bench/ first on their path.)
"""

from __future__ import annotations

import argparse
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


def requests_to_time(text: str, last_layer: int) -> list[tuple[str, dict]]:
    short, long = text[:1000], text[:4000]
    hidden = {"layers": [last_layer], "quantities": ["hidden"]}
    return [
        ("1,000 chars, one layer, every quantity, list", {"text": short, "layers": [last_layer]}),
        ("1,000 chars, one layer, every quantity, float16", {"text": short, "layers": [last_layer], "encoding": "float16"}),
        ("4,000 chars, one layer, hidden, list", {"text": long, **hidden}),
        ("4,000 chars, one layer, hidden, float16", {"text": long, **hidden, "encoding": "float16"}),
        ("1,000 chars, one layer, hidden, float16, cells 10", {"text": short, **hidden, "encoding": "float16", "cells": 10}),
        ("4,000 chars, one layer, hidden, float16, cells 10", {"text": long, **hidden, "encoding": "float16", "cells": 10}),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", default=str(ROOT / "artifacts" / "default"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--corpus", default=str(CORPUS))
    args = parser.parse_args()
    text = Path(args.corpus).read_text(encoding="utf-8")
    text = text[int(len(text) * 0.9):]
    log = Path(tempfile.mkdtemp(prefix="bench-inspect-")) / "server.log"
    process, url = start_server(args.artifact, workers=1, batch=None, log_path=log)
    try:
        layers = requests.get(url + "/info", timeout=30).json()["model"]["layers"]
        session = requests.Session()
        session.post(url + "/v1/inspect", json={"text": "a", "quantities": ["hidden"]}, timeout=60).raise_for_status()
        print(f"{'request':<52} {'median s':>9} {'fastest s':>9} {'body MB':>8}")
        for name, body in requests_to_time(text, layers):
            seconds, size = [], 0
            for _ in range(args.repeats):
                began = time.perf_counter()
                r = session.post(url + "/v1/inspect", json=body, timeout=300)
                seconds.append(time.perf_counter() - began)
                r.raise_for_status()
                size = len(r.content)
            print(f"{name:<52} {statistics.median(seconds):>9.3f} {min(seconds):>9.3f} {size / 1e6:>8.2f}")
    finally:
        stop_server(process)


if __name__ == "__main__":
    main()
