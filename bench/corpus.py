"""A corpus larger than memory allows to hold twice: preparing it and training on it, with the peak
resident memory of each and the preparation's speed. Prints one table per corpus size and the goals
of issue 14 (peak RSS at most 1.5 GB for a 1 GB corpus on the default model, flat in the corpus
size, preparation at least 50 MB/s); see bench/README.md.

    .venv/bin/python bench/corpus.py                       # 1 GB, 300 steps, then deletes the corpus
    .venv/bin/python bench/corpus.py --gb 0.1 --steps 100 --keep
    .venv/bin/python bench/corpus.py --gb 0.05 0.3 --steps 60 --eval-chars 200000 --max-minutes 4

1. The corpus: tinyshakespeare (../shared/corpora) repeated to --gb gigabytes, written to
   --dir (/tmp/chargen-corpus; nothing large is ever committed), removed at the end unless --keep.
2. Preparation alone, in a fresh process: model/training/data.py's two passes (check, hash and find the
   vocabulary; then encode into the token file), the way `chargen train` runs them before Keras loads.
3. `chargen train` on the same files, in a fresh process, default model (2x256 LSTM, batches of 64
   windows of 100): --steps steps, an evaluation every --steps/3 on a sample of --eval-chars
   characters followed by samples with their novelty (--sample-chars, chargen's default 200: the
   run builds model/training/samples.py's index of the training text), and at the end the best model on the
   whole validation text (a tenth of the corpus) for what is left of --max-minutes. It reuses the
   token file, after hashing the corpus again.
Each process's peak resident set is the kernel's (ru_maxrss from wait4); its file-backed part
(pages of the memory map, of the page cache mapped in) and its anonymous part are sampled from
/proc every 50 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHAKESPEARE = ROOT.parent / "shared" / "corpora" / "tinyshakespeare.txt"
CHARGEN = str(Path(sys.executable).with_name("chargen"))
GOAL_RSS_GB, GOAL_MB_PER_S = 1.5, 50.0

PREPARE = """
import json, sys, time
from pathlib import Path
from model.training.data import find_sources, scan, write_tokens
began = time.monotonic()
sources = find_sources([sys.argv[1]], downloads=Path(sys.argv[2]))
corpus = scan(sources)
scanned = time.monotonic()
write_tokens(sources, corpus, Path(sys.argv[2]))
print(json.dumps({"scan_s": scanned - began, "write_s": time.monotonic() - scanned, "chars": corpus.length,
                  "vocabulary": len(corpus.vocabulary)}))
"""


def make_corpus(path: Path, gb: float) -> int:
    text = SHAKESPEARE.read_bytes()
    copies = max(1, round(gb * 1e9 / len(text)))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for _ in range(copies):
            f.write(text)
    return path.stat().st_size


def status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of a process, in bytes (empty once it has gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def measure(argv: list[str], env: dict | None = None, log: Path | None = None) -> dict:
    """Run argv to its end; its wall time, output, the kernel's peak RSS, and the sampled peaks."""
    began = time.monotonic()
    with open(log, "w") if log else open(os.devnull, "w") as sink:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=sink, text=True, cwd=ROOT,
                                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})})
        peaks = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        done = threading.Event()

        def sample():
            while not done.is_set():
                for key, value in status(process.pid).items():
                    if key in peaks:
                        peaks[key] = max(peaks[key], value)
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        output = process.stdout.read()
        _, code, usage = os.wait4(process.pid, 0)
        done.set()
        sampler.join()
    process.returncode = os.waitstatus_to_exitcode(code)
    if process.returncode:
        raise SystemExit(f"{' '.join(argv[:4])} ... failed ({process.returncode}):\n{output[-3000:]}")
    return {"seconds": time.monotonic() - began, "output": output, "max_rss": usage.ru_maxrss * 1024, **peaks}


