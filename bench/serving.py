"""What serving costs without the training stack: install size, time to healthy, worker memory.

    .venv/bin/python bench/serving.py [--artifact artifacts/default] [--starts 3] [--venv DIR] [--json]
                                      [--precision float32,int8]

1. A fresh virtual environment in a temporary directory, with the project installed into it as a
   user would (`pip install .`, no extras, not editable) from a copy of this working tree's
   sources, so nothing of this checkout's .venv (TensorFlow, Keras, onnx) can be imported. Its
   size on disk (`du`), the largest distributions in it, and how long the install took (pip
   fetches from the package index: network and its cache count). (`--venv DIR` reuses one made
   earlier.)
2. `chargen serve` from that environment, started --starts times on a free 127.0.0.1 port, run
   from an empty directory: the seconds from starting the command until /health first answers 200
   (every worker has loaded the model).
3. The resident memory (VmRSS, from /proc) of each worker, the children of the gunicorn master
   that `chargen serve` becomes, once healthy and again after one 500-character request.
2 and 3 are measured for each --precision (CHARGEN_PRECISION: the float32 graph model.onnx, the
int8 graph model.int8.onnx; issue 24), the starts taking turns so that both see the same machine;
/info must say that the graph asked for is the one served.

Goals (issue 11): the serving environment <= 350 MB, healthy <= 3 s, worker RSS <= 200 MB with the
default model loaded. Times depend on what else the machine is doing: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "chargen", "model", "service")  # what `pip install .` packages
GOALS = {"venv_mb": 350.0, "healthy_s": 3.0, "rss_mb": 200.0}
NOT_SERVED = ("tensorflow", "keras", "jax", "torch", "onnx")  # the training side's; a serving install has none
MB = 1e6

# Run by the fresh environment's Python: each installed distribution's size (its files' bytes) and
# whether any of NOT_SERVED can be imported.
INSPECT = """
import importlib.metadata as md, importlib.util, json, os, sys
sizes = {}
for dist in md.distributions():
    total = 0
    for f in dist.files or []:
        try:
            total += os.path.getsize(dist.locate_file(f))
        except OSError:
            pass
    sizes[dist.metadata["Name"]] = total
