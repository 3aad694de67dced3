"""Run the real server in tests, the way llama.cpp's server tests do.

`running_server(artifact)` starts `chargen serve` (gunicorn with the project's config, exactly what a
user runs) on a free 127.0.0.1 port, polls /health, yields a `Server`, and stops it in `finally`.
Every request made through `Server` has a timeout. The server's stdout and stderr go to a log file
(not a pipe, which would block the server once full); its tail is shown when start-up fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import requests

import polling

ROOT = Path(__file__).resolve().parents[1]
REQUEST_TIMEOUT = 30  # seconds, for every request made through Server
START_TIMEOUT = 180  # seconds for gunicorn, ONNX Runtime's import and the artifact's load on a busy machine


@dataclass
class Server:
    url: str  # "http://127.0.0.1:PORT"
    process: subprocess.Popen  # the gunicorn master (`chargen serve` runs it in its own process)
    log_path: Path

    def get(self, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", REQUEST_TIMEOUT)
        return requests.get(self.url + path, **kwargs)

    def post(self, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", REQUEST_TIMEOUT)
        return requests.post(self.url + path, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def ended(self) -> str | None:
        """How the server process ended, or None while it runs."""
        return None if self.process.poll() is None else f"the server exited with status {self.process.returncode}"

    def wait_healthy(self, workers_ready: int = 1) -> None:
        """Wait until /health is 200 and `workers_ready` workers have loaded the model (the
        chargen_workers_ready gauge); with 0, only until the port answers HTTP (a server that is
        still loading answers 503)."""
        def ready(health: requests.Response) -> bool:
            return not workers_ready or (health.status_code == 200 and self.metric("chargen_workers_ready") >= workers_ready)

        polling.wait_healthy(self.url, ended=self.ended, log=self.log, timeout=START_TIMEOUT, ready=ready)

    def worker_pids(self) -> list[int]:
        """The gunicorn workers now alive (children of the master)."""
        try:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text()
        except OSError:
            return []
        return [int(pid) for pid in children.split()]

    def metric(self, name: str, labels: dict | None = None) -> float:
        """The value of one sample in /metrics (0 when the sample is absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = self.get("/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                    return sample.value
        return 0.0


def continuation(prompt: str, chars: int) -> str:
    """What greedy sampling of conftest's tiny model gives after `prompt`, a piece of the periodic
    text PERIODIC (its first occurrence there)."""
    from conftest import PERIODIC

    start = (PERIODIC * 2).index(prompt) + len(prompt)
    return (PERIODIC * (chars // len(PERIODIC) + 3))[start:start + chars]


def sse_payloads(response: requests.Response) -> Iterator[str]:
    """The `data:` payloads of a streamed server-sent-events response, as they arrive."""
    buffer = b""
    for chunk in response.iter_content(chunk_size=None):
        buffer += chunk
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            text = block.decode()
            assert text.startswith("data: "), text
            yield text[len("data: "):]


def free_port() -> int:
    """A port that was free a moment ago (the usual small race with other processes is accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chargen_command() -> list[str]:
    script = Path(sys.executable).with_name("chargen")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from chargen.cli import main; main()"]


def server_env(artifact: Path | str, env: dict | None = None) -> dict:
    """The test process's environment without any CHARGEN_* settings of its own, plus `env`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("CHARGEN_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    base.update({"CHARGEN_ARTIFACT": str(artifact), "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"})
    base.update({k: str(v) for k, v in (env or {}).items()})
    return base


@contextmanager
def running_server(artifact: Path | str, *, workers: int = 1, env: dict | None = None,
                   wait_healthy: bool = True) -> Iterator[Server]:
    """Start real gunicorn (the same command as `chargen serve`) on a free 127.0.0.1 port.

    wait_healthy=True waits until every worker has loaded the model (/health is 200 and the
    chargen_workers_ready gauge equals `workers`); False only waits until the port answers HTTP
    (for testing the 503 of a server that is still loading).
    """
    port = free_port()
    log_file = tempfile.NamedTemporaryFile(prefix="chargen-server-", suffix=".log", delete=False)
    log_path = Path(log_file.name)
    command = chargen_command() + ["serve", "--bind", f"127.0.0.1:{port}", "--workers", str(workers)]
    process = subprocess.Popen(command, cwd=ROOT, env=server_env(artifact, env), stdout=log_file,
                               stderr=subprocess.STDOUT, start_new_session=True)
    log_file.close()
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    try:
        server.wait_healthy(workers if wait_healthy else 0)
        yield server
    finally:
        stop(server)
        log_path.unlink(missing_ok=True)


def stop(server: Server, timeout: float = 20) -> int:
    """SIGINT (gunicorn's quick shutdown: open streams are cut), then SIGKILL of the whole process
    group if it does not exit in time. Returns the exit status."""
    process = server.process
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
    return process.returncode
