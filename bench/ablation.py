"""The training recipe's ablation: the validation loss each recipe reaches on tinyshakespeare under
the same time budget, on this machine.

Every row is one `chargen train` run of a 2x256 network (embedding 64) for --minutes minutes of wall
time (its whole run: preparing, training, validating, saving), scored afterwards by `chargen
evaluate` on the validation split (the last 10%): carried state and windows of 256 from a fresh
state (nanoGPT's measure). Rows: today's recipe (the shipped model's: --dropout 0.2, Adam, the
learning rate times 0.95 per epoch), each new feature added to it alone, all of them together, and
all of them with --cell gru and --cell rnn.

Runs go under --out (default ~/chargen-runs/ablation; outside the repository): a row whose
result.json is there is not run again, so the script can be stopped at any moment and started
again to go on (a row run with another --minutes, --parallel, --backend or --corpus is run again);
an unfinished row starts over. The schedules that decay to the end of the run
(cosine, linear) are given --max-steps: the steps today's recipe made in the budget, read from its
row (it runs first), times 0.9 so that a slower recipe still reaches its schedule's end within the
budget, and times 100/256 for windows of 256 (a step of 64 windows of 256 costs about 2.5 times one
of 100). The gru and rnn rows have the LSTM's step count: their faster steps may end the run early. Compare only rows of one machine and budget, run one at a time on an idle
machine; the table says when rows were not.

    .venv/bin/python bench/ablation.py --minutes 30            # twelve rows: six hours
    .venv/bin/python bench/ablation.py --minutes 30 --parallel 2   # two at a time, one core each: three
    .venv/bin/python bench/ablation.py --minutes 30 --only base all
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "corpora" / "tinyshakespeare.txt"
CHARGEN = [str(Path(sys.executable).parent / "chargen")]  # the venv's command

NETWORK = ["--layers", "2", "--units", "256", "--embedding", "64", "--batch-size", "64"]
TODAY = ["--seq-len", "100", "--dropout", "0.2"]
ALL = ["--seq-len", "256", "--dropout", "0.25", "--locked", "--input-dropout", "0.1", "--output-dropout", "0.25", "--weight-drop", "0.25",
       "--weight-decay", "0.1", "--schedule", "cosine", "--warmup", "200", "--ema", "0.999"]
# name -> (what it is, the options beside NETWORK; "STEPS" is today's step count)
ROWS = {
    "base": ("today's recipe: windows of 100, --dropout 0.2, Adam, lr x0.95 per epoch", TODAY),
    "windows": ("+ windows of 256", TODAY[2:] + ["--seq-len", "256"]),
    "locked": ("+ locked (variational) dropout between layers", TODAY + ["--locked"]),
    "io-dropout": ("+ locked input and output dropout", TODAY + ["--locked", "--input-dropout", "0.1",
                                                                 "--output-dropout", "0.25"]),
    "weight-drop": ("+ weight drop 0.25 on the recurrent kernels", TODAY + ["--weight-drop", "0.25"]),
    "embedding-dropout": ("+ embedding dropout 0.05", TODAY + ["--embedding-dropout", "0.05"]),
    "adamw": ("+ AdamW, weight decay 0.1", TODAY + ["--weight-decay", "0.1"]),
    "cosine": ("+ warm-up 200 steps, cosine decay to 0.1 lr", TODAY + ["--schedule", "cosine", "--warmup", "200",
                                                                       "--max-steps", "STEPS"]),
    "ema": ("+ weight averaging, 0.999 per step", TODAY + ["--ema", "0.999"]),
    "all": ("all of them", ALL + ["--max-steps", "STEPS"]),
    "gru": ("all of them, --cell gru", ALL + ["--cell", "gru", "--max-steps", "STEPS"]),
    "rnn": ("all of them, --cell rnn", ALL + ["--cell", "rnn", "--max-steps", "STEPS"]),
}


def validation_text(corpus: Path, out: Path) -> Path:
    path = out / "validation.txt"
    if not path.exists():
        text = corpus.read_text(encoding="utf-8")
        path.write_text(text[int(len(text) * 0.9):], encoding="utf-8")
    return path


def run_row(name: str, args: argparse.Namespace, steps: int | None, core: int | None = None) -> dict:
    """One row's run and its scores; with `core`, the run is pinned to that core with one thread."""
    what, options = ROWS[name]
    if "STEPS" in options:
        if steps is None:
            raise SystemExit(f"row {name} needs today's step count: run the base row first")
        length = int(options[options.index("--seq-len") + 1]) if "--seq-len" in options else 100
        options = [str(max(1, steps * 90 // length)) if o == "STEPS" else o for o in options]
    run = args.out / name
    shutil.rmtree(run, ignore_errors=True)  # an unfinished row starts over
    command = [*CHARGEN, "--backend", args.backend, "train", "--corpus", str(args.corpus), "--out", str(run),
               *NETWORK, *options, "--epochs", "1000", "--patience", "0", "--max-minutes", str(args.minutes)]
    shown = " ".join(["chargen", *command[1:]])
    print(f"[{name}] {what}\n  {shown}", flush=True)
    began = time.monotonic()
    env, pin = dict(os.environ), []
    if core is not None:  # its evaluation too: it runs while other rows train
        pin = ["taskset", "-c", str(core)]
        env.update(XLA_FLAGS="--xla_cpu_multi_thread_eigen=false",
                   TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1", OMP_NUM_THREADS="1")
    command = [*pin, *command]
    with open(args.out / f"{name}.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    seconds = time.monotonic() - began
    scored = subprocess.run([*pin, *CHARGEN, "evaluate", "--artifact", str(run), "--text", str(validation_text(args.corpus, args.out)),
                             "--json"], check=True, capture_output=True, text=True, cwd=ROOT, env=env)
    scores = json.loads(scored.stdout)
    state = json.loads((run / "state.json").read_text())
    load = os.getloadavg()[0]
    result = {"row": name, "what": what, "options": options, "seconds": round(seconds), "steps": state["step"],
              "chars_trained": state["chars_trained"], "best_epoch": state["best"]["epoch"],
              "carried": scores["nats_per_char"], "window": scores["window"]["nats_per_char"],
              "load_after": round(load, 2), "budget": budget(args)}
    (run / "result.json").write_text(json.dumps(result, indent=1))
    print(f"  carried {result['carried']:.4f}, window {result['window']:.4f} nats/char; {result['steps']:,} steps; "
          f"load {load:.2f}", flush=True)
    return result


def budget(args: argparse.Namespace) -> dict:
    """What makes rows comparable: a saved row with another budget is run again."""
    return {"minutes": args.minutes, "parallel": args.parallel, "backend": args.backend, "corpus": str(args.corpus)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="wall-time budget of each row's run")
    parser.add_argument("--out", type=Path, default=Path.home() / "chargen-runs" / "ablation")
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--backend", default="jax")
    parser.add_argument("--parallel", type=int, default=1,
                        help="rows run at once, each pinned to its own core with one thread (the budget is then "
                             "per core); 1: one row at a time on every core")
    parser.add_argument("--only", nargs="+", choices=list(ROWS), help="these rows only (base runs first if needed)")
    args = parser.parse_args()
    if not args.corpus.exists():
        raise SystemExit(f"{args.corpus}: not found (the reference corpus; see corpora/)")
    args.out.mkdir(parents=True, exist_ok=True)
    wanted = args.only or list(ROWS)
    if any("STEPS" in ROWS[n][1] for n in wanted) and "base" not in wanted:
        wanted = ["base", *wanted]
    cores = sorted(os.sched_getaffinity(0))
    if not 1 <= args.parallel <= len(cores):
        raise SystemExit(f"--parallel must be between 1 and the {len(cores)} cores this process may use")
    results = {}
    for name in wanted:
        done = args.out / name / "result.json"
        if done.exists() and json.loads(done.read_text()).get("budget") == budget(args):
            results[name] = json.loads(done.read_text())
    # base first, the rows that need its step count last (they wait for it); the rest in between
    todo = sorted((n for n in wanted if n not in results), key=lambda n: (n != "base", "STEPS" in ROWS[n][1]))
    based = threading.Event()
    if "base" in results:
        based.set()
    lock = threading.Lock()
    free = cores[: args.parallel] if args.parallel > 1 else [None]

    def run(name: str) -> dict:
        if "STEPS" in ROWS[name][1]:
            based.wait()
        with lock:
            core = free.pop(0)
        try:
            result = run_row(name, args, results["base"]["steps"] if "base" in results else None, core)
            if name == "base":
                results["base"] = result
            return result
        finally:
            with lock:
                free.append(core)
            if name == "base":
                based.set()  # also when it failed: the rows waiting for it then fail at once

    with concurrent.futures.ThreadPoolExecutor(max(1, args.parallel)) as pool:
        futures = {name: pool.submit(run, name) for name in todo}
        for name, future in futures.items():
            results[name] = future.result()

    print(f"\n{args.minutes:g} minutes per run, 2x256 (embedding 64), batches of 64 windows; "
          f"validation: the last 10% of {args.corpus.name}\n")
    print("| recipe | carried | window 256 | steps | best at epoch | load after |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in wanted:
        r = results[name]
        print(f"| {r['what']} | {r['carried']:.4f} | {r['window']:.4f} | {r['steps']:,} | {r['best_epoch']} | "
              f"{r['load_after']} |")


if __name__ == "__main__":
    main()