print(json.dumps({"sizes": sizes, "importable": [m for m in sys.argv[1:] if importlib.util.find_spec(m)]}))
"""


# ---------------------------------------------------------------- the environment


def make_venv(where: Path) -> float:
    """A venv at `where` with the project installed from a copy of the sources; returns seconds."""
    started = time.monotonic()
    src = where.parent / "src"
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, src / name)
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    pip = [str(where / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "-qq", str(src)], check=True)  # -qq: errors only
    shutil.rmtree(src)
    return time.monotonic() - started


def du_bytes(path: Path) -> int:
    """Disk usage in bytes (allocated blocks, as `du` counts them)."""
    out = subprocess.run(["du", "-s", "--block-size=1", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def inspect(venv: Path) -> dict:
    out = subprocess.run([str(venv / "bin" / "python"), "-c", INSPECT, *NOT_SERVED],
                         capture_output=True, text=True, check=True, cwd=venv)
    return json.loads(out.stdout)


# ---------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (gunicorn's workers), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()  # after "pid (comm)": state, ppid, ...
        except OSError:  # exited meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / MB
    raise RuntimeError(f"no VmRSS for process {pid}")


def start_once(venv: Path, artifact: Path, timeout: float, measure_rss: bool, precision: str = "auto") -> dict:
    """One `chargen serve` of the graph for `precision`: seconds until /health is 200, and the
    workers' RSS if asked."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHARGEN_", "PYTHON", "VIRTUAL_ENV"))}
    env.update({"CHARGEN_ARTIFACT": str(artifact), "CHARGEN_PRECISION": precision,
                "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"})
    run_dir = Path(tempfile.mkdtemp(prefix="chargen-serve-"))  # nothing importable in the working directory
    log = open(run_dir / "server.log", "wb")
    started = time.monotonic()
    process = subprocess.Popen([str(venv / "bin" / "chargen"), "serve", "--bind", f"127.0.0.1:{port}"], cwd=run_dir,
                               env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        healthy = None
        while time.monotonic() - started < timeout:
            if process.poll() is not None:
                raise RuntimeError(f"chargen serve exited with {process.returncode}:\n{(run_dir / 'server.log').read_text()[-3000:]}")
            if status(f"{base}/health") == 200:
                healthy = time.monotonic() - started
                break
            time.sleep(0.02)
        if healthy is None:
            raise RuntimeError(f"not healthy within {timeout} s:\n{(run_dir / 'server.log').read_text()[-3000:]}")
        result = {"healthy_s": healthy}
        with urllib.request.urlopen(f"{base}/info", timeout=30) as r:
            served = json.load(r)["model"].get("precision", "float32")
        if precision != "auto" and served != precision:
            raise RuntimeError(f"CHARGEN_PRECISION={precision}, but /info says the {served} graph serves")
        result["precision"] = served
        if measure_rss:
            workers = children(process.pid)
            result["master_rss_mb"] = rss_mb(process.pid)
            result["worker_rss_mb"] = [rss_mb(pid) for pid in workers]
            body = json.dumps({"prompt": "ROMEO:\n", "max_chars": 500, "temperature": 0.8, "seed": 1}).encode()
            request = urllib.request.Request(f"{base}/v1/generate", data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as r:
                assert r.status == 200 and len(json.load(r)["choices"][0]["text"]) == 500
            result["worker_rss_after_request_mb"] = [rss_mb(pid) for pid in workers]
        return result
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        log.close()
        shutil.rmtree(run_dir, ignore_errors=True)


# ---------------------------------------------------------------- the run


def verdict(value: float, goal: float) -> str:
    return "ok" if value <= goal else "OVER"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", default=str(ROOT / "artifacts" / "default"))
    parser.add_argument("--starts", type=int, default=3, help="how many times to start the server (time to healthy)")
    parser.add_argument("--venv", type=Path, default=None, help="an environment made by an earlier run (kept)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one start may take")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--precision", default="float32,int8",
                        help="CHARGEN_PRECISION values to start the server with, comma separated (default: %(default)s)")
    args = parser.parse_args()
    artifact = Path(args.artifact).resolve()
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    if not precisions or any(p not in ("auto", "float32", "int8") for p in precisions):
        parser.error(f"--precision: auto, float32 or int8, comma separated; got {args.precision!r}")

    tmp = None
    if args.venv:
        venv, install_s = args.venv.resolve(), None
    else:
        tmp = Path(tempfile.mkdtemp(prefix="chargen-bench-serving-"))
        venv = tmp / "venv"
        print(f"installing the project (no extras) into {venv} ...", file=sys.stderr, flush=True)
        install_s = make_venv(venv)
    try:
        size = du_bytes(venv) / MB
        found = inspect(venv)
        if found["importable"]:
            raise SystemExit(f"{venv}: the serving environment can import {', '.join(found['importable'])}")
        sizes = sorted(((n, b / MB) for n, b in found["sizes"].items()), key=lambda x: -x[1])
        starts = {p: [] for p in precisions}
        for i in range(args.starts):  # the precisions take turns
            for p in precisions:
                starts[p].append(start_once(venv, artifact, args.timeout, measure_rss=(i == 0), precision=p))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    result = {
        "venv_mb": round(size, 1), "install_s": install_s and round(install_s, 1),
        "largest_mb": {n: round(mb, 1) for n, mb in sizes[:12]},
        "artifact": str(artifact), "goals": GOALS, "precisions": {},
    }
    for p, runs in starts.items():
        first = runs[0]
        result["precisions"][p] = {
            "served": first["precision"],
            "healthy_s": [round(r["healthy_s"], 2) for r in runs],
            "master_rss_mb": round(first["master_rss_mb"], 1),
            "worker_rss_mb": [round(r, 1) for r in first["worker_rss_mb"]],
            "worker_rss_after_request_mb": [round(r, 1) for r in first["worker_rss_after_request_mb"]],
        }
    if args.json:
        print(json.dumps(result))
        return
    took = f"; install took {install_s:.0f} s" if install_s else ""
    print(f"serving environment  {size:6.1f} MB on disk   goal <= {GOALS['venv_mb']:.0f} MB  {verdict(size, GOALS['venv_mb'])}"
          f"   (none of {', '.join(NOT_SERVED)} importable{took})")
    print("  largest: " + ", ".join(f"{n} {mb:.1f}" for n, mb in sizes[:10]) + " (MB)")
    for p, r in result["precisions"].items():
        healthy = r["healthy_s"]
        median = sorted(healthy)[len(healthy) // 2]
        worker = max(r["worker_rss_after_request_mb"])
        print(f"CHARGEN_PRECISION={p} (the {r['served']} graph serves)")
        print(f"  healthy after      {median:6.2f} s (median)   goal <= {GOALS['healthy_s']:.0f} s     "
              f"{verdict(median, GOALS['healthy_s'])}   (starts: {', '.join(f'{h:.2f}' for h in healthy)} s)")
        print(f"  worker RSS         {worker:6.1f} MB           goal <= {GOALS['rss_mb']:.0f} MB  {verdict(worker, GOALS['rss_mb'])}"
              f"   (healthy: {', '.join(f'{x:.1f}' for x in r['worker_rss_mb'])} MB; after a 500-character request: "
              f"{', '.join(f'{x:.1f}' for x in r['worker_rss_after_request_mb'])} MB; master {r['master_rss_mb']:.1f} MB)")


if __name__ == "__main__":
    main()
