"""Writing a file so that a reader, or a crash, sees the old contents or the new, never part of them:
the one way chargen writes the files it keeps (artifacts' graphs, corpora and their token files, a
training run's records, the server's reload counter); and `parse_json`, the one way the JSON records
among them are parsed back.

The new contents go to a temporary file beside the target (`.NAME.tmp-PID`, on the same file
system, so the rename is atomic), are flushed to the disk, and then renamed over the target. A
crash before the rename leaves the old file and at worst that temporary file, which training's
tidy-up removes; on an error it is removed at once.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Replace `path` with `data` (text is written as UTF-8) atomically and durably."""
    with replacing(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path`, with the same suffix (Keras insists on `.keras`), for the block
    to write; when the block ends without an error the file is synced to the disk and renamed over
    `path`; when it raises, the file is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync(path: str | Path) -> None:
    """Flush a written file's contents to the disk (a rename is only as durable as what it renames)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def parse_json(text: str):
    """json.loads, with every failure a ValueError that says "not valid JSON: ..." (the caller adds
    the file's name): a syntax error, or arrays or objects nested too deeply for the parser, which
    json raises as RecursionError (`'[' * 200000`)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON: {e}") from None
    except RecursionError:
        raise ValueError("not valid JSON: nested too deeply") from None
