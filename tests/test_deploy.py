"""Deployment: the Dockerfile and docker-compose.yml.

No Docker engine is needed: the compose file is checked by a compose validator (`docker compose` or
the older `docker-compose`; the test skips, saying so, when neither is installed), and the command
the container runs (the Dockerfile's CMD, with its ENV) is run here, outside Docker, to show that it
starts the service and that the image's HEALTHCHECK command sees it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dockerfile import COMPOSE, DOCKERFILE, env_of, healthcheck_command, instructions, only, stage
from server import ROOT, Server, free_port, server_env, stop

NGINX_UPSTREAM = ROOT / "deploy" / "nginx" / "upstream.conf"
KUBERNETES = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.33.0"  # the schemas the manifests are validated against (kubernetes-validate bundles them)
VENV_BIN = Path(sys.executable).parent


def test_the_image_is_slim_runs_as_a_user_and_checks_its_health():
    dockerfile = stage("api")
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", only(dockerfile, "FROM")), "a slim Python base image"
    keywords = [k for k, _ in dockerfile]
    user = only(dockerfile, "USER")
    assert user not in ("root", "0") and not user.startswith(("root:", "0:"))
    assert keywords.index("USER") < keywords.index("CMD")
    assert "/health" in " ".join(healthcheck_command(dockerfile))
    port = env_of(dockerfile)["CHARGEN_BIND"].rpartition(":")[2]
    assert only(dockerfile, "EXPOSE") == port
    assert f"server api:{port} " in NGINX_UPSTREAM.read_text()  # where compose's nginx sends requests


def test_two_targets_api_serves_without_the_training_stack_and_train_has_it():
    """`api` (the default: the last stage) installs the project without extras, so without
    TensorFlow; `train` installs '.[train]'; compose builds each service from its target."""
    installs = {target: [args for k, args in stage(target) if k == "RUN" and "pip install" in args] for target in ("api", "train")}
    assert installs["api"] == ["pip install -e ."]
    assert installs["train"] == ["pip install -e '.[train]'"]
    assert [args for k, args in instructions() if k == "FROM"][-1].endswith(" AS api")  # what `docker build .` builds
    train_user = [args for k, args in stage("train") if k == "USER"]
    assert train_user and train_user[-1] not in ("root", "0")
    text = COMPOSE.read_text()
    for service in ("api", "train"):
        block = re.search(rf"^  {service}:\n((?:    .*\n|\s*\n)*)", text, re.M).group(1)
        assert re.search(rf"^    build:\n      context: \.\n      target: {service}\b", block, re.M), block


# ---------------------------------------------------------------- the container's command, outside Docker


@pytest.mark.slow  # real gunicorn
def test_the_containers_command_starts_the_service_outside_docker(tiny_artifact, tmp_path):
    dockerfile = stage("api")
    command = json.loads(only(dockerfile, "CMD"))
    image_env = env_of(dockerfile)
    assert set(image_env) >= {"CHARGEN_BIND", "CHARGEN_ARTIFACT"}
    # The image's environment, but this machine's python (first on PATH, as /opt/chargen/bin is in
    # the image), the tiny model and a free loopback port.
    port = free_port()
    settings = {k: v for k, v in image_env.items() if k not in ("PATH", "CHARGEN_ARTIFACT")}
    settings["CHARGEN_BIND"] = f"127.0.0.1:{port}"
    env = server_env(tiny_artifact, settings)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    assert shutil.which(command[0], path=env["PATH"]), f"{command[0]} is not on PATH"

    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    health = healthcheck_command(dockerfile)
    try:
        server.wait_healthy()
        check = subprocess.run(health, env=env, capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        r = server.post("/v1/generate", json={"prompt": "the quick", "max_chars": 20, "temperature": 0})
        assert r.status_code == 200 and len(r.json()["choices"][0]["text"]) == 20
        assert server.get("/").status_code == 200
    finally:
        stop(server)
    # and the health check notices a server that is gone
    assert subprocess.run(health, env=env, capture_output=True, timeout=30).returncode != 0


# ---------------------------------------------------------------- docker-compose.yml


def compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        try:
            if subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30).returncode == 0:
                return [docker, "compose"]
        except subprocess.TimeoutExpired:
            pass
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@pytest.fixture
def compose():
    command = compose_command()
    if command is None:
        pytest.skip("no compose validator: install the docker compose plugin or Debian's docker-compose package")

    def run(*args, file: Path = COMPOSE, env: dict | None = None) -> subprocess.CompletedProcess:
        # a clean environment, so that variables of the developer's shell do not change the result
        base = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
        return subprocess.run([*command, "--project-directory", str(ROOT), "-f", str(file), *args],
                              env={**base, **(env or {})}, capture_output=True, text=True, timeout=60)

    return run


def test_compose_accepts_the_file(compose):
    r = compose("config", "-q")
    assert r.returncode == 0, r.stderr
    profiles = compose("config", "--profiles")
    assert profiles.returncode == 0 and profiles.stdout.split() == ["train"], profiles.stdout + profiles.stderr
    services = compose("--profile", "train", "config", "--services")
    assert sorted(services.stdout.split()) == ["api", "nginx", "train"], services.stdout + services.stderr


def test_compose_variables_choose_port_address_and_model(compose):
    r = compose("config", env={"PORT": "9123", "PUBLISH": "0.0.0.0", "MODEL": "/models/mine"})
    assert r.returncode == 0, r.stderr
    assert "9123" in r.stdout and "0.0.0.0" in r.stdout and "/models/mine" in r.stdout


def test_compose_rejects_a_broken_file(compose, tmp_path):
    """The validator validates: the same file with one wrong value is refused, naming it."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("restart: unless-stopped", "restart: [sometimes]"))
    r = compose("config", "-q", file=broken)
    assert r.returncode != 0
    assert "restart" in r.stderr


