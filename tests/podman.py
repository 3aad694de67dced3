"""Build and run chargen's images with podman, without a Docker engine or a registry
(tests/test_images.py; bench/README.md, "Images").

The Dockerfile starts FROM python:3.11-slim, which cannot be pulled here. `base_image()` makes a
stand-in from Debian bookworm (its python3 is 3.11) with mmdebstrap and `podman import`, cached in
CACHE (the tarball) and in podman's storage (the image), both keyed by what goes into it, so only
the first run pays its minute. `build()` then runs `podman build --from <that image>` over the
unchanged Dockerfile, one target at a time. Two adjustments for machines like this one (a gVisor
sandbox), harmless elsewhere:
- containers get explicit ulimits (nofile at the host's hard limit, nproc 32768) through the
  CONTAINERS_CONF file `containers_conf()` writes: without them runc cannot start a container
  ("error setting rlimits for ready process: ... operation not permitted");
- the host's CA bundle is bind-mounted read-only into the build (over the base's own, which the
  image keeps), so pip trusts what the host trusts: a proxy in front of PyPI may present a
  certificate that only the host's bundle vouches for. The host's proxy variables and http(s)
  package indexes go in too; the Dockerfile is not touched.

Needs root (mmdebstrap's root mode, podman's system storage), podman, mmdebstrap and uidmap
(Debian: apt-get install podman mmdebstrap uidmap; scripts/test installs them as root).

Run as a script to build both images, start the api one and print the figures:
    .venv/bin/python tests/podman.py
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import polling
from server import free_port

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("CHARGEN_IMAGE_CACHE", "/var/tmp/chargen-images"))
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
LABEL = "chargen-test"  # on every container and volume made here, to find leftovers

# ---------------------------------------------------------------- the base image

# What python:3.11-slim gives the Dockerfile: Python 3.11 with its venv module, a `python` command,
# CA certificates and useradd (passwd); apt-get too, as in the slim image. Documentation and
# translations are left out, as Debian's slim images do.
SUITE = "bookworm"
MIRRORS = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates", "passwd")
MMDEBSTRAP_OPTIONS = (
    "--variant=apt",
    "--aptopt=APT::Install-Recommends \"false\"",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
)
# The official image's settings that the Dockerfile relies on (its `ENV PATH=/opt/chargen/bin:$PATH`).
IMPORT_CHANGES = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
)


def unavailable() -> str | None:
    """Why the images cannot be built here, or None."""
    if os.geteuid() != 0:
        return "building images needs root (mmdebstrap's root mode and podman's system storage)"
    missing = [package for command, package in (("podman", "podman"), ("mmdebstrap", "mmdebstrap"), ("newuidmap", "uidmap"))
               if shutil.which(command) is None]
    if missing:
        return (f"not installed: {' '.join(missing)} (apt-get install podman mmdebstrap uidmap; "
                "scripts/test installs them as root)")
    if not HOST_CA.exists():
        return f"no CA bundle at {HOST_CA} to give pip inside the build"
    try:
        info = podman("info", timeout=60, check=False)
    except subprocess.TimeoutExpired:
        return "`podman info` did not answer within 60 s"
    if info.returncode != 0:
        return f"podman does not work here: {info.stderr.strip()[-500:]}"
    return None


def containers_conf() -> Path:
    """The CONTAINERS_CONF file every podman command here gets: explicit ulimits."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    text = f'[containers]\ndefault_ulimits = ["nofile={nofile}:{nofile}", "nproc=32768:32768"]\n'
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / "containers.conf"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def podman(*args: str, timeout: float, check: bool = True) -> subprocess.CompletedProcess:
    """One podman command, its output captured; raises with its stderr when it fails and `check`."""
    env = {**os.environ, "CONTAINERS_CONF": str(containers_conf())}
    done = subprocess.run(["podman", *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])} ... exited with {done.returncode}:\n"
                           f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


