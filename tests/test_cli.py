"""The `chargen` command line as a whole: where it sits (above model/ and service/), mistakes that
need no model answered before Keras loads, a missing training stack or backend, and `chargen serve`
refusing a bad artifact or a port in use before gunicorn starts."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import PERIODIC
from server import free_port, running_server, server_env

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "artifacts" / "default"
CHARGEN = str(Path(sys.executable).with_name("chargen"))

# The command line in a fresh interpreter; afterwards, which heavy packages it had imported.
RUN = """
import sys
from chargen.cli import main
code = 0
try:
    main(sys.argv[1:], prog_name="chargen")
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("keras", "tensorflow", "jax", "torch") if sys.modules.get(m) is not None)
sys.stderr.write("heavy imports: " + ",".join(heavy) + "\\n")
sys.exit(code)
"""


def run_cli(*args: str, env: dict | None = None, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float, str]:
    """(result, seconds, heavy imports) of the command line run with `args` in a new process."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", RUN, *args], capture_output=True, text=True, timeout=timeout,
                            cwd=ROOT, env={**os.environ, **(env or {})})
    seconds = time.monotonic() - started
    heavy = re.search(r"heavy imports: (.*)\n", result.stderr)
    assert heavy, result.stderr
    result.stderr = result.stderr[: heavy.start()]
    return result, seconds, heavy.group(1)


# ---------------------------------------------------------------- layering


def test_the_command_line_sits_above_model_and_service():
    pattern = re.compile(r"^\s*(import|from)\s+(service|chargen)\b", re.M)
    for path in sorted((ROOT / "model").glob("*.py")):
        assert not pattern.search(path.read_text()), f"{path.name} imports service/ or the command line"
    for path in sorted((ROOT / "service").glob("*.py")):
        assert not re.search(r"^\s*(import|from)\s+chargen\b", path.read_text(), re.M), path.name
    assert not (ROOT / "model" / "cli.py").exists()


def test_python_dash_m_and_the_script_are_the_same_command():
    for command in ([sys.executable, "-m", "chargen", "--help"], [CHARGEN, "--help"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd="/")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("Usage: chargen ") and "serve" in result.stdout


# ---------------------------------------------------------------- mistakes that need no model


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    paths = {
        "text": tmp / "text.txt",
        "latin1": tmp / "latin1.txt",
        "nul": tmp / "image.png",
        "noise": tmp / "noise.bin",
        "empty_dir": tmp / "not-an-artifact",
        "broken": tmp / "broken-artifact",
    }
    paths["text"].write_text(PERIODIC * 10)
    paths["latin1"].write_bytes("Schöne Grüße aus Köln\n".encode("latin-1") * 20)
    paths["nul"].write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    paths["noise"].write_bytes(rng.integers(1, 256, 4000, dtype=np.uint8).tobytes())  # no NUL byte at all
    paths["empty_dir"].mkdir()
    paths["broken"].mkdir()
    for name in ("vocab.json", "meta.json"):
        (paths["broken"] / name).write_bytes((SHIPPED / name).read_bytes())
    (paths["broken"] / "model.keras").write_bytes(b"not a zip archive" * 10)
    return paths


CASES = [
    (["train", "--corpus", "{tmp}/absent.txt", "--out", "{tmp}/run"], "absent.txt: no such file"),
    (["train", "--corpus", "{nul}", "--out", "{tmp}/run"], "image.png: a binary file, not text"),
    (["train", "--corpus", "{noise}", "--out", "{tmp}/run"], "noise.bin: a binary file, not text"),
    (["train", "--corpus", "{latin1}", "--out", "{tmp}/run"], "latin1.txt: not UTF-8 text (byte 0xf6 at offset 3"),
    (["train", "--corpus", "{empty_dir}", "--out", "{tmp}/run"], "not-an-artifact: a directory with no non-empty files"),
    (["train", "--corpus", "{text}", "--out", "{tmp}/run", "--seq-len", "5000"], "--seq-len 5000 is longer"),
    (["evaluate", "--artifact", "{tmp}/nowhere", "--text", "{text}"], "nowhere: no such artifact directory"),
    (["evaluate", "--artifact", "{empty_dir}", "--text", "{text}"], "missing model.keras, vocab.json, meta.json"),
    (["evaluate", "--artifact", "{broken}", "--text", "{text}"], "model.keras: not a Keras archive"),
    (["evaluate", "--artifact", str(SHIPPED), "--text", "{nul}"], "image.png: a binary file, not text"),
    (["evaluate", "--artifact", str(SHIPPED), "--text", "{latin1}"], "not UTF-8 text"),
    (["export", "--artifact", "{tmp}/nowhere"], "nowhere: no such artifact directory"),
    (["export", "--artifact", "{empty_dir}"], "missing model.keras, vocab.json, meta.json"),
    (["export", "--artifact", "{broken}"], "model.keras: not a Keras archive"),
    (["sample", "--artifact", "{empty_dir}"], "missing model.onnx, vocab.json, meta.json"),
    (["sample", "--artifact", "{broken}"], "missing model.onnx, the ONNX graph of the network that serving runs"),
    (["sample", "--artifact", "{text}"], "text.txt: is a file; an artifact is a directory"),
    (["prepare", "{nul}"], "image.png: a binary file, not text"),
    (["serve", "--artifact", "{empty_dir}"], "missing model.onnx, vocab.json, meta.json"),
    (["serve", "--artifact", "{broken}"], "with: .venv/bin/chargen export --artifact "),
]


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a[:2]) + f" ({i})" for i, (a, _) in enumerate(CASES)])
def test_mistakes_are_reported_before_keras_loads(files, args, message):
    names = {name: str(path) for name, path in files.items()} | {"tmp": str(files["text"].parent)}
    result, seconds, heavy = run_cli(*(a.format(**names) for a in args))
    assert result.returncode in (1, 2), result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    if "binary" in message:
        assert "iconv" not in result.stderr
    if "UTF-8" in message:
        assert "iconv" in result.stderr
    assert heavy == "", f"imported {heavy} before reporting: {result.stderr}"
    assert seconds < 3, f"{seconds:.1f} s"  # about 0.5 s; generous for a loaded 2-core machine
    assert not (files["text"].parent / "run").exists()


