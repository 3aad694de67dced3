"""Keras 3 only: the same command trains on TensorFlow and on JAX, and an artifact made on one
backend loads on the other and gives the same logits."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import PERIODIC

from model.runtime import artifact
from model.training import artifacts
from model.training.evaluate import StreamScorer

ROOT = Path(__file__).resolve().parents[1]
CHARGEN = str(Path(sys.executable).with_name("chargen"))
HERE = keras.backend.backend()
OTHER = "jax" if HERE == "tensorflow" else "tensorflow"
TEXT = PERIODIC * 6

# Run under the other backend: logits and streamed loss of each artifact on TEXT.
SCORE = """
import json, sys
import keras, numpy as np
from model.runtime import artifact
from model.training import artifacts
from model.training.evaluate import StreamScorer
results = {"backend": keras.backend.backend()}
for name, path in json.loads(sys.argv[1]).items():
    loaded = artifacts.load_keras(path)
    ids = loaded.vocab.encode(sys.argv[2]).ids
    results[name] = {
        "logits": keras.ops.convert_to_numpy(loaded.model.predict_on_batch(ids[None, :])).tolist(),
        "nats": StreamScorer().loss(loaded.model, ids).nats,
    }
print(json.dumps(results))
"""


def test_model_code_uses_keras_only():
    """No backend-specific code in model/: Keras 3 layers and keras.ops only; except model/training/distribute.py,
    whose point is each backend's own distribution engine (MirroredStrategy, JAX's multi-process collectives)."""
    pattern = re.compile(r"^\s*(import|from)\s+(tensorflow|jax|torch)\b|\btf\.|\bjnp\.|\bjax\.", re.M)
    offenders = {}
    for path in sorted((ROOT / "model").rglob("*.py")):
        if path.name == "distribute.py":
            continue
        hits = [m.group(0).strip() for m in pattern.finditer(path.read_text())]
        if hits:
            offenders[path.name] = hits
    assert offenders == {}


def logits_and_loss(path: Path) -> tuple[np.ndarray, float]:
    loaded = artifacts.load_keras(path)
    ids = loaded.vocab.encode(TEXT).ids
    return keras.ops.convert_to_numpy(loaded.model.predict_on_batch(ids[None, :])), StreamScorer().loss(loaded.model, ids).nats


@pytest.fixture(scope="module")
def other_artifact(tmp_path_factory) -> Path:
    """A GRU trained by `chargen --backend OTHER train` in a subprocess."""
    tmp = tmp_path_factory.mktemp("other")
    (tmp / "periodic.txt").write_text(PERIODIC * 30)
    result = subprocess.run(
        [CHARGEN, "--backend", OTHER, "train", "--corpus", str(tmp / "periodic.txt"), "--out", str(tmp / "run"),
         "--cell", "gru", "--layers", "1", "--units", "32", "--embedding", "16", "--seq-len", "40",
         "--batch-size", "8", "--lr", "0.01", "--lr-decay", "1", "--epochs", "3", "--patience", "0"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"backend {OTHER}" in result.stdout
    return tmp / "run" / "best"


@pytest.mark.slow
def test_artifacts_cross_backends_with_the_same_logits(tiny_artifact, other_artifact):
    assert artifact.load(tiny_artifact).meta.versions.backend == HERE
    assert artifact.load(other_artifact).meta.versions.backend == OTHER

    paths = {"here": str(tiny_artifact), "other": str(other_artifact)}
    env = {**os.environ, "KERAS_BACKEND": OTHER, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, "-c", SCORE, json.dumps(paths), TEXT],
                            capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    there = json.loads(result.stdout.strip().splitlines()[-1])
    assert there["backend"] == OTHER

    for name, path in paths.items():  # made here and loaded there, made there and loaded here
        logits, nats = logits_and_loss(Path(path))
        assert logits.shape == (1, len(TEXT), 29)
        np.testing.assert_allclose(np.array(there[name]["logits"]), logits, atol=1e-4, rtol=0)
        assert there[name]["nats"] == pytest.approx(nats, abs=1e-4)
