"""Serving without the training stack: the base install (no Keras, no TensorFlow, no onnx) serves a
model, its graph checked against meta.json by ONNX Runtime alone.

Each test hides Keras, TensorFlow, JAX and onnx from Python (a sitecustomize that makes importing
them fail, as in a serving install, which has none of them), then serves: an import of any of them
anywhere on the serving path, at start or at run time, fails the test instead of passing silently on
this machine where they are installed. (bench/serving.py measures a real serving-only virtual
environment.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PERIODIC
from server import ROOT, running_server, server_env

NOT_INSTALLED = ("keras", "tensorflow", "jax", "onnx")  # in a serving install (pyproject.toml's base dependencies)


def without_training_stack(tmp_path: Path) -> dict:
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{m!r}] = None  # as in a serving install\n" for m in NOT_INSTALLED))
    # the caller's PYTHONPATH after the shim: a checkout run with itself on it is the code served
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH", "")) if p)}


def test_the_app_and_engine_load_and_generate_without_keras_or_onnx(tiny_artifact, tmp_path):
    code = (
        "import sys\n"
        "from service.app import create_app\n"
        f"app = create_app({{'ARTIFACT': {str(tiny_artifact)!r}}})\n"
        "scheduler = app.extensions['chargen'].scheduler\n"
        "app.extensions['chargen'].start()\n"
        "assert scheduler.wait_ready(120), scheduler.failure\n"
        "r = app.test_client().post('/v1/generate', json={'prompt': 'the quick ', 'max_chars': 30, 'temperature': 0})\n"
        "assert r.status_code == 200, r.get_data(as_text=True)\n"
        "print(repr(r.get_json()['choices'][0]['text']), scheduler.artifact.model, scheduler.artifact.onnx_path.name)\n"
        f"print(sorted(m for m in {NOT_INSTALLED!r} if sys.modules.get(m) is not None))\n"
        "scheduler.close()\n"
    )
    env = server_env(tiny_artifact, without_training_stack(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    text, imported = done.stdout.strip().splitlines()[-2:]
    assert text == f"{(PERIODIC * 2)[len('the quick '):][:30]!r} None model.onnx"
    assert imported == "[]"


@pytest.mark.slow  # real gunicorn
def test_chargen_serve_serves_without_keras_or_onnx(tiny_artifact, tmp_path):
    """The real server (`chargen serve`: its check of the artifact, gunicorn and its worker) with the
    training stack and onnx hidden; no TensorFlow, JAX or onnx library is mapped into the worker."""
    with running_server(tiny_artifact, env=without_training_stack(tmp_path)) as server:
        r = server.post("/v1/generate", json={"prompt": "the quick ", "max_chars": 20, "temperature": 0}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == (PERIODIC * 2)[len("the quick "):][:20]
        for pid in server.worker_pids():
            maps = Path(f"/proc/{pid}/maps").read_text()
            assert "tensorflow" not in maps and "jaxlib" not in maps, f"worker {pid} mapped the training stack"
            assert "/onnx/" not in maps, f"worker {pid} mapped onnx"
            assert "onnxruntime" in maps  # what it runs instead
