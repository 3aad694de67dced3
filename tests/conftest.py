"""Shared fixtures: tiny models trained inside the test session on small synthetic text."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from model.records.vocab import Vocab

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "corpora" / "tinyshakespeare.txt"

# A deterministic periodic text: a model that learned it reproduces it exactly by greedy sampling.
PERIODIC = "the quick brown fox jumps over the lazy dog.\n"
OTHER = "pack my box with five dozen liquor jugs.\n"  # what a second model learns (other_artifact)


def words(n_chars: int, seed: int = 0) -> str:
    """Pseudo-text: random words from a small list, in lines."""
    rng = np.random.default_rng(seed)
    vocabulary = "the of and to a in that is was he for it with as his on be at by had".split()
    lines, size = [], 0
    while size < n_chars:
        line = " ".join(rng.choice(vocabulary, 8)) + "\n"
        lines.append(line)
        size += len(line)
    return "".join(lines)[:n_chars]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real gunicorn, Chromium, nginx, podman or schemathesis, or training "
                            "beyond a few seconds; `scripts/test -m 'not slow'` is the quick tier for the inner loop "
                            "and the whole suite (CI) runs them")
    config.addinivalue_line("markers", "images: builds and runs the container images with podman "
                            "(tests/test_images.py: minutes; `-m 'not images'` leaves them out)")


def train_tiny(out: Path, text: str, *, cell: str = "lstm", layers: int = 1, units: int = 32,
               epochs: int = 25, seq_len: int = 40, batch_size: int = 8, lr: float = 1e-2, **kw) -> Path:
    """Train a tiny model on `text` with the real training code; returns the best artifact's path."""
    from model.records.config import ModelConfig
    from model.training.train import TrainSettings, train

    corpus = out.parent / f"{out.name}-corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    settings = TrainSettings(
        corpus=str(corpus), out=str(out), config=ModelConfig(cell=cell, layers=layers, units=units, embedding=16),
        seq_len=seq_len, batch_size=batch_size, lr=lr, lr_decay=1.0, epochs=epochs, patience=0, **kw,
    )
    return train(settings, command="test", verbose=0)


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory) -> Path:
    """A 1x32 LSTM that has learned PERIODIC (greedy sampling reproduces it)."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    return train_tiny(out, PERIODIC * 60)


@pytest.fixture(scope="session")
def other_artifact(tmp_path_factory) -> Path:
    """A tiny model that has learned OTHER: greedy sampling after a newline gives OTHER."""
    return train_tiny(tmp_path_factory.mktemp("other") / "run", OTHER * 60)


def json_records(n_chars: int, seed: int = 0) -> str:
    """JSON-like text: one record per line as json.dumps writes it ({"name": "ann", "age": 31}), so a
    model trained on it has JSON's characters and the layout model.runtime.constraints writes."""
    rng = np.random.default_rng(seed)
    names = "ann bob cy dora eve finn gus hal ivy jo".split()
    lines, size = [], 0
    while size < n_chars:
        line = json.dumps({"name": str(rng.choice(names)), "age": int(rng.integers(1, 99))}) + "\n"
        lines.append(line)
        size += len(line)
    return "".join(lines)


@pytest.fixture(scope="session")
def json_artifact(tmp_path_factory) -> Path:
    """A tiny model trained on json_records (seconds of training: for slow tests)."""
    return train_tiny(tmp_path_factory.mktemp("json") / "run", json_records(3000))


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's: Playwright cannot download its own here), one per test module."""
    from browser import CHROMIUM, CHROMIUM_ARGS

    if not CHROMIUM.exists():
        pytest.skip(f"browser tests need Debian's chromium at {CHROMIUM} (apt-get install chromium; scripts/test does it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="browser tests need the playwright package (pip install -e '.[test]')")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def models_dir(tmp_path, tiny_artifact, other_artifact) -> Path:
    """A CHARGEN_MODELS directory of two models: `fox` (tiny_artifact) and `jugs` (other_artifact),
    as symlinks; a test may add more."""
    root = tmp_path / "models"
    root.mkdir()
    (root / "fox").symlink_to(tiny_artifact)
    (root / "jugs").symlink_to(other_artifact)
    return root


@pytest.fixture
def shakespeare() -> Path:
    if not SHAKESPEARE.exists():
        pytest.skip(f"reference corpus not found at {SHAKESPEARE} (it lives in ../shared/corpora beside the repo)")
    return SHAKESPEARE


# ---------------------------------------------------------------- a Flask app with its model loaded


@contextmanager
def loaded_app(artifact: Path, **config):
    """A Flask app (its test client through the `client` fixture) serving `artifact`, its model
    loaded; `config` takes Settings names without the CHARGEN_ prefix (MAX_N=4)."""
    from service.app import create_app

    app = create_app({"ARTIFACT": str(artifact), "TESTING": True, **config})
    scheduler = app.extensions["chargen"].scheduler
    assert scheduler.wait_ready(120), f"model did not load: {scheduler.failure}"
    try:
        yield app
    finally:
        scheduler.close()


@pytest.fixture
def client(app):
    """The test client of the test module's `app` fixture."""
    return app.test_client()


def events(response) -> list:
    """The JSON (or [DONE]) payloads of a server-sent-events body."""
    body = response.get_data(as_text=True)
    out = []
    for block in body.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            payload = block[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def assert_error(response, status: int, code: str, param=None):
    """`response` is the service's one error shape, with this status, code and param."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    error = response.get_json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code, error
    assert error["param"] == param, error
    assert error["message"]
    assert "Traceback" not in error["message"]
    return error


# ---------------------------------------------------------------- networks with random weights

VOCAB = Vocab("\n abcdefghijklmnopqrstuvw.,")  # random_artifact's


def random_network(cell: str, layers: int, vocab_size: int, units: int = 24, seed: int = 0):
    """A chargen network with random weights scaled so its predictions are peaked and its state
    matters (the exactness tests of the engine and of the ONNX graph compare on it)."""
    import keras

    from model.records.config import ModelConfig
    from model.training.network import build_model

    keras.utils.set_random_seed(seed + layers)
    model = build_model(ModelConfig(cell=cell, layers=layers, units=units, embedding=8), vocab_size)
    rng = np.random.default_rng(seed)
    for v in model.weights:
        w = keras.ops.convert_to_numpy(v)
        if v.path.endswith("recurrent_kernel"):
            pass  # orthogonal: strong memory, not chaotic
        elif v.path.endswith("embeddings"):
            w = rng.normal(0.0, 1.0, w.shape)
        elif v.path.endswith("bias"):
            w = rng.normal(0.0, 0.5, w.shape)
        elif v.path.startswith("logits"):
            w = w * (12.0 if cell == "lstm" else 6.0)  # peaked predictions
        else:
            w = w * 3.0  # input kernels: inputs drive the gates hard
        v.assign(w.astype("float32"))
    return model


def with_graph(model, path: Path, vocab: Vocab = VOCAB):
    """An artifact of the Keras `model` in directory `path`, holding its graph as model.onnx."""
    from model.runtime.artifact import Artifact
    from model.training.onnx_graph import build_graph

    path.mkdir(parents=True, exist_ok=True)
    (path / "model.onnx").write_bytes(build_graph(model).SerializeToString())
    return Artifact(path, model, vocab, {}, path / "model.onnx")


def random_artifact(cell: str, layers: int, path: Path, units: int = 24, seed: int = 0):
    """An artifact (in `path`) of random_network over VOCAB."""
    return with_graph(random_network(cell, layers, len(VOCAB), units, seed), path)
