"""Data-parallel training. On two virtual CPU devices (JAX's DataParallel over a DeviceMesh, and
TensorFlow's MirroredStrategy) and in two processes joined over loopback (JAX's CPU collectives), a
run follows the one-device run at the same global batch and seed, and its artifact loads and
samples like any other. The settings of several processes are checked before any work and passed
to keras.distribution.initialize().

Each run is a fresh `chargen train` process: the number of devices is fixed when a backend starts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import words

from chargen.cli import main
from model.runtime import artifact

CHARGEN = str(Path(sys.executable).with_name("chargen"))
STEPS, EVERY = 20, 2
ARGS = ["--layers", "1", "--units", "32", "--embedding", "16", "--seq-len", "50", "--batch-size", "16",
        "--lr", "0.005", "--max-steps", str(STEPS), "--eval-every", str(EVERY), "--eval-chars", "1000", "--patience", "0"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "words.txt"
    path.write_text(words(20_000))
    return path


def start(backend: str, corpus: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([CHARGEN, "--backend", backend, "train", "--corpus", str(corpus), "--out", str(out),
                             *ARGS, *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})})


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        process.kill()
    assert process.returncode == 0, output
    return output


def train(backend: str, corpus: Path, out: Path, *extra: str) -> str:
    return finish(start(backend, corpus, out, *extra))


def history(out: Path) -> list[dict]:
    return json.loads((out / "history.json").read_text())


def follows(one: Path, other: Path) -> None:
    """`other` had the losses of `one` at every evaluation, within 1e-3 relative, and ends with its weights."""
    a, b = history(one), history(other)
    assert [row["step"] for row in a] == [row["step"] for row in b] == list(range(EVERY, STEPS + 1, EVERY))
    for x, y in zip(a, b):
        for key in ("train_nats_per_char", "val_nats_per_char"):
            assert y[key] == pytest.approx(x[key], rel=1e-3), (x["step"], key)
    assert a[-1]["train_nats_per_char"] < a[0]["train_nats_per_char"] - 0.2  # it learned something
    import keras

    weights = [keras.saving.load_model(run / "checkpoint.keras", compile=False).get_weights() for run in (one, other)]
    for w, v in zip(*weights):
        np.testing.assert_allclose(v, w, rtol=1e-3, atol=1e-4)


def greedy_sample(run: Path) -> str:
    result = CliRunner().invoke(main, ["sample", "--artifact", str(run), "--prompt", "the ", "--temperature", "0",
                                       "--max-chars", "60", "--no-prompt"])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def jax_one_device(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("jax1") / "run"
    log = train("jax", corpus, out, "--devices", "1")
    assert "backend jax, on cpu:0" in log
    return out


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
def test_two_devices_follow_one_device(backend, jax_one_device, corpus, tmp_path):
    if backend == "jax":
        one = jax_one_device
    else:
        one = tmp_path / "one"
        train(backend, corpus, one)
    two = tmp_path / "two"
    log = train(backend, corpus, two, "--devices", "2")
    assert f"backend {backend}, data-parallel over 2 devices (cpu:0, cpu:1)" in log
    follows(one, two)
    loaded = artifact.load(two)  # the serving load: model.onnx, vocab.json, meta.json
    assert loaded.meta.validation.nats_per_char == pytest.approx(artifact.load(one).meta.validation.nats_per_char, rel=1e-3)
    text = greedy_sample(two)
    assert len(text) == 60 and text == greedy_sample(one)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_on_loopback_follow_one_process(jax_one_device, corpus, tmp_path):
    """Two processes of one CPU device each, joined through a coordinator on 127.0.0.1 (bound there
    only: JAX would listen on every interface by default) and JAX's gloo collectives; process 0
    writes the run directory, process 1 trains alongside it."""
    port = free_port()
    out = tmp_path / "run"
    env = {"JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}", "CHARGEN_COORDINATOR": f"127.0.0.1:{port}",
           "CHARGEN_NUM_PROCESSES": "2"}
    processes = [start("jax", corpus, out, env={**env, "CHARGEN_PROCESS_ID": str(i)}) for i in (1, 0)]
    try:
        second, first = (finish(p, timeout=300) for p in processes)
    finally:
        for p in processes:
            p.kill()
    assert "data-parallel over 2 devices" in first and "process 0 of 2" in first
    assert "process 1 of 2: process 0 writes" in second and "prepared" not in second
    follows(jax_one_device, out)
    assert greedy_sample(out) == greedy_sample(jax_one_device)
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


# ---------------------------------------------------------------- settings


def invoke(*args: str, env: dict | None = None):
    result = CliRunner().invoke(main, list(args), env=env)
    assert "Traceback" not in result.output, result.output
    return result


def test_cluster_settings_come_from_flags_or_the_environment(tmp_path, monkeypatch):
    import model.training.train

    seen = {}
    monkeypatch.setattr(model.training.train, "train", lambda settings, **kw: seen.update(kw))
    corpus = tmp_path / "c.txt"
    corpus.write_text(words(1000))
    base = ["train", "--corpus", str(corpus), "--out", str(tmp_path / "run")]
    assert invoke(*base, "--devices", "4", "--coordinator", "10.0.0.1:1234", "--num-processes", "2",
                  "--process-id", "1").exit_code == 0
    assert seen["cluster"].__dict__ == {"devices": 4, "coordinator": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}
    # a Kubernetes Indexed Job gives each pod its index; Keras' own variables work too
    env = {"KERAS_DISTRIBUTION_JOB_ADDRESSES": "trainer-0.trainer:1234", "KERAS_DISTRIBUTION_NUM_PROCESSES": "3",
           "JOB_COMPLETION_INDEX": "2"}
    assert invoke(*base, env=env).exit_code == 0
    assert seen["cluster"].__dict__ == {"devices": None, "coordinator": "trainer-0.trainer:1234", "num_processes": 3,
                                        "process_id": 2}
    assert invoke(*base, env={**env, "CHARGEN_PROCESS_ID": "0"}).exit_code == 0
    assert seen["cluster"].process_id == 0


@pytest.mark.parametrize("args, problem", [
    (["--num-processes", "2"], "--num-processes 2 needs --coordinator HOST:PORT"),
    (["--num-processes", "2", "--coordinator", "nohost"], "--coordinator nohost: expected HOST:PORT"),
    (["--num-processes", "2", "--coordinator", "h:99999"], "expected HOST:PORT"),
    (["--num-processes", "2", "--coordinator", "h:1", "--process-id", "2"], "--process-id must be in 0..1"),
    (["--process-id", "1"], "--process-id 1 without --num-processes"),
    (["--coordinator", "h:1"], "without --num-processes: one process has no one to coordinate"),
    (["--devices", "0"], "Invalid value for '--devices'"),
    (["--devices", "99999999999999999999"], "--devices must be a whole number from 1 to 1024"),
    (["--num-processes", "2", "--coordinator", "127.0.0.1:1"], "runs on the JAX backend only: add --backend jax"),
])
def test_bad_cluster_settings_are_refused_before_any_work(tmp_path, args, problem):
    corpus = tmp_path / "c.txt"
    corpus.write_text(words(1000))
    result = invoke("--backend", "tensorflow", "train", "--corpus", str(corpus), "--out", str(tmp_path / "run"), *args)
    assert result.exit_code != 0 and problem in result.output
    assert not (tmp_path / "run").exists()


def test_initialize_is_given_the_settings(monkeypatch):
    """On JAX, the coordinator, the number of processes and this one's id go to
    keras.distribution.initialize(), which hands them to jax.distributed.initialize()."""
    import keras

    from model.training.distribute import Cluster, place

    calls = []

    class Joined(Exception):
        pass

    def initialize(**kw):
        calls.append(kw)
        raise Joined

    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    monkeypatch.setattr(keras.distribution, "initialize", initialize)
    with pytest.raises(Joined):
        place(Cluster(coordinator="10.0.0.1:1234", num_processes=4, process_id=3), batch_size=64)
    assert calls == [{"job_addresses": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}]


def test_a_batch_that_does_not_split_over_the_devices(corpus, tmp_path):
    process = start("jax", corpus, tmp_path / "run", "--devices", "2", "--batch-size", "15")
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 1
    assert "--batch-size 15 does not split evenly over 2 devices; use a multiple of 2" in output
    assert not (tmp_path / "run").exists()


def test_the_kubernetes_training_job_is_valid_and_agrees_with_the_command_line():
    """deploy/training/train-job.yaml: valid for Kubernetes 1.33; one pod per process, pod 0 named
    as the coordinator, the settings in variables `chargen train` reads."""
    import kubernetes_validate
    import yaml

    path = Path(__file__).resolve().parents[1] / "deploy" / "training" / "train-job.yaml"
    docs = {d["kind"]: d for d in yaml.safe_load_all(path.read_text()) if d}
    assert set(docs) == {"PersistentVolumeClaim", "Service", "Job"}
    for doc in docs.values():
        kubernetes_validate.validate(doc, "1.33.0", strict=True)
    job, service = docs["Job"], docs["Service"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == int(env["CHARGEN_NUM_PROCESSES"])
    assert pod["subdomain"] == service["metadata"]["name"] == job["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    port = service["spec"]["ports"][0]["port"]
    assert env["CHARGEN_COORDINATOR"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}:{port}"
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]  # every pod sees the run
    # the command line takes these variables (and the Job's JOB_COMPLETION_INDEX as the process id)
    train = next(c for c in main.commands["train"].params if c.name == "coordinator")
    assert "CHARGEN_COORDINATOR" in train.envvar
    ids = next(c for c in main.commands["train"].params if c.name == "process_id")
    assert "JOB_COMPLETION_INDEX" in ids.envvar
