"""Waiting in tests: poll for a condition, bounded, rather than sleep for a fixed time.

`wait_for(condition)` is for anything; `wait_healthy(url, ...)` is the one loop that waits for a
chargen server to answer /health, whatever runs it (tests/server.py's gunicorn, a replica behind
nginx, the Dockerfile's command, a podman container): it stops at once, with the log's tail, when
the process that should answer has ended.
"""

from __future__ import annotations

import time
from typing import Callable

import requests


def wait_for(condition: Callable[[], object], timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Call `condition` every `interval` seconds until it returns something true (then True) or
    `timeout` seconds have passed (then whether a last call is true)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return bool(condition())


def wait_healthy(url: str, *, ended: Callable[[], str | None], log: Callable[[], str], timeout: float,
                 ready: Callable[[requests.Response], bool] = lambda r: r.status_code == 200) -> None:
    """Poll `url`/health until `ready` holds for its answer. Raises RuntimeError, with the log's
    tail, when `ended()` says how the process that should answer ended, or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        how = ended()
        if how:
            raise RuntimeError(f"{how} before {url} was healthy:\n{log()[-4000:]}")
        try:
            if ready(requests.get(url + "/health", timeout=5)):
                return
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} was not healthy within {timeout:.0f} s:\n{log()[-4000:]}")
        time.sleep(0.1)