def test_the_api_service_runs_the_images_command():
    """No `command:` under `api`: what runs is the Dockerfile's CMD, tested above."""
    text = COMPOSE.read_text()
    api = re.search(r"^  api:\n((?:    .*\n|\s*\n)*)", text, re.M)
    assert api, "no api service"
    assert "command:" not in api.group(1)
    assert re.search(r"^\s+restart: unless-stopped$", api.group(1), re.M)
    assert re.search(r"^\s+- \./artifacts:/app/artifacts:ro\b", api.group(1), re.M)
    assert re.search(r"^\s+- models:/models:ro\b", api.group(1), re.M)


def service_block(name: str) -> str:
    found = re.search(rf"^  {name}:\n((?:    .*\n|\s*\n)*)", COMPOSE.read_text(), re.M)
    assert found, f"no {name} service in docker-compose.yml"
    return found.group(1)


def test_nginx_in_front_of_the_replicas_with_chargens_limits():
    """Replicas publish no host port (several could not share one); nginx does, renders the
    template with the same body limit and request timeout defaults as chargen's, and the api
    containers get long enough to drain before Docker kills them."""
    from service.config import Settings

    defaults = Settings()
    api, nginx = service_block("api"), service_block("nginx")
    assert "ports:" not in api and re.search(r'^      - "8000"', api, re.M)
    assert re.search(r'^      - "\$\{PUBLISH:-127\.0\.0\.1\}:\$\{PORT:-8000\}:80"$', nginx, re.M)
    assert re.search(r"^    image: nginx:1\.(2[7-9]|[3-9]\d)\b", nginx, re.M), "nginx >= 1.27.3 resolves `api` again"
    assert f"CHARGEN_MAX_BODY_BYTES: ${{CHARGEN_MAX_BODY_BYTES:-{defaults.max_body_bytes}}}" in nginx
    assert f"CHARGEN_REQUEST_TIMEOUT: ${{CHARGEN_REQUEST_TIMEOUT:-{defaults.request_timeout:g}}}" in nginx
    for name in ("CHARGEN_MAX_BODY_BYTES", "CHARGEN_REQUEST_TIMEOUT", "CHARGEN_GRACEFUL_TIMEOUT"):
        assert re.search(rf"^      {name}:$", api, re.M), f"{name} is not passed to the api"
    for source, target in [("chargen.conf.template", "/etc/nginx/templates/default.conf.template"),
                           ("upstream.conf", "/etc/nginx/chargen/upstream.conf"),
                           ("15-chargen-limits.envsh", "/docker-entrypoint.d/15-chargen-limits.envsh")]:
        assert f"./deploy/nginx/{source}:{target}:ro" in nginx
        assert (ROOT / "deploy" / "nginx" / source).exists()
    assert os.access(ROOT / "deploy" / "nginx" / "15-chargen-limits.envsh", os.X_OK), "the entrypoint sources it only when executable"
    grace = re.search(r"^    stop_grace_period: (\d+)s$", api, re.M)
    assert grace and int(grace.group(1)) >= defaults.graceful_timeout + 5
    assert re.search(r"^resolver 127\.0\.0\.11 ", NGINX_UPSTREAM.read_text(), re.M)  # Docker's embedded DNS


