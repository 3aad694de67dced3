"""The images, built and run for real (issue 12, section 5), with podman and no registry.

tests/podman.py makes a stand-in for python:3.11-slim (Debian bookworm by mmdebstrap, cached) and
runs `podman build --from <it>` over the unchanged Dockerfile for the `api` and `train` targets.
Then: the api container serves (healthy, generates, runs as its user with compose's read-only root
filesystem, keeps the image's HEALTHCHECK, drains and exits 0 on SIGTERM), carries no TensorFlow
and is small; the train image trains a tiny model into a volume with compose's `train` command and
the api image serves it from there, read-only; Debian's nginx on loopback (deploy/nginx's
configuration, rendered by tests/balancer.py) serves two api containers through one port.

Slow (about three minutes here: half a minute to build the api image, two for the train image, a
minute more on the first run for the base), so marked `images`: `pytest -m 'not images'` leaves it
out. Skipped, saying why,
when not root or podman, mmdebstrap or uidmap is missing (scripts/test installs them as root).
The figures of a run are written to $TMPDIR/chargen-images.json (bench/README.md, "Images").
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import requests

import podman
from balancer import nginx_binary, running_nginx
from conftest import PERIODIC
from dockerfile import COMPOSE, env_of, healthcheck_command, stage
from server import REQUEST_TIMEOUT

pytestmark = [pytest.mark.images, pytest.mark.slow]

RUN_ID = uuid.uuid4().hex[:8]  # each run its own tags: runs at once do not replace each other's images
API_TAG = f"localhost/chargen-test-api:{RUN_ID}"
TRAIN_TAG = f"localhost/chargen-test-train:{RUN_ID}"
MAX_API_MB = 500
COMPOSE_API = ("--read-only", "--tmpfs", "/tmp")  # docker-compose.yml's `read_only: true` and `tmpfs: [/tmp]`
FIGURES = Path(tempfile.gettempdir()) / "chargen-images.json"


@pytest.fixture(scope="module")
def figures():
    """What this run measured, written to FIGURES at the end."""
    found: dict = {"date": time.strftime("%Y-%m-%d")}
    yield found
    if len(found) > 1:
        FIGURES.write_text(json.dumps(found, indent=2) + "\n")


@pytest.fixture(scope="module")
def tools(figures):
    reason = podman.unavailable()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    base = podman.base_image()  # made once, then cached
    figures["base"] = {"seconds": round(time.monotonic() - started, 1), "size_mb": round(podman.image_size(base) / 1e6)}


def built(target: str, tag: str, figures: dict, timeout: float):
    """The image of `target`, removed after the module: builds keep no cache layers, so a later
    run gains nothing from it (`python tests/podman.py` builds images to keep)."""
    image = podman.build(target, tag, timeout=timeout)
    figures[target] = {"build_seconds": round(image.build_seconds, 1), "size_mb": round(image.size_bytes / 1e6)}
    try:
        yield image
    finally:
        podman.podman("rmi", "--force", tag, timeout=300, check=False)


@pytest.fixture(scope="module")
def api_image(tools, figures) -> podman.Image:
    yield from built("api", API_TAG, figures, timeout=1200)


@pytest.fixture(scope="module")
def train_image(tools, figures) -> podman.Image:
    yield from built("train", TRAIN_TAG, figures, timeout=1800)


def generate(url: str, **fields) -> requests.Response:
    return requests.post(url + "/v1/generate", json={"prompt": "the", "max_chars": 40, "temperature": 0, **fields},
                         timeout=REQUEST_TIMEOUT)


def in_image(image: str, *command: str) -> subprocess.CompletedProcess:
    """`command` in a throwaway container of `image` (its entrypoint replaced)."""
    return podman.podman("run", "--rm", "--no-healthcheck", "--entrypoint", command[0], image, *command[1:],
                         timeout=300, check=False)


def process_uid(container: podman.Container, pid: int) -> int:
    status = container.exec("cat", f"/proc/{pid}/status")
    assert status.returncode == 0, status.stderr
    return int(next(line.split()[1] for line in status.stdout.splitlines() if line.startswith("Uid:")))


# ---------------------------------------------------------------- the api image


def test_the_api_image_keeps_the_dockerfiles_user_port_command_and_healthcheck(api_image):
    dockerfile = stage("api")
    config = podman.inspect_image(api_image.tag)
    assert config["Config"]["User"] == "chargen"
    assert config["Config"]["Cmd"] == ["chargen", "serve"]
    assert "8000/tcp" in config["Config"]["ExposedPorts"]
    assert f"CHARGEN_BIND={env_of(dockerfile)['CHARGEN_BIND']}" in config["Config"]["Env"]
    # --format docker keeps HEALTHCHECK (an OCI image config has no place for it)
    check = config.get("Healthcheck") or {}
    assert check.get("Test") == ["CMD", *healthcheck_command(dockerfile)], check
    seconds = 1_000_000_000
    assert (check["Interval"], check["Timeout"], check["StartPeriod"], check["Retries"]) == (15 * seconds, 5 * seconds,
                                                                                            120 * seconds, 3)


def test_the_api_image_carries_no_training_stack(api_image):
    imported = in_image(api_image.tag, "python", "-c", "import tensorflow")
    assert imported.returncode != 0 and "No module named 'tensorflow'" in imported.stderr, imported.stderr
    found = in_image(api_image.tag, "python", "-c", "import importlib.util as u; "
                     "print(*[m for m in ('tensorflow', 'keras', 'jax', 'torch') if u.find_spec(m)])")
    assert found.returncode == 0 and found.stdout.strip() == "", found.stdout + found.stderr


def test_the_api_image_is_at_most_500_mb(api_image):
    size_mb = api_image.size_bytes / 1e6
    if size_mb > MAX_API_MB:
        largest = in_image(api_image.tag, "sh", "-c",
                           "du -sm /opt/chargen/lib/python3*/site-packages/* /usr /app | sort -rn | head -8")
        pytest.fail(f"the api image is {size_mb:,.0f} MB, over the goal of {MAX_API_MB} MB; its largest parts (MB):\n"
                    f"{largest.stdout}")


def test_the_api_container_serves_as_its_user_and_drains_on_sigterm(api_image, figures):
    with podman.running(api_image.tag, *COMPOSE_API) as container:
        # how soon is recorded, not asserted (bench/README.md, "Images"); wait_healthy's timeout stops a hang
        figures["api"]["seconds_to_healthy"] = round(podman.wait_healthy(container), 2)

        r = generate(container.url)
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"][0]["text"]) == 40
        assert requests.get(container.url + "/", timeout=REQUEST_TIMEOUT).status_code == 200

        # gunicorn's master is the container's process 1 (`chargen serve` execs into it); the worker
        # that answered /health is another: both run as the image's user, not root
        worker = requests.get(container.url + "/health", timeout=REQUEST_TIMEOUT).json()["pid"]
        assert process_uid(container, 1) == process_uid(container, worker) == 10001
        assert container.exec("id", "-un").stdout.strip() == "chargen"

        health = podman.podman("healthcheck", "run", container.id, timeout=60, check=False)
        assert health.returncode == 0, health.stdout + health.stderr

        # `docker compose stop` and Kubernetes send SIGTERM: gunicorn drains and exits 0
        podman.podman("stop", "--time", "40", container.id, timeout=60)
        state = container.state()
        assert not state["Running"] and state["ExitCode"] == 0, container.logs()[-3000:]
        assert "Shutting down: Master" in container.logs()


# ---------------------------------------------------------------- the train image, then the api image serving its model


def compose_train_command() -> list[str]:
    """docker-compose.yml's `train` command as compose runs it (`$$` is a literal `$`)."""
    import yaml  # PyYAML, which schemathesis of the test extra brings

    command = yaml.safe_load(COMPOSE.read_text())["services"]["train"]["command"]
    return [part.replace("$$", "$") for part in command]


