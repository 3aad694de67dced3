"""What each additional model costs a worker: its resident memory with 1, 2, 3 ... models.

    .venv/bin/python bench/models.py [--artifact artifacts/default] [--models 1,2,3] [--starts 2] [--json]

For each count N: a temporary CHARGEN_MODELS directory holding N symlinks (m1 ... mN) to the same
artifact, so every model is the same size and only the count changes; the master copies each into
its snapshot directory as it does for distinct models (service/lifecycle.py), so the workers load N
separate files and share nothing but the code. gunicorn with the project's config (what
`chargen serve` runs) and one worker on a free 127.0.0.1 port, in the default configuration (this
shell's CHARGEN_* variables are not passed on); once /health is 200, the worker's VmRSS (from /proc),
then again after one 500-character request to each model (each engine's first real batch). The
cost of a model is the slope of a least-squares line through (N, RSS); --starts repeats every
count and keeps the smallest RSS of each (what other processes on the machine do can only add).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serving import children, free_port, rss_mb, status  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 300


def measure(artifact: Path, count: int) -> dict:
    """One server with `count` copies of `artifact`: its worker's RSS idle and after a request per model."""
    with tempfile.TemporaryDirectory(prefix="chargen-bench-models-") as tmp:
        models = Path(tmp) / "models"
        models.mkdir()
        for i in range(1, count + 1):
            (models / f"m{i}").symlink_to(artifact)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHARGEN_") and k != "PROMETHEUS_MULTIPROC_DIR"}
        env.update({"CHARGEN_MODELS": str(models), "CHARGEN_BIND": f"127.0.0.1:{port}", "CHARGEN_WORKERS": "1"})
        log_path = Path(tmp) / "server.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "python:service.gunicorn_conf"], cwd=ROOT,
                                       env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while status(url + "/health") != 200:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server with {count} models did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.1)
            (worker,) = children(process.pid)
            idle = rss_mb(worker)
            for i in range(1, count + 1):
                body = json.dumps({"prompt": "ROMEO:\n", "max_chars": 500, "temperature": 0.8, "seed": i, "model": f"m{i}"})
                request = urllib.request.Request(url + "/v1/generate", data=body.encode(),
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=60) as r:
                    answer = json.load(r)
                assert answer["model"] == f"m{i}" and len(answer["choices"][0]["text"]) == 500, answer
            return {"models": count, "idle_mb": idle, "after_requests_mb": rss_mb(worker), "master_mb": rss_mb(process.pid)}
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


def slope(points: list[tuple[int, float]]) -> float | None:
    """The least-squares slope of (x, y) points (MB per model)."""
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", default=str(ROOT / "artifacts" / "default"))
    parser.add_argument("--models", default="1,2,3", help="model counts, comma separated")
    parser.add_argument("--starts", type=int, default=2, help="servers started per count (the smallest RSS is kept)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    artifact = Path(args.artifact).resolve()
    if not (artifact / "meta.json").is_file():
        raise SystemExit(f"{artifact}: not an artifact directory")
    counts = [int(c) for c in args.models.split(",")]

    rows = []
    for count in counts:
        runs = [measure(artifact, count) for _ in range(args.starts)]
        rows.append({"models": count, **{k: min(r[k] for r in runs) for k in ("idle_mb", "after_requests_mb", "master_mb")}})
    per_model = {k: slope([(r["models"], r[k]) for r in rows]) for k in ("idle_mb", "after_requests_mb")}
    if args.json:
        print(json.dumps({"artifact": str(artifact), "rows": rows, "per_model_mb": per_model}))
        return
    size = sum(f.stat().st_size for f in artifact.iterdir() if f.name == "model.onnx") / 1e6
    print(f"artifact {artifact} (model.onnx {size:.1f} MB); one worker; smallest of {args.starts} starts per row; "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print()
    print("| models | worker RSS idle MB | after a request per model MB | master RSS MB |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['models']} | {r['idle_mb']:.1f} | {r['after_requests_mb']:.1f} | {r['master_mb']:.1f} |")
    print()
    print("each additional model: " + ", ".join(
        f"{'idle' if k == 'idle_mb' else 'after requests'} {v:+.1f} MB" for k, v in per_model.items() if v is not None))


if __name__ == "__main__":
    main()
