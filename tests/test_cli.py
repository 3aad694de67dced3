"""The `chargen` command line as a whole: mistakes that need no model answered before Keras loads,
a missing training stack or backend, and `chargen serve` refusing a bad artifact or a port in use
before gunicorn starts. (Where it sits, above model/ and service/, is tests/test_layout.py's.)"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import PERIODIC
from server import Server, free_port, server_env, stop

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "artifacts" / "default"
CHARGEN = str(Path(sys.executable).with_name("chargen"))

KERAS = ("keras", "tensorflow", "jax", "torch")  # what only train, evaluate and export may load
ONNX = ("onnx", "onnxruntime", "numpy")  # what reading an artifact for serving loads

# The command line in a fresh interpreter; afterwards, which of KERAS and ONNX it had imported.
RUN = """
import sys
from chargen.cli import main
code = 0
try:
    main(sys.argv[1:], prog_name="chargen")
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in %r if sys.modules.get(m) is not None)
sys.stderr.write("heavy imports: " + ",".join(heavy) + "\\n")
sys.exit(code)
""" % (KERAS + ONNX,)


def run_cli(*args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, str]:
    """(result, the Keras packages it had imported) of the command line run with `args` in a new process."""
    result, imported = _run(args, {**os.environ, **(env or {})})
    return result, ",".join(m for m in imported if m in KERAS)


def _run(args, env: dict) -> tuple[subprocess.CompletedProcess, list[str]]:
    """(result, which of KERAS and ONNX it had imported); the timeout only stops a hang."""
    result = subprocess.run([sys.executable, "-c", RUN, *args], capture_output=True, text=True, timeout=120,
                            cwd=ROOT, env=env)
    heavy = re.search(r"heavy imports: (.*)\n", result.stderr)
    assert heavy, result.stderr
    result.stderr = result.stderr[: heavy.start()]
    return result, [m for m in heavy.group(1).split(",") if m]


# ---------------------------------------------------------------- the command


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
    # (a free port: serve checks its address before the artifact, and 8000 may be taken on this machine)
    (["serve", "--port", "{port}", "--artifact", "{empty_dir}"], "missing model.onnx, vocab.json, meta.json"),
    (["serve", "--port", "{port}", "--artifact", "{broken}"], "with: .venv/bin/chargen export --artifact "),
]


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a[:2]) + f" ({i})" for i, (a, _) in enumerate(CASES)])
def test_mistakes_are_reported_before_keras_loads(files, args, message):
    names = {name: str(path) for name, path in files.items()} | {"tmp": str(files["text"].parent), "port": str(free_port())}
    result, heavy = run_cli(*(a.format(**names) for a in args))
    assert result.returncode in (1, 2), result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    if "binary" in message:
        assert "iconv" not in result.stderr
    if "UTF-8" in message:
        assert "iconv" in result.stderr
    assert heavy == "", f"imported {heavy} before reporting: {result.stderr}"
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
    result, heavy = run_cli("train", "--corpus", str(files["text"]), "--out", str(tmp_path / "run"), env=env)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "Error: chargen train needs Keras and the tensorflow backend, which a serving install leaves out; "
        "install them with: pip install -e '.[train]'"]
    assert heavy == "" and not (tmp_path / "run").exists()
    for args in (["evaluate", "--artifact", str(SHIPPED), "--text", str(files["text"])], ["export", "--artifact", str(SHIPPED)]):
        result, _ = run_cli(*args, env=env)
        assert result.returncode == 1, result.stderr
        assert result.stderr.splitlines() == [
            f"Error: chargen {args[0]} needs Keras and the tensorflow backend, which a serving install leaves out; "
            "install them with: pip install -e '.[train]'"]
    result, _ = run_cli("--backend", "jax", "evaluate", "--artifact", str(SHIPPED), "--text", str(files["text"]), env=env)
    assert "install them with: pip install -e '.[jax]'" in result.stderr  # Keras on JAX is the jax extra
    # serve checks the artifact and the address without Keras (a port in use stops it before gunicorn)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result, heavy = run_cli("serve", "--bind", f"127.0.0.1:{taken.getsockname()[1]}", env=env)
    assert "is already in use" in result.stderr and "Keras" not in result.stderr and heavy == ""


def test_a_missing_backend_is_one_line_naming_the_extra(tmp_path, files):
    env = without(tmp_path, "jax")

    result, heavy = run_cli("--backend", "jax", "train", "--corpus", str(files["text"]), "--out",
                            str(tmp_path / "run"), env=env)
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["Error: the jax backend is not installed; install it with: pip install -e '.[jax]'"]
    assert heavy == "" and not (tmp_path / "run").exists()
    # the same when the backend comes from the environment, for every command that loads Keras
    for args in (["export", "--artifact", str(SHIPPED)], ["evaluate", "--artifact", str(SHIPPED), "--text", str(files["text"])]):
        result, _ = run_cli(*args, env={**env, "KERAS_BACKEND": "jax"})
        assert result.returncode == 1 and "pip install -e '.[jax]'" in result.stderr and "Traceback" not in result.stderr
    result, _ = run_cli("prepare", str(files["text"]), env={**env, "KERAS_BACKEND": "jax"})
    assert result.returncode == 0, result.stderr  # prepare needs no backend


# ---------------------------------------------------------------- chargen serve


def serve(*args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`chargen serve ARGS` of the shipped model with no CHARGEN_* settings but `env`: (result,
    which of KERAS and ONNX it had imported)."""
    return _run(("serve", *args), server_env(SHIPPED, env))