# ---------------------------------------------------------------- a missing training stack or backend


def without(tmp_path, *packages: str) -> dict:
    """An environment whose Python cannot import `packages`, as if they were not installed."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\n" + "".join(f"sys.modules[{p!r}] = None\n" for p in packages))
    env = {"PYTHONPATH": str(shim)}
    for package in packages:
        check = subprocess.run([sys.executable, "-c", f"import {package}"], capture_output=True, text=True,
                               env={**os.environ, **env})
        assert "ModuleNotFoundError" in check.stderr  # the shim works
    return env


def test_a_serving_install_names_the_train_extra(tmp_path, files):
    """Without Keras (the base install serves; training is the `train` extra), the commands that
    run the Keras network say so in one line; those that serve do not need it."""
    env = without(tmp_path, "keras", "tensorflow")
    result, seconds, heavy = run_cli("train", "--corpus", str(files["text"]), "--out", str(tmp_path / "run"), env=env)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "Error: chargen train needs Keras and the tensorflow backend, which a serving install leaves out; "
        "install them with: pip install -e '.[train]'"]
    assert heavy == "" and not (tmp_path / "run").exists()
    for args in (["evaluate", "--artifact", str(SHIPPED), "--text", str(files["text"])], ["export", "--artifact", str(SHIPPED)]):
        result, _, _ = run_cli(*args, env=env)
        assert result.returncode == 1, result.stderr
        assert result.stderr.splitlines() == [
            f"Error: chargen {args[0]} needs Keras and the tensorflow backend, which a serving install leaves out; "
            "install them with: pip install -e '.[train]'"]
    result, _, _ = run_cli("--backend", "jax", "evaluate", "--artifact", str(SHIPPED), "--text", str(files["text"]), env=env)
    assert "install them with: pip install -e '.[jax]'" in result.stderr  # Keras on JAX is the jax extra
    # serve checks the artifact and the address without Keras (a port in use stops it before gunicorn)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result, _, heavy = run_cli("serve", "--bind", f"127.0.0.1:{taken.getsockname()[1]}", env=env)
    assert "is already in use" in result.stderr and "Keras" not in result.stderr and heavy == ""


def test_a_missing_backend_is_one_line_naming_the_extra(tmp_path, files):
    env = without(tmp_path, "jax")

    result, seconds, heavy = run_cli("--backend", "jax", "train", "--corpus", str(files["text"]), "--out",
                                     str(tmp_path / "run"), env=env)
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["Error: the jax backend is not installed; install it with: pip install -e '.[jax]'"]
    assert heavy == "" and not (tmp_path / "run").exists()
    # the same when the backend comes from the environment, for every command that loads Keras
    for args in (["export", "--artifact", str(SHIPPED)], ["evaluate", "--artifact", str(SHIPPED), "--text", str(files["text"])]):
        result, _, _ = run_cli(*args, env={**env, "KERAS_BACKEND": "jax"})
        assert result.returncode == 1 and "pip install -e '.[jax]'" in result.stderr and "Traceback" not in result.stderr
    result, _, _ = run_cli("prepare", str(files["text"]), env={**env, "KERAS_BACKEND": "jax"})
    assert result.returncode == 0, result.stderr  # prepare needs no backend


# ---------------------------------------------------------------- chargen serve


def serve(*args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run([CHARGEN, "serve", *args], capture_output=True, text=True, timeout=60, cwd=ROOT,
                            env=server_env(SHIPPED, env))
    return result, time.monotonic() - started


def test_serve_refuses_a_missing_artifact_before_gunicorn_starts():
    result, seconds = serve("--artifact", "nosuchdir", "--bind", f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert result.stderr.strip() == f"Error: {ROOT / 'nosuchdir'}: no such artifact directory"
    assert "Listening" not in output and "gunicorn" not in output.lower()
    assert seconds < 2, f"{seconds:.1f} s"


def test_serve_refuses_a_port_in_use_in_one_line():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result, seconds = serve("--bind", f"127.0.0.1:{port}")
        assert result.returncode == 1
        assert result.stderr.splitlines() == [
            f"Error: 127.0.0.1:{port} is already in use (another server listens there); choose another with --bind HOST:PORT"
        ]
        assert "Listening" not in result.stdout + result.stderr
        assert seconds < 2, f"{seconds:.1f} s"
        # the same for the address from CHARGEN_BIND
        result, _ = serve(env={"CHARGEN_BIND": f"127.0.0.1:{port}"})
        assert result.returncode == 1 and f"127.0.0.1:{port} is already in use" in result.stderr


def test_serve_still_serves_after_its_checks(tiny_artifact):
    with running_server(tiny_artifact) as server:
        r = server.post("/v1/generate", json={"prompt": "the quick ", "max_chars": 20, "temperature": 0}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == (PERIODIC * 2)[len("the quick "):][:20]