def test_the_train_image_trains_into_a_volume_that_the_api_image_serves(train_image, api_image, tmp_path, figures):
    corpora = tmp_path / "corpora"
    corpora.mkdir()
    (corpora / "tiny.txt").write_text(PERIODIC * 60)
    corpora.chmod(0o755)  # read by the image's user, not root
    (corpora / "tiny.txt").chmod(0o644)
    settings = {"CORPUS": "/corpora/tiny.txt", "RUN": "tiny", "KERAS_BACKEND": "tensorflow",
                "TRAIN_ARGS": "--epochs 1 --units 16 --layers 1 --embedding 8 --seq-len 20 --batch-size 16"}
    environment = [arg for name, value in settings.items() for arg in ("--env", f"{name}={value}")]
    with podman.volume() as models:
        started = time.monotonic()
        trained = podman.podman("run", "--rm", "--no-healthcheck", *environment, "--volume", f"{models}:/models",
                                "--volume", f"{corpora}:/corpora:ro", "--workdir", "/models", train_image.tag,
                                *compose_train_command(), timeout=600, check=False)
        figures["train"]["tiny_run_seconds"] = round(time.monotonic() - started, 1)
        log = trained.stdout + trained.stderr
        assert trained.returncode == 0, log[-4000:]
        assert "backend tensorflow" in log and "artifact /models/tiny/best" in log, log[-4000:]

        # compose's `MODEL=/models/tiny docker compose up`: the volume read-only, the run directory as the model
        with podman.running(api_image.tag, *COMPOSE_API, "--volume", f"{models}:/models:ro",
                            env={"CHARGEN_ARTIFACT": "/models/tiny"}) as container:
            podman.wait_healthy(container)
            info = requests.get(container.url + "/info", timeout=REQUEST_TIMEOUT).json()["model"]
            assert (info["corpus"]["name"], info["layers"], info["units"]) == ("tiny.txt", 1, 16), info
            r = generate(container.url)
            assert r.status_code == 200 and len(r.json()["choices"][0]["text"]) == 40, r.text


