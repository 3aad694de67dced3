"""Training speed: characters per second of `chargen train` for the default network (a 2x256 LSTM)
and a larger one (3x512), by backend and number of devices, beside the share of the attainable rate.
Prints one table; see bench/README.md.

    .venv/bin/python bench/training.py                                   # both backends, 1 and 2 devices
    .venv/bin/python bench/training.py --backends jax --devices 1,8 --batch-size 512 --precision mixed_bfloat16

Each configuration is a fresh process (the number of devices is fixed when a backend starts) that
runs the real training code, model/training/train.py, on tinyshakespeare's token file: 2 x --steps steps
with an evaluation after each --steps. The first stretch includes compiling; the rate is the second
one's (history.json's chars_per_second: training characters over the wall time of its fit(),
loading the batches from the memory map included).

The attainable rate: training a character costs about three times the forward pass's matrix
products (the backward pass twice as much as the forward), counted from the shapes: per layer
2 x (inputs + units) x gates x units (gates: 4 LSTM, 3 GRU, 1 RNN; the first layer's inputs are the
embedding), and 2 x units x vocabulary for the output layer. It is set against the rate of a large
matrix product measured in the same run: on a CPU numpy's float32 2048 x 2048 product on all
cores, best of 10 at the start and at the end (virtual CPU devices share those cores, so the rate
is not multiplied by them); on accelerators the backend's 4096 x 4096 product in the compute
precision on one device, in each configuration's process, times the number of devices.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpora" / "tinyshakespeare.txt"
MODELS = {"2x256": (2, 256), "3x512": (3, 512)}
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def flops_per_char(cell: str, layers: int, units: int, embedding: int, vocab: int) -> float:
    """Training FLOPs of one character: three times the forward pass's matrix products."""
    forward, inputs = 0, embedding
    for _ in range(layers):
        forward += 2 * (inputs + units) * GATES[cell] * units
        inputs = units
    forward += 2 * units * vocab
    return 3.0 * forward


def worker(spec: dict) -> dict:
    """One configuration, in this (fresh) process: train, then time a large matrix product."""
    sys.path.insert(0, str(ROOT))
    from model.training.distribute import Cluster
    from model.records.config import ModelConfig
    from model.training.train import TrainSettings, train

    layers, units = MODELS[spec["model"]]
    with tempfile.TemporaryDirectory(prefix="chargen-bench-") as tmp:
        settings = TrainSettings(
            corpus=[spec["corpus"]], out=f"{tmp}/run", data=spec["data"], config=ModelConfig(layers=layers, units=units),
            seq_len=spec["seq_len"], batch_size=spec["batch_size"], max_steps=2 * spec["steps"],
            eval_every=spec["steps"], eval_chars=600, patience=0, precision=spec["precision"],
        )
        stdout, sys.stdout = sys.stdout, sys.stderr  # the run's log goes to stderr; the result alone to stdout
        try:
            train(settings, cluster=Cluster(devices=spec["devices"]), command="bench/training.py", verbose=0)
        finally:
            sys.stdout = stdout
        history = json.loads(Path(f"{tmp}/run/history.json").read_text())
        vocab = len(json.loads(Path(f"{tmp}/run/best/vocab.json").read_text())["chars"])

    import keras

    kind = keras.distribution.list_devices()[0].split(":")[0]
    product = None
    if kind != "cpu":
        dtype = {"float32": "float32", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}[spec["precision"]]
        a = keras.random.normal((4096, 4096), dtype=dtype)
        best = float("inf")
        for _ in range(10):
            began = time.perf_counter()
            keras.ops.convert_to_numpy(keras.ops.matmul(a, a)[0, 0])  # waits for the product
            best = min(best, time.perf_counter() - began)
        product = 2 * 4096**3 / best
    return {"rate": history[-1]["chars_per_second"], "kind": kind, "product": product,
            "flops_per_char": flops_per_char("lstm", layers, units, 64, vocab)}


def cpu_product(n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of numpy's float32 n x n product on all cores, best of `repeats`."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - began)
    return 2 * n**3 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="tensorflow,jax")
    parser.add_argument("--models", default="2x256,3x512", help=f"of {', '.join(MODELS)}")
    parser.add_argument("--devices", default="1,2", help="device counts (without accelerators: virtual CPU devices)")
    parser.add_argument("--steps", type=int, default=10, help="steps timed (after as many to compile and warm up)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=100)
    parser.add_argument("--precision", default="float32", choices=["float32", "mixed_bfloat16", "mixed_float16"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if not CORPUS.exists():
        raise SystemExit(f"{CORPUS}: not found (the reference corpus lives in ../shared/corpora)")

    import numpy as np

    product = cpu_product()
    print(f"machine    {platform.machine()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at the start; "
          f"numpy {np.__version__}; batches of {args.batch_size} windows of {args.seq_len}, {args.precision}; "
          f"{args.steps} steps timed")
    rows = []
    with tempfile.TemporaryDirectory(prefix="chargen-bench-data-") as data:
        for model in args.models.split(","):
            for backend in args.backends.split(","):
                for devices in (int(d) for d in args.devices.split(",")):
                    spec = {"model": model, "devices": devices, "steps": args.steps, "batch_size": args.batch_size,
                            "seq_len": args.seq_len, "precision": args.precision, "corpus": str(CORPUS), "data": data}
                    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                                          text=True, env={**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"})
                    if done.returncode:
                        rows.append((model, backend, devices, None, done.stderr.strip().splitlines()[-1]))
                    else:
                        rows.append((model, backend, devices, json.loads(done.stdout.strip().splitlines()[-1]), None))
    product = max(product, cpu_product())
    print(f"cpu        numpy's float32 2048 x 2048 product: {product / 1e9:.0f} GFLOP/s (best of 10, at the start and the end)")
    print(f"\n  {'network':8} {'backend':11} {'devices':>7} {'chars/s':>10} {'MFLOP/char':>11} {'of attainable':>14}")
    for model, backend, devices, r, failure in rows:
        if r is None:
            print(f"  {model:8} {backend:11} {devices:>7}   failed: {failure}")
            continue
        attainable = product if r["kind"] == "cpu" else r["product"] * devices
        where = "" if r["kind"] == "cpu" else f"   ({r['kind']}: {r['product'] / 1e12:.1f} TFLOP/s per device)"
        print(f"  {model:8} {backend:11} {devices:>7} {r['rate']:>10,} {r['flops_per_char'] / 1e6:>11.2f} "
              f"{r['rate'] * r['flops_per_char'] / attainable:>13.1%}{where}")


if __name__ == "__main__":
    main()