def in_use(port: int) -> list[str]:
    return [f"Error: 127.0.0.1:{port} is already in use (another server listens there); "
            "choose another with --port PORT or --bind HOST:PORT"]


def test_serve_refuses_a_missing_artifact_before_gunicorn_starts():
    result, _ = serve("--artifact", "nosuchdir", "--bind", f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert result.stderr.strip() == f"Error: {ROOT / 'nosuchdir'}: no such artifact directory"
    assert "Listening" not in output and "gunicorn" not in output.lower()


def test_serve_refuses_a_port_in_use_in_one_line():
    """Before it reads the artifact (ONNX Runtime and numpy, which the artifact's check loads), from
    --bind, --port, --host or CHARGEN_BIND."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args, env in [(["--bind", f"127.0.0.1:{port}"], None),
                          ([], {"CHARGEN_BIND": f"127.0.0.1:{port}"}),
                          (["--port", str(port)], None),  # the default host
                          (["--port", str(port)], {"CHARGEN_BIND": "127.0.0.1:1"}),  # CHARGEN_BIND's host
                          (["--host", "127.0.0.1"], {"CHARGEN_BIND": f"0.0.0.0:{port}"}),  # CHARGEN_BIND's port
                          (["--host", "127.0.0.1", "--port", str(port)], {"CHARGEN_BIND": "0.0.0.0:1"})]:
            result, imported = serve(*args, env=env)
            assert result.returncode == 1, (args, env, result.stderr)
            assert result.stderr.splitlines() == in_use(port), (args, env)
            assert "Listening" not in result.stdout
            assert imported == [], f"{args} {env}: imported {imported} before checking the address"


@pytest.mark.parametrize("args, env, code, message", [
    (["--bind", "127.0.0.1:8001", "--port", "8002"], None, 2, "Error: give either --bind HOST:PORT or --host/--port, not both"),
    (["--bind", "127.0.0.1:8001", "--host", "0.0.0.0"], None, 2, "Error: give either --bind HOST:PORT or --host/--port, not both"),
    (["--port", "http"], None, 2, "Error: Invalid value for '--port': 'http' is not a valid integer"),
    (["--port", "65536"], None, 2, "Error: Invalid value for '--port': 65536 is not in the range 0<=x<=65535"),
    (["--port", "8001"], {"CHARGEN_BIND": "unix:/tmp/chargen.sock"}, 2,
     "Error: CHARGEN_BIND=unix:/tmp/chargen.sock has no host and port to complete --host/--port with; "
     "give both --host and --port, or --bind"),
    (["--host", "127.0.0.1"], {"CHARGEN_BIND": "127.0.0.1:http"}, 1,
     "Error: CHARGEN_BIND=127.0.0.1:http: not an address to listen on ('http' is not a valid port number.)"),
    ([], {"CHARGEN_BIND": "127.0.0.1:http"}, 1,
     "Error: CHARGEN_BIND=127.0.0.1:http: not an address to listen on ('http' is not a valid port number.)"),
    (["--bind", "127.0.0.1:http"], None, 1,
     "Error: --bind 127.0.0.1:http: not an address to listen on ('http' is not a valid port number.)"),
    # the host that does not resolve is CHARGEN_BIND's, not --port's (.invalid never resolves: RFC 6761)
    (["--port", "18651"], {"CHARGEN_BIND": "nosuchhost.invalid"}, 1,
     "Error: CHARGEN_BIND=nosuchhost.invalid (its host, with --port 18651): not an address to listen on ("),
])
def test_serve_names_what_is_wrong_with_the_address(args, env, code, message):
    result, _ = serve(*args, env=env)
    assert result.returncode == code, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert "Listening" not in result.stdout


@pytest.mark.parametrize("env, message", [
    ({"CHARGEN_MODELS": " "}, "Error: invalid configuration: CHARGEN_MODELS: names no model"),
    ({"CHARGEN_FRAME_ANCESTORS": "abc"}, "Error: invalid configuration: CHARGEN_FRAME_ANCESTORS: 'abc' is not an origin"),
    ({"CHARGEN_API_KEY": ""}, "Error: invalid configuration: CHARGEN_API_KEY: set but empty: unset it to serve without a key"),
    ({"CHARGEN_ARTIFACT": ""}, "Error: invalid configuration: CHARGEN_ARTIFACT: set but empty"),
    ({"CHARGEN_LOAD_DELAY": "inf"}, "Error: invalid configuration: CHARGEN_LOAD_DELAY: "),
    ({"CHARGEN_MODELS": "a=b"}, "Error: CHARGEN_MODELS entry a=b: b: no such artifact directory"),
])
def test_serve_refuses_a_bad_setting_before_gunicorn_starts(env, message):
    """In one line naming the variable, as the README promises: not a traceback, not a worker that
    fails to boot, not a server that quietly does something else."""
    result, _ = serve("--bind", f"127.0.0.1:{free_port()}", env=env)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(message) and len(result.stderr.splitlines()) == 1, result.stderr
    assert "Listening" not in result.stdout + result.stderr


@pytest.mark.slow  # real gunicorn
def test_serve_still_serves_after_its_checks(tiny_artifact, tmp_path):
    """On the address the checks passed: `--port` alone listens on 127.0.0.1."""
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen([CHARGEN, "serve", "--port", str(port)], cwd=ROOT, env=server_env(tiny_artifact),
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        server.wait_healthy()
        r = server.post("/v1/generate", json={"prompt": "the quick ", "max_chars": 20, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == (PERIODIC * 2)[len("the quick "):][:20]
    finally:
        stop(server)
