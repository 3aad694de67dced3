"""Running a command as a person runs it: on a pseudo-terminal, reading what the screen receives.

Output piped to a file hides what only a terminal triggers (Keras' live progress bar, the final
newline of `chargen sample`): these tests give the command a real tty for stdin, stdout and stderr.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from dataclasses import dataclass
from pathlib import Path

CHARGEN = str(Path(sys.executable).with_name("chargen"))


@dataclass
class Screen:
    returncode: int
    raw: str  # every byte the terminal received, decoded (\r\n line ends, \r and \b redraws, escape codes)

    @property
    def text(self) -> str:
        """What is left on the screen line by line, roughly: each line's last redraw after a \\r."""
        return "\n".join(line.rsplit("\r", 1)[-1] for line in self.raw.replace("\r\n", "\n").split("\n"))


def _default_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def run_on_terminal(args: list[str], *, timeout: float = 300, columns: int = 120, cwd: Path | None = None,
                    interrupt_at: str | None = None, interrupt_with: int = signal.SIGINT) -> Screen:
    """Run `args` with a pseudo-terminal as its stdin, stdout and stderr, `columns` wide; returns
    its exit status and everything it wrote. With `interrupt_at`, the command gets SIGINT, as from
    Ctrl-C (or `interrupt_with`), once that text is on the screen. Killed (and the test failed) after `timeout` seconds."""
    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(columns)}
    env.pop("NO_COLOR", None)
    # SIGINT as a shell in a terminal leaves it: a suite started in the background (`scripts/test &`)
    # inherits it ignored, and Python then never raises KeyboardInterrupt
    process = subprocess.Popen(args, stdin=terminal, stdout=terminal, stderr=terminal, env=env, cwd=cwd,
                               start_new_session=True, preexec_fn=_default_signals)
    os.close(terminal)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.2)
            if ready:
                try:
                    data = os.read(controller, 65536)
                except OSError:  # EIO: every copy of the terminal's other end is closed
                    break
                if not data:
                    break
                chunks.append(data)
                if interrupt_at is not None and interrupt_at.encode() in b"".join(chunks):
                    os.killpg(process.pid, interrupt_with)  # the command's process group, as the terminal does
                    interrupt_at = None
            elif process.poll() is not None:
                break
        else:
            raise AssertionError(f"{' '.join(args)} still running after {timeout} s; it wrote:\n"
                                 + b"".join(chunks).decode(errors="replace")[-3000:])
        returncode = process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        os.close(controller)
    return Screen(returncode, b"".join(chunks).decode("utf-8", errors="replace"))
