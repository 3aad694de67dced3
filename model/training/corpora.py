"""The known corpora (corpora/manifest.json) and fetching a corpus over http(s): what `chargen
prepare` (model/training/prepare.py) and a training run given a corpus by name (model/training/data.py)
both use.
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass, fields
from pathlib import Path

# corpora/ sits beside the package in the source tree (an editable install imports from there)
MANIFEST = Path(__file__).resolve().parents[2] / "corpora" / "manifest.json"
DEFAULT_TIMEOUT = 30.0  # seconds without a byte from the server before giving up
DEFAULT_MAX_BYTES = 512 * 2**20


class PrepareError(ValueError):
    """A source that cannot be prepared; the message names it and says why."""


@dataclass(frozen=True)
class KnownCorpus:
    name: str
    file: str
    url: str
    sha256: str
    size_bytes: int
    license: str = ""
    description: str = ""


def load_manifest(path: str | Path = MANIFEST) -> dict[str, KnownCorpus]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        wanted = {f.name for f in fields(KnownCorpus)} - {"name"}  # other keys are for people reading it
        return {name: KnownCorpus(name=name, **{k: v for k, v in entry.items() if k in wanted})
                for name, entry in data["corpora"].items()}
    except FileNotFoundError:
        raise PrepareError(f"{path}: corpus manifest not found (it ships in the source tree; install with pip install -e .)") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise PrepareError(f"{path}: invalid corpus manifest: {type(e).__name__}: {e}") from None


def fetch(url: str, *, timeout: float = DEFAULT_TIMEOUT, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The body of an http(s) URL, at most `max_bytes`; every failure is a PrepareError naming the URL."""
    request = urllib.request.Request(url, headers={"User-Agent": "chargen-prepare"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise PrepareError(f"{url}: {int(declared):,} bytes, more than the limit of {max_bytes:,} bytes (raise --max-mb)")
            chunks, size = [], 0
            while chunk := response.read(1 << 16):
                size += len(chunk)
                if size > max_bytes:
                    raise PrepareError(f"{url}: more than the limit of {max_bytes:,} bytes (raise --max-mb)")
                chunks.append(chunk)
            return b"".join(chunks)
    except PrepareError:
        raise
    except urllib.error.HTTPError as e:
        raise PrepareError(f"{url}: the server answered HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, (TimeoutError, socket.timeout)):
            raise PrepareError(f"{url}: no answer within {timeout:g} s") from None
        raise PrepareError(f"{url}: cannot be fetched: {e.reason}") from None
    except (TimeoutError, socket.timeout):
        raise PrepareError(f"{url}: no answer within {timeout:g} s") from None
    except (OSError, ValueError, http.client.HTTPException) as e:  # reset, malformed URL, truncated body...
        raise PrepareError(f"{url}: cannot be fetched: {type(e).__name__}: {e}") from None
