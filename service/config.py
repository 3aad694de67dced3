"""The service's settings: one table of CHARGEN_* environment variables, their defaults and limits.

Read by the gunicorn config in the master (bind, workers, threads) and by `create_app()` in every
worker (everything). Values arrive as strings and are converted and checked here, so a typo such as
CHARGEN_MAX_QUEUE=lots stops start-up with a message naming the variable. This module imports no
Flask and no TensorFlow (model/defaults.py imports nothing): the gunicorn master reads it before
forking.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from model.defaults import DEFAULTS, MAX_TEMPERATURE, MAX_TOP_K

PREFIX = "CHARGEN_"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ARTIFACT = ROOT / "artifacts" / "default"
# Variables read by other parts of the project; listed so they are not reported as unknown.
OTHER_VARIABLES = {"FRAME_ANCESTORS"}


class SettingsError(ValueError):
    """A CHARGEN_* variable has a value that cannot be used; the message names it."""


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    artifact: str = Field(str(DEFAULT_ARTIFACT), description="Artifact directory (or training run directory) to serve.")
    model_name: str = Field("", description="Name in responses and /v1/models (default: the artifact directory's name; RUN for RUN/best).")
    # limits
    max_prompt_chars: int = Field(4096, ge=1, le=1_000_000, description="Longest prompt, in characters.")
    max_chars: int = Field(4096, ge=1, le=1_000_000, description="Most characters one choice may ask for (max_chars, max_tokens).")
    max_n: int = Field(8, ge=1, le=1024, description="Most choices per request (n).")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body (larger: 413).")
    request_timeout: float = Field(300.0, gt=0, description="Deadline of a request in seconds, from arrival to the last character (queueing included).")
    # engine and queue, per worker
    max_batch: int = Field(64, ge=1, le=4096, description="Streams one worker steps together (engine batch slots).")
    max_queue: int = Field(128, ge=0, description="Requests one worker holds waiting for slots; beyond that: 429.")
    device: str = Field("cpu", pattern="^(cpu|cuda)$", description="Where the network runs: cpu, or cuda (ONNX Runtime's "
                        "CUDA provider, from onnxruntime-gpu; without it the CPU, with a warning in the log).")
    stream_interval: float = Field(0.02, ge=0, le=1, description="Least seconds between the chunks of a stream (the first "
                                   "goes out at once); characters generated meanwhile are sent together.")
    stream_chunk_rate: float = Field(400.0, gt=0, description="Most chunks per second one worker sends over all its streams: "
                                     "with many streams, each stream's chunks come further apart and carry more characters.")
    # defaults of the request fields (the built-in values are model/defaults.py's, which `chargen sample` uses too)
    default_max_chars: int = Field(DEFAULTS.max_chars, ge=1, description="max_chars (and max_tokens) when a request does not say.")
    default_temperature: float = Field(DEFAULTS.temperature, ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False,
                                       description="temperature when a request does not say.")
    default_top_k: int = Field(DEFAULTS.top_k, ge=0, le=MAX_TOP_K, description="top_k when a request does not say (0: off).")
    default_top_p: float = Field(DEFAULTS.top_p, gt=0, le=1, description="top_p when a request does not say (1: off).")
    # access
    api_key: str | None = Field(None, description="When set, /v1/* needs `Authorization: Bearer <key>`.")
    cors_origins: list[str] = Field(default_factory=list, description="Origins allowed to call /v1/* from a browser, comma separated, or *.")
    # gunicorn (read by service/gunicorn_conf.py; `chargen serve --bind/--workers` override)
    bind: str = Field("127.0.0.1:8000", description="Address to listen on.")
    workers: int = Field(1, ge=1, le=256, description="Worker processes; each loads the model and runs its own engine.")
    threads: int = Field(0, ge=0, description="Threads per worker, one per open request (0: max_batch + max_queue + 16).")
    timeout: int = Field(60, ge=1, description="Seconds a worker's main loop may hang before it is replaced (not a request limit).")
    graceful_timeout: int = Field(30, ge=1, description="Seconds open requests and streams get to finish after SIGTERM "
                                  "(drain) or SIGHUP (reload) before their worker is stopped (gunicorn's graceful_timeout).")
    # test-only
    load_delay: float = Field(0.0, ge=0, description="Test-only: seconds to wait before loading the model (to observe 503s).")

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value):
        return None if value in ("", None) else str(value)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",")]
        return [v.rstrip("/") for v in value if v]

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, value):
        for origin in value:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"{origin!r} is not an origin like https://example.org or *")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if self.default_max_chars > self.max_chars:
            raise ValueError(f"default_max_chars ({self.default_max_chars}) is above max_chars ({self.max_chars})")
        if self.max_n > self.max_batch:
            raise ValueError(f"max_n ({self.max_n}) is above max_batch ({self.max_batch}): one request's choices run in one batch")
        return self

    # ------------------------------------------------------------ derived

    @property
    def name(self) -> str:
        path = Path(self.artifact).absolute()
        # a training run's best artifact (RUN/best) is named after the run
        return self.model_name or (path.parent.name if path.name == "best" else path.name)

    @property
    def gunicorn_threads(self) -> int:
        # Every open request holds a thread (streams for their whole length), so there must be one
        # for each slot and each queue place, plus some to answer 429s, /health and /metrics at once.
        return self.threads or self.max_batch + self.max_queue + 16

    # ------------------------------------------------------------ reading

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> "Settings":
        """Settings from a mapping with upper-case names without the prefix (Flask's app.config,
        or the environment after stripping CHARGEN_); other keys are ignored."""
        fields = {name.upper(): name for name in cls.model_fields}
        data = {fields[key]: value for key, value in values.items() if key in fields}
        try:
            return cls(**data)
        except ValidationError as e:
            raise SettingsError(describe(e)) from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        return cls.from_mapping(prefixed(os.environ if environ is None else environ))

    def public(self) -> dict:
        """Settings safe to show (/info): no key, no gunicorn internals."""
        return {"max_batch": self.max_batch, "max_queue": self.max_queue, "request_timeout": self.request_timeout,
                "stream_interval": self.stream_interval, "stream_chunk_rate": self.stream_chunk_rate,
                "api_key_required": self.api_key is not None}


def prefixed(environ: Mapping[str, str]) -> dict[str, str]:
    return {key[len(PREFIX):]: value for key, value in environ.items() if key.startswith(PREFIX)}


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """CHARGEN_* variables that nothing reads: most likely typos."""
    known = {name.upper() for name in Settings.model_fields} | OTHER_VARIABLES
    return sorted(PREFIX + key for key in prefixed(os.environ if environ is None else environ) if key not in known)


def describe(error: ValidationError) -> str:
    lines = []
    for e in error.errors():
        where = PREFIX + str(e["loc"][0]).upper() if e["loc"] else "settings"
        got = f" (got {e['input']!r})" if e["loc"] and not isinstance(e["input"], dict) else ""
        lines.append(f"{where}: {e['msg']}{got}")
    return "invalid configuration: " + "; ".join(lines)