def run(size_gb: float, args: argparse.Namespace) -> int:
    """One corpus of `size_gb` gigabytes: make it, prepare it, train on it, print the figures; returns the
    training run's peak RSS in bytes."""
    corpus, data, out = args.dir / "corpus.txt", args.dir / "data", args.dir / "run"
    shutil.rmtree(args.dir, ignore_errors=True)
    try:
        began = time.monotonic()
        size = make_corpus(corpus, size_gb)
        print(f"corpus     {corpus}: {size / 1e9:.3f} GB ({size / 1e6 / (time.monotonic() - began):.0f} MB/s to write)",
              flush=True)

        prep = measure([sys.executable, "-c", PREPARE, str(corpus), str(data)])
        figures = json.loads(prep["output"].strip().splitlines()[-1])
        every = max(1, args.steps // 3)
        train = measure([CHARGEN, "--backend", args.backend, "train", "--corpus", str(corpus), "--data", str(data),
                         "--out", str(out), "--max-steps", str(args.steps), "--eval-every", str(every),
                         "--eval-chars", str(args.eval_chars), "--sample-chars", str(args.sample_chars),
                         "--patience", "0", "--max-minutes", str(args.max_minutes)],
                        log=args.dir / "train.err")
        history = json.loads((out / "history.json").read_text())
        state = json.loads((out / "state.json").read_text())
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)

    mb = size / 1e6
    prep_rate = mb / prep["seconds"]
    gb = 1e9
    print(f"machine    {platform.machine()}, {os.cpu_count()} cores (shared with other work); "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    print(f"prepare    {prep['seconds']:.1f} s for {mb:,.0f} MB ({figures['chars']:,} characters, vocabulary "
          f"{figures['vocabulary']}): first pass {figures['scan_s']:.1f} s, token file {figures['write_s']:.1f} s, "
          f"the rest starting Python; {prep_rate:.0f} MB/s")
    print(f"           peak RSS {prep['max_rss'] / gb:.3f} GB (anonymous {prep['RssAnon'] / gb:.3f}, file-backed "
          f"{prep['RssFile'] / gb:.3f})")
    rates = [row["chars_per_second"] for row in history]
    whole = state["best"].get("whole_validation", {})
    print(f"train      {args.backend}, 2x256 LSTM: {history[-1]['step']} steps in {train['seconds']:.0f} s "
          f"(budget {args.max_minutes * 60:.0f} s), {min(rates):,}-{max(rates):,} chars/s over the stretches between "
          f"evaluations; validation sample {history[-1]['val_chars_scored']:,} characters, then the whole "
          f"validation text: {whole.get('chars_scored', 0):,} characters scored")
    index = [line for line in train["output"].splitlines() if "novelty:" in line]
    print(f"           samples of {args.sample_chars} characters after each evaluation"
          + (f"; {index[0][index[0].index('novelty:'):]}" if index else " (none: no novelty index)"))
    print(f"           peak RSS {train['max_rss'] / gb:.3f} GB (anonymous {train['RssAnon'] / gb:.3f}, file-backed "
          f"{train['RssFile'] / gb:.3f})")
    ok = lambda good: "met" if good else "NOT met"  # noqa: E731
    print(f"goals      peak RSS <= {GOAL_RSS_GB} GB: {ok(max(prep['max_rss'], train['max_rss']) <= GOAL_RSS_GB * gb)}; "
          f"preparation >= {GOAL_MB_PER_S:.0f} MB/s: {ok(prep_rate >= GOAL_MB_PER_S)}", flush=True)
    return train["max_rss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, nargs="+", default=[1.0],
                        help="corpus sizes in GB (10^9 bytes), one run each")
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--max-minutes", type=float, default=6.0, help="the training run's budget")
    parser.add_argument("--eval-chars", type=int, default=100_000,
                        help="validation characters scored at each evaluation")
    parser.add_argument("--sample-chars", type=int, default=200,
                        help="characters sampled after each evaluation with their novelty (chargen's default; 0: none)")
    parser.add_argument("--backend", default="jax", choices=["jax", "tensorflow"])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/chargen-corpus"))
    parser.add_argument("--keep", action="store_true", help="keep the last corpus and its run directory")
    args = parser.parse_args()
    if not SHAKESPEARE.exists():
        raise SystemExit(f"{SHAKESPEARE}: not found (the reference corpus lives in ../shared/corpora)")
    if any(gb <= 0 for gb in args.gb):
        raise SystemExit(f"--gb: corpus sizes must be positive, got {args.gb}")

    peaks = []
    for i, gb in enumerate(args.gb):
        if i:
            print()
        peaks.append(run(gb, args))
    if len(peaks) > 1:  # the goal is a peak that does not grow with the corpus
        print(f"\ntraining peak RSS by corpus size (samples of {args.sample_chars} characters): "
              + ", ".join(f"{gb * 1000:,.0f} MB: {peak / 1e9:.3f} GB" for gb, peak in zip(args.gb, peaks))
              + f"; the last minus the first: {(peaks[-1] - peaks[0]) / 1e6:+,.0f} MB")


if __name__ == "__main__":
    main()