# ---------------------------------------------------------------- nginx in front of two api containers


def chars_generated(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(url + "/metrics", timeout=REQUEST_TIMEOUT).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "chargen_chars_generated_total")


@pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed: apt-get install nginx "
                    "(scripts/test installs it when run as root)")
def test_nginx_serves_two_api_containers_through_one_port(api_image):
    with podman.running(api_image.tag, *COMPOSE_API) as first, podman.running(api_image.tag, *COMPOSE_API) as second:
        for container in (first, second):
            podman.wait_healthy(container)
        replicas = [container.url.removeprefix("http://") for container in (first, second)]
        with running_nginx(replicas) as nginx:
            before = [chars_generated(c.url) for c in (first, second)]
            answers = [generate(nginx.url).status_code for _ in range(20)]
            assert answers == [200] * 20
            after = [chars_generated(c.url) for c in (first, second)]
            assert all(a > b for a, b in zip(after, before)), f"characters generated per replica: {before} -> {after}"

            stream = requests.post(nginx.url + "/v1/generate", json={"prompt": "the", "max_chars": 2000, "stream": True},
                                   stream=True, timeout=REQUEST_TIMEOUT)
            chunks = list(stream.iter_content(chunk_size=None))
            assert stream.status_code == 200 and len(chunks) > 1 and b'"finish_reason":"length"' in b"".join(chunks)

            # one replica stopped (SIGTERM: it drains and exits 0); the other answers everything
            podman.podman("stop", "--time", "40", second.id, timeout=60)
            assert second.state()["ExitCode"] == 0
            answers = [generate(nginx.url).status_code for _ in range(10)]
            assert answers == [200] * 10, nginx.error_log()[-2000:]
