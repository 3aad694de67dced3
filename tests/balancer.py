"""Run deploy/nginx's configuration for real on loopback, outside Docker (tests/test_nginx.py, bench/load.py).

The configuration is rendered as the nginx image renders it (envsubst of the variables it names,
with chargen's defaults and 15-chargen-limits.envsh run by `sh`), with two changes for this machine:
`listen 80` becomes a free 127.0.0.1 port, and the upstream file is deploy/nginx/upstream.conf with
its one Docker server line replaced by one line per loopback replica (same parameters, no DNS).
nginx runs in the foreground with everything (pid, logs, temporary files) in a temporary prefix,
as root or not, and is stopped in `finally`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from polling import wait_for
from server import free_port

ROOT = Path(__file__).resolve().parents[1]
NGINX_DIR = ROOT / "deploy" / "nginx"
TEMPLATE = NGINX_DIR / "chargen.conf.template"
UPSTREAM = NGINX_DIR / "upstream.conf"
LIMITS = NGINX_DIR / "15-chargen-limits.envsh"
DOCKER_SERVER = re.compile(r"^(\s*)server api:8000 resolve( [^;]*)?;$", re.M)


def nginx_binary() -> str | None:
    """Debian installs nginx in /usr/sbin, which is not on every user's PATH."""
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)


def limits(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables the template uses, as the image's entrypoint sets them: chargen's settings
    (defaults unless `environ` has them) and what 15-chargen-limits.envsh derives."""
    from service.config import Settings

    settings = Settings.from_env(environ or {})
    env = {"CHARGEN_MAX_BODY_BYTES": str(settings.max_body_bytes), "CHARGEN_REQUEST_TIMEOUT": f"{settings.request_timeout:g}"}
    done = subprocess.run(["sh", "-c", f'. "{LIMITS}"; printf %s "$CHARGEN_PROXY_READ_TIMEOUT"'],
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}, capture_output=True, text=True, timeout=10)
    env["CHARGEN_PROXY_READ_TIMEOUT"] = done.stdout
    return env


def render(port: int, replicas: list[str], environ: dict[str, str] | None = None) -> tuple[str, str]:
    """(server configuration, upstream file) for nginx on 127.0.0.1:port in front of `replicas`
    ("127.0.0.1:PORT" each)."""
    text = TEMPLATE.read_text()
    for name, value in limits(environ).items():
        text = text.replace("${%s}" % name, value)
    assert "${" not in text, "the template uses a variable the renderer does not know"
    text, n = re.subn(r"^(\s*)listen 80;$", rf"\1listen 127.0.0.1:{port};", text, flags=re.M)
    assert n == 1, "the template should have one `listen 80;`"

    upstream = UPSTREAM.read_text()
    match = DOCKER_SERVER.search(upstream)
    assert match, "deploy/nginx/upstream.conf should have one `server api:8000 resolve ...;` line"
    indent, params = match.group(1), match.group(2) or ""
    servers = "\n".join(f"{indent}server {address}{params};" for address in replicas)
    upstream = DOCKER_SERVER.sub(lambda _: servers, upstream)
    upstream = re.sub(r"^resolver .*;$", "", upstream, flags=re.M)  # no DNS on loopback
    return text, upstream


@dataclass
class Nginx:
    url: str
    process: subprocess.Popen
    prefix: Path

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def access_log(self) -> str:
        path = self.prefix / "access.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextmanager
def running_nginx(replicas: list[str], environ: dict[str, str] | None = None) -> Iterator[Nginx]:
    binary = nginx_binary()
    if binary is None:
        raise FileNotFoundError("nginx is not installed (Debian: apt-get install nginx; scripts/test does it as root)")
    prefix = Path(tempfile.mkdtemp(prefix="chargen-nginx-"))
    port = free_port()
    server, upstream = render(port, replicas, environ)
    (prefix / "chargen").mkdir()
    (prefix / "chargen" / "upstream.conf").write_text(upstream)
    (prefix / "chargen.conf").write_text(server)
    # What the nginx image's own nginx.conf provides, with every path inside the prefix.
    user = "user root root;\n" if os.geteuid() == 0 else ""  # as root, workers would run as nobody
    (prefix / "nginx.conf").write_text(
        f"{user}daemon off;\nworker_processes 1;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log info;\n"
        "events { worker_connections 1024; }\n"
        "http {\n"
        f"    access_log {prefix}/access.log;\n"
        + "".join(f"    {kind}_temp_path {prefix}/{kind}_temp;\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        + "    include chargen.conf;\n}\n")
    command = [binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")]
    check = subprocess.run(command + ["-t"], capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        shutil.rmtree(prefix, ignore_errors=True)
        raise RuntimeError(f"nginx rejects the rendered configuration:\n{check.stderr}")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    nginx = Nginx(f"http://127.0.0.1:{port}", process, prefix)

    def listening() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited with {process.returncode}:\n{nginx.error_log()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    try:
        if not wait_for(listening, timeout=20):
            raise RuntimeError(f"nginx did not listen within 20 s:\n{nginx.error_log()[-3000:]}")
        yield nginx
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # nginx's fast shutdown
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        shutil.rmtree(prefix, ignore_errors=True)