def base_image() -> str:
    """The tag of the stand-in for python:3.11-slim, made (and cached) when missing."""
    recipe = json.dumps([SUITE, MIRRORS, PACKAGES, MMDEBSTRAP_OPTIONS, IMPORT_CHANGES])
    key = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    tag = f"localhost/chargen-base:{SUITE}-{key}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "base.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs at once make it once
        if podman("image", "exists", tag, timeout=60, check=False).returncode == 0:
            return tag
        tarball = CACHE / f"base-{SUITE}-{key}.tar"
        if not tarball.exists():
            partial = tarball.with_suffix(".partial.tar")
            command = ["mmdebstrap", *MMDEBSTRAP_OPTIONS, f"--include={','.join(PACKAGES)}", SUITE, str(partial), *MIRRORS]
            done = subprocess.run(command, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                partial.unlink(missing_ok=True)
                raise RuntimeError(f"mmdebstrap exited with {done.returncode}:\n{done.stderr[-4000:]}")
            partial.rename(tarball)  # a crash never leaves a half tarball under the final name
        changes = [arg for change in IMPORT_CHANGES for arg in ("--change", change)]
        podman("import", *changes, str(tarball), tag, timeout=600)
    return tag


# ---------------------------------------------------------------- building the Dockerfile's targets


def pip_conf() -> Path | None:
    """A pip.conf with the host's http(s) package indexes, for the build; None when the host uses
    PyPI's (as here: its other settings are file:// indexes and find-links, paths on the host).
    pip in the build trusts the mounted CA bundle by itself (Debian's pip uses the system one)."""
    try:
        listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                                timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        listed = ""
    settings: dict[str, list[str]] = {}
    for line in listed.splitlines():  # e.g. global.extra-index-url='https://a https://b'
        name, _, value = line.partition("=")
        option = name.rpartition(".")[2]
        if option in ("index-url", "extra-index-url", "trusted-host"):
            settings.setdefault(option, []).extend(value.strip("'\"").split())
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST"):
        if os.environ.get(name):  # the environment wins over the files, as for pip itself
            settings[name[4:].lower().replace("_", "-")] = os.environ[name].split()
    lines = []
    for option, values in settings.items():
        if option != "trusted-host":
            values = [v for v in values if v.startswith(("http://", "https://"))]
        if values:
            lines.append(f"{option} = {' '.join(values)}")
    if not any(line.startswith(("index-url", "extra-index-url")) for line in lines):
        return None
    path = CACHE / "pip.conf"
    path.write_text("\n".join(["[global]", *lines]) + "\n")
    return path


@dataclass
class Image:
    tag: str
    build_seconds: float
    size_bytes: int
    log: str  # podman build's output


def build(target: str, tag: str, timeout: float = 1800) -> Image:
    """`podman build --target target` of the project's Dockerfile from base_image(). The previous
    image of `tag` is removed once replaced."""
    base = base_image()
    previous = podman("image", "inspect", "--format", "{{.Id}}", tag, timeout=60, check=False).stdout.strip()
    # Proxy variables are build arguments every Dockerfile takes (not kept in the image); an index
    # needs a pip.conf, and its mount point stays in the image as an empty /etc/pip.conf.
    proxies = [arg for name in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
               if os.environ.get(name) for arg in ("--build-arg", f"{name}={os.environ[name]}")]
    indexes = pip_conf()
    mounts = ["--volume", f"{HOST_CA}:{HOST_CA}:ro", *(["--volume", f"{indexes}:/etc/pip.conf:ro"] if indexes else [])]
    started = time.monotonic()
    # --layers=false: nothing but the image is kept, so runs over a changing tree leave no cache
    # layers behind; every build is a full one (pip's downloads included)
    done = podman("build", "--from", base, "--pull=never", "--layers=false", "--network", "host", "--format", "docker",
                  *mounts, *proxies, "--target", target, "--tag", tag, "--file", str(ROOT / "Dockerfile"), str(ROOT),
                  timeout=timeout)
    seconds = time.monotonic() - started
    current = podman("image", "inspect", "--format", "{{.Id}}", tag, timeout=60).stdout.strip()
    if previous and previous != current:
        podman("rmi", previous, timeout=120, check=False)  # still used by a container: left alone
    return Image(tag, seconds, image_size(tag), done.stdout + done.stderr)


def inspect_image(tag: str) -> dict:
    return json.loads(podman("image", "inspect", tag, timeout=60).stdout)[0]


def image_size(tag: str) -> int:
    return int(inspect_image(tag)["Size"])


# ---------------------------------------------------------------- containers


@dataclass
class Container:
    id: str
    url: str  # http://127.0.0.1:PORT, the container's port 8000
    started: float  # time.monotonic() just before `podman run`

    def logs(self) -> str:
        done = podman("logs", self.id, timeout=60, check=False)
        return done.stdout + done.stderr

    def exec(self, *command: str) -> subprocess.CompletedProcess:
        return podman("exec", self.id, *command, timeout=60, check=False)

    def state(self) -> dict:
        return json.loads(podman("inspect", self.id, timeout=60).stdout)[0]["State"]


@contextmanager
def running(image: str, *args: str, env: dict | None = None) -> Iterator[Container]:
    """`podman run -d` of `image` with its port 8000 published on a free 127.0.0.1 port, `args`
    before the image (volumes, --read-only, ...); removed in `finally`. The image's health check
    is kept (for `podman healthcheck run`) without its timer: no systemd here to run one."""
    port, started = free_port(), time.monotonic()
    environment = [arg for name, value in (env or {}).items() for arg in ("--env", f"{name}={value}")]
    done = podman("run", "--detach", "--name", f"chargen-test-{uuid.uuid4().hex[:8]}", "--label", LABEL,
                     "--publish", f"127.0.0.1:{port}:8000", "--health-interval", "disable", *environment, *args, image,
                     timeout=120)
    container = Container(done.stdout.strip().splitlines()[-1], f"http://127.0.0.1:{port}", started)
    try:
        yield container
    finally:
        # --volumes: the anonymous volume of the image's VOLUME /models goes too
        podman("rm", "--force", "--volumes", "--time", "0", container.id, timeout=120, check=False)


def wait_healthy(container: Container, timeout: float = 120) -> float:
    """Seconds from `podman run` until /health answers 200; raises with the log when it does not
    within `timeout` seconds (the image's start period is 120 s)."""
    def ended() -> str | None:
        state = container.state()
        return None if state.get("Running") else f"the container exited with {state.get('ExitCode')}"

    polling.wait_healthy(container.url, ended=ended, log=container.logs,
                         timeout=timeout - (time.monotonic() - container.started))
    return time.monotonic() - container.started


@contextmanager
def volume() -> Iterator[str]:
    """A new podman volume's name, removed in `finally`."""
    name = f"chargen-test-{uuid.uuid4().hex[:8]}"
    podman("volume", "create", "--label", LABEL, name, timeout=60)
    try:
        yield name
    finally:
        podman("volume", "rm", "--force", name, timeout=120, check=False)


# ---------------------------------------------------------------- by hand: build both, print the figures


def main() -> None:
    reason = unavailable()
    if reason:
        sys.exit(reason)
    started = time.monotonic()
    base = base_image()
    print(f"base   {base}: {image_size(base) / 1e6:,.0f} MB, ready in {time.monotonic() - started:.0f} s")
    for target, tag in (("api", "localhost/chargen-test:api"), ("train", "localhost/chargen-test:train")):
        image = build(target, tag)
        print(f"{target:6} {tag}: built in {image.build_seconds:.0f} s, {image.size_bytes / 1e6:,.0f} MB")
    with running("localhost/chargen-test:api", "--read-only", "--tmpfs", "/tmp") as container:
        print(f"api    healthy {wait_healthy(container):.1f} s after `podman run`")


if __name__ == "__main__":
    main()