# ---------------------------------------------------------------- Kubernetes


def manifests() -> dict[str, list[dict]]:
    """Every document of every manifest under deploy/kubernetes (the kustomization aside)."""
    import yaml

    found = {}
    for path in sorted(KUBERNETES.rglob("*.yaml")):
        if path.name != "kustomization.yaml":
            found[str(path.relative_to(KUBERNETES))] = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return found


def one(kind: str, where: str | None = None) -> dict:
    docs = [d for path, ds in manifests().items() for d in ds if d["kind"] == kind and (where is None or path == where)]
    assert len(docs) == 1, f"expected one {kind}{' in ' + where if where else ''}, found {len(docs)}"
    return docs[0]


def test_every_kubernetes_manifest_is_valid():
    import kubernetes_validate
    import yaml

    found = manifests()
    assert {"deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml", "configmap.yaml", "queue-depth/hpa.yaml"} <= set(found)
    for path, docs in found.items():
        for doc in docs:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # raises, naming the field
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p for p in found if "/" not in p)
    broken = one("Deployment")
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["prot"] = 8000
    with pytest.raises(kubernetes_validate.ValidationError):  # the validator validates
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_kubernetes_agrees_with_the_server(tiny_artifact):
    """Ports, probe paths, settings, user, grace period and signal are those the server has."""
    from service.app import create_app
    from service.config import Settings, unknown_variables

    deployment, config = one("Deployment"), one("ConfigMap")["data"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]

    # every setting is one chargen reads, with a value it accepts
    assert not unknown_variables(config), unknown_variables(config)
    settings = Settings.from_env(config)
    assert {"http": settings.bind.rpartition(":")[2]} == {p["name"]: str(p["containerPort"]) for p in container["ports"]}
    assert container["envFrom"] == [{"configMapRef": {"name": one("ConfigMap")["metadata"]["name"]}}]

    # probes: readiness is /health (503 while loading and draining), liveness is 200 through both
    ready, live = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert ready["port"] == live["port"] == "http" and ready["path"] == "/health" and live["path"] == "/health/live"
    app = create_app({"ARTIFACT": str(tiny_artifact)})
    client, scheduler = app.test_client(), app.extensions["chargen"].scheduler
    assert client.get(live["path"]).status_code == 200  # before the model loads
    assert client.get(ready["path"]).status_code == 503
    assert scheduler.wait_ready(120) and client.get(ready["path"]).status_code == 200
    scheduler.drain()
    assert client.get(ready["path"]).json["error"]["code"] == "draining" and client.get(live["path"]).status_code == 200
    scheduler.close()

    # the drain fits in the grace period: preStop's sleep, then SIGTERM and graceful_timeout
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= int(sleep[1]) + settings.graceful_timeout + 1
    assert all(k != "STOPSIGNAL" or args in ("SIGTERM", "15") for k, args in instructions())  # the drain's signal

    # non-root as the image's user, read-only root with /tmp writable, models read-only
    uid = re.search(r"--uid (\d+)", DOCKERFILE.read_text())
    assert uid and pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == int(uid.group(1))
    assert container["securityContext"]["readOnlyRootFilesystem"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert mounts["/models"]["readOnly"] and settings.artifact.startswith("/models/")
    assert set(container["resources"]["requests"]) == set(container["resources"]["limits"]) == {"cpu", "memory"}

    # the service, the budget and both autoscalers select and scale these pods
    service = one("Service")
    assert service["spec"]["selector"] == labels and service["spec"]["ports"][0]["targetPort"] == "http"
    assert one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == labels
    from service import metrics

    for where in ("hpa.yaml", "queue-depth/hpa.yaml"):
        hpa = one("HorizontalPodAutoscaler", where)
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
        assert hpa["metadata"]["name"] == "chargen"  # the same name: applying the variant replaces the CPU one
    (metric,) = one("HorizontalPodAutoscaler", "queue-depth/hpa.yaml")["spec"]["metrics"]
    exposed = metrics.exposition()[0].decode()  # a gauge /metrics exposes
    assert f"# TYPE {metric['pods']['metric']['name']} gauge" in exposed

