"""The service's settings: one table of CHARGEN_* environment variables, their defaults and limits.

Read by the gunicorn config in the master (bind, workers, threads) and by `create_app()` in every
worker (everything). Values arrive as strings and are converted and checked here, so a typo such as
CHARGEN_MAX_QUEUE=lots stops start-up with a message naming the variable. The gunicorn master
reads it before forking, so it imports no Flask and none of the runtime: of the model's code, only
the plain records (model/records/).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from model.records.defaults import DEFAULTS, MAX_TEMPERATURE, MAX_TOP_K
from model.records.meta import artifact_in

PREFIX = "CHARGEN_"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ARTIFACT = ROOT / "artifacts" / "default"


# How /v1/chat/completions writes a conversation down: a play's layout (the shipped model learned
# Shakespeare's "NAME:\nspeech\n\n"), the speakers named by role.
CHAT_TEMPLATE = "{name}:\n{content}\n\n"
CHAT_NAMES = "system=SYSTEM,developer=SYSTEM,user=USER,assistant=ASSISTANT"
CHAT_ROLES = ("system", "developer", "user", "assistant")


# A model's name: in URLs (/v1/models/NAME), query strings, metric labels and CHARGEN_MODELS itself.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAME_RULE = "1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"

# A CSP source for frame-ancestors (CHARGEN_FRAME_ANCESTORS): a scheme-qualified origin, optionally
# with a *. subdomain wildcard and a port (https://*.example.org:8443), or * for anyone.
FRAME_ORIGIN = re.compile(r"^https?://(\*\.)?[A-Za-z0-9.-]+(:\d{1,5})?$")

# Settings whose values messages never repeat (a key with a stray space is still the key).
SECRET = {"api_key"}


class SettingsError(ValueError):
    """A CHARGEN_* variable has a value that cannot be used; the message names it."""


@dataclass(frozen=True)
class ModelSource:
    """One model to serve: its name and where its artifact is (as configured, not yet checked)."""

    name: str
    path: str  # an artifact directory, or a training run directory (its best/)
    origin: str  # the setting it came from, for messages: "CHARGEN_MODELS entry NAME=PATH", ...


@dataclass(frozen=True)
class Models:
    """Every model one server serves, in the order /v1/models lists them, and the default's name."""

    sources: tuple[ModelSource, ...]
    default: str

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.sources]

    def pairs(self) -> str:
        """The list as CHARGEN_MODELS NAME=PATH pairs (how the master hands its snapshots to workers)."""
        return ",".join(f"{m.name}={m.path}" for m in self.sources)


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    artifact: str = Field(str(DEFAULT_ARTIFACT), description="Artifact directory (or training run directory) to serve; "
                          "with CHARGEN_MODELS, only when set: then one more model, the default one.")
    model_name: str = Field("", description="Name of CHARGEN_ARTIFACT's model in responses and /v1/models (default: the "
                            "artifact directory's name; RUN for RUN/best).")
    models: str = Field("", description="Several models: comma-separated entries, each NAME=PATH (an artifact or training "
                        "run directory) or DIR (every subdirectory of DIR holding meta.json or best/meta.json is a model "
                        "named after the subdirectory).")
    default_model: str = Field("", description="The model used when a request names none (default: CHARGEN_ARTIFACT's "
                               "when it is set, else the first of CHARGEN_MODELS).")
    # limits
    max_prompt_chars: int = Field(4096, ge=1, le=1_000_000, description="Longest prompt, in characters.")
    max_chars: int = Field(4096, ge=1, le=1_000_000, description="Most characters one choice may ask for (max_chars, max_tokens).")
    max_n: int = Field(8, ge=1, le=1024, description="Most choices per request (n).")
    max_body_bytes: int = Field(1 << 20, ge=1024, le=1 << 30, description="Largest request body (larger: 413).")
    request_timeout: float = Field(300.0, gt=0, le=86400, allow_inf_nan=False, description="Deadline of a request in seconds, "
                                   "from arrival to the last character (queueing included); at most a day.")
    # engine and queue, per worker
    max_batch: int = Field(64, ge=1, le=4096, description="Streams one worker steps together (engine batch slots).")
    max_queue: int = Field(128, ge=0, le=10_000, description="Requests one worker holds waiting for slots; beyond that: 429.")
    device: str = Field("cpu", pattern="^(cpu|cuda)$", description="Where the network runs: cpu, or cuda (ONNX Runtime's "
                        "CUDA provider, from onnxruntime-gpu; without it the CPU, with a warning in the log).")
    precision: str = Field("auto", pattern="^(auto|int8|float32)$", description="Which graph each model runs: auto "
                           "(int8, model.int8.onnx, where the artifact has one that passed its quality gate; float32, "
                           "model.onnx, otherwise), int8 (a model without a passing int8 graph fails to load, saying "
                           "why) or float32. Scoring (/v1/score, echo logprobs) comes from the same graph.")
    stream_interval: float = Field(0.02, ge=0, le=1, allow_inf_nan=False, description="Least seconds between the chunks of a "
                                   "stream (the first goes out at once); characters generated meanwhile are sent together.")
    # At least 1: below, a stream's chunks could be minutes apart (a stream that delivers everything at its end).
    stream_chunk_rate: float = Field(400.0, ge=1, le=1_000_000, allow_inf_nan=False, description="Most chunks per second one "
                                     "worker sends over all its streams: with many streams, each stream's chunks come further "
                                     "apart and carry more characters.")
    # defaults of the request fields (the built-in values are model/records/defaults.py's, which `chargen sample` uses too)
    default_max_chars: int = Field(DEFAULTS.max_chars, ge=1, description="max_chars (and max_tokens) when a request does not say.")
    default_temperature: float = Field(DEFAULTS.temperature, ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False,
                                       description="temperature when a request does not say.")
    default_top_k: int = Field(DEFAULTS.top_k, ge=0, le=MAX_TOP_K, description="top_k when a request does not say (0: off).")
    default_top_p: float = Field(DEFAULTS.top_p, gt=0, le=1, allow_inf_nan=False,
                                 description="top_p when a request does not say (1: off).")
    # the prompt cache and chat completions
    prompt_cache_mb: float = Field(64.0, ge=0, le=1_000_000, allow_inf_nan=False, description="Size of each model's "
                                   "prompt-state cache in MiB, per worker (the state after recent prompts: a prompt that starts "
                                   "with one resumes there); 0: off.")
    chat_template: str = Field(CHAT_TEMPLATE, description="How /v1/chat/completions writes one message into the transcript: "
                               "{name} is the speaker's name (CHARGEN_CHAT_NAMES), {content} the message; \\n and \\t "
                               "written out stand for a newline and a tab.")
    chat_names: str = Field(CHAT_NAMES, description="The speakers' names per role in the transcript, comma separated ROLE=NAME "
                            "(roles: system, developer, user, assistant).")
    max_transcript_chars: int = Field(65536, ge=1, le=10_000_000, description="Longest chat transcript fed to the model; a longer "
                                      "one keeps its last this many characters (the oldest turns are cut).")
    # access
    api_key: str | None = Field(None, description="When set, /v1/* needs `Authorization: Bearer <key>`; set but empty is "
                                "refused (unset it to serve without a key).")
    cors_origins: list[str] = Field(default_factory=list, description="Origins allowed to call /v1/* from a browser, comma separated, or *.")
    frame_ancestors: list[str] = Field(default_factory=list, description="Sites that may show /embed in an iframe besides its "
                                       "own origin (service/page.py): origins separated by spaces or commas, or *.")
    # gunicorn (read by service/gunicorn_conf.py; `chargen serve --bind/--workers` override)
    bind: str = Field("127.0.0.1:8000", description="Address to listen on.")
    workers: int = Field(1, ge=1, le=256, description="Worker processes; each loads the model and runs its own engine.")
    threads: int = Field(0, ge=0, le=20_000, description="Threads per worker, one per open request (0: models x (max_batch + "
                         "max_queue) + 16).")
    timeout: int = Field(60, ge=1, le=3600, description="Seconds a worker's main loop may hang before it is replaced (not a "
                         "request limit).")
    client_timeout: int = Field(30, ge=1, le=3600, description="Seconds a request's reading waits for a client that "
                                "stops sending in the middle of its headers or body before the connection is closed.")
    graceful_timeout: int = Field(30, ge=1, le=86400, description="Seconds open requests and streams get to finish after "
                                  "SIGTERM (drain) or SIGHUP (reload) before their worker is stopped (gunicorn's "
                                  "graceful_timeout).")
    # test-only
    load_delay: float = Field(0.0, ge=0, le=600, allow_inf_nan=False, description="Test-only: seconds to wait before loading "
                              "the model (to observe 503s).")

    @field_validator("artifact")
    @classmethod
    def _check_artifact(cls, value):
        if not value.strip():  # read as a path, "" would be the current directory
            raise ValueError("set but empty: unset it to serve artifacts/default, or name an artifact directory")
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _check_key(cls, value):
        # Only an unset variable means "no key": an empty one is more likely CHARGEN_API_KEY="$KEY"
        # with KEY unset, which must not turn authentication off.
        if value is None:
            return None
        value = str(value)
        if not value:
            raise ValueError("set but empty: unset it to serve without a key")
        # The token of a request's Authorization header is trimmed, so such a key would refuse everything.
        if not value.strip():
            raise ValueError("is only whitespace, which no request can send: unset it to serve without a key")
        if value != value.strip():
            raise ValueError("starts or ends with whitespace, which no request can send: remove it")
        return value

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

    @field_validator("frame_ancestors", mode="before")
    @classmethod
    def _split_frame_ancestors(cls, value):
        if isinstance(value, str):
            value = re.split(r"[\s,]+", value)
        return [v.rstrip("/") for v in value if v]

    @field_validator("frame_ancestors")
    @classmethod
    def _check_frame_ancestors(cls, value):
        for source in value:
            if source != "*" and not FRAME_ORIGIN.match(source):
                raise ValueError(f"{source!r} is not an origin like https://blog.example (or https://*.example.org, "
                                 "or * for any site)")
        return value

    @field_validator("chat_template", mode="before")
    @classmethod
    def _escapes(cls, value):
        # an environment variable rarely holds a newline: \n and \t written out stand for them
        return value.replace("\\n", "\n").replace("\\t", "\t") if isinstance(value, str) else value

    @field_validator("chat_template")
    @classmethod
    def _check_chat_template(cls, value):
        if value.count("{content}") != 1:
            raise ValueError("must hold {content} exactly once (where a message's text goes)")
        if "{name}" in value.split("{content}")[1] and "{name}" not in value.split("{content}")[0]:
            raise ValueError("{name} must come before {content} (the reply is what follows the assistant's name)")
        return value

    @field_validator("chat_names")
    @classmethod
    def _check_chat_names(cls, value):
        chat_names(value)
        return value

    @field_validator("models")
    @classmethod
    def _check_models(cls, value):
        # the syntax; the directories are read by models_to_serve()
        if value and not _entries(value):  # unset and empty mean "CHARGEN_ARTIFACT alone"; " " or "," is a mistake
            raise ValueError("names no model: give comma-separated NAME=PATH or DIR entries, or unset it")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if self.default_max_chars > self.max_chars:
            raise ValueError(f"{PREFIX}DEFAULT_MAX_CHARS ({self.default_max_chars}) is above {PREFIX}MAX_CHARS "
                             f"({self.max_chars})")
        if self.max_n > self.max_batch:
            raise ValueError(f"{PREFIX}MAX_N ({self.max_n}) is above {PREFIX}MAX_BATCH ({self.max_batch}): one request's "
                             "choices run in one batch")
        return self

    # ------------------------------------------------------------ derived

    @property
    def chat_speakers(self) -> dict[str, str]:
        """Each role's name in chat transcripts."""
        return chat_names(self.chat_names)

    @property
    def name(self) -> str:
        path = Path(self.artifact).absolute()
        # a training run's best artifact (RUN/best) is named after the run
        return self.model_name or (path.parent.name if path.name == "best" else path.name)

    def gunicorn_threads(self, models: int = 1) -> int:
        # Every open request holds a thread (streams for their whole length), so there must be one
        # for each slot and each queue place of every model, plus some to answer 429s, /health and
        # /metrics at once.
        return self.threads or models * (self.max_batch + self.max_queue) + 16

    def models_to_serve(self) -> Models:
        """The models to serve, read now (a CHARGEN_MODELS directory is listed on every call: a reload
        finds the models added since). CHARGEN_ARTIFACT alone: one model. CHARGEN_MODELS: its entries
        in order, a directory's models by name; CHARGEN_ARTIFACT, when set as well, comes first.
        Raises SettingsError naming the variable for a bad name, a name given twice, a directory that
        is missing or holds no model, or a default that is not among them."""
        sources = []
        if not self.models or "artifact" in self.model_fields_set:
            sources.append(ModelSource(self.name, self.artifact, "CHARGEN_ARTIFACT" + (
                " (named by CHARGEN_MODEL_NAME)" if self.model_name else "")))
        for name, path in _entries(self.models):
            sources += [ModelSource(name, path, f"CHARGEN_MODELS entry {name}={path}")] if name else _listed(path)
        seen: dict[str, ModelSource] = {}
        for m in sources:
            if not MODEL_NAME.fullmatch(m.name):
                hint = "; name it with CHARGEN_MODEL_NAME" if m.origin == "CHARGEN_ARTIFACT" else ""
                raise SettingsError(f"invalid configuration: {m.origin}: {m.name!r} is not a model name ({NAME_RULE}){hint}")
            if m.name in seen:
                raise SettingsError(f"invalid configuration: {m.origin}: the model name {m.name!r} is taken twice "
                                    f"(also by {seen[m.name].origin}); names must differ")
            seen[m.name] = m
        default = self.default_model or sources[0].name
        if default not in seen:
            raise SettingsError(f"invalid configuration: CHARGEN_DEFAULT_MODEL: {default!r} is not one of the models "
                                f"served ({', '.join(seen)})")
        return Models(tuple(sources), default)

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
                "api_key_required": self.api_key is not None, "prompt_cache_mb": self.prompt_cache_mb,
                "chat_template": self.chat_template, "chat_names": self.chat_speakers,
                "max_transcript_chars": self.max_transcript_chars}


def _entries(value: str) -> list[tuple[str, str]]:
    """CHARGEN_MODELS -> [(name, path)] for NAME=PATH entries, [("", dir)] for directories."""
    entries = []
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue  # a trailing or doubled comma
        name, eq, path = (p.strip() for p in entry.partition("="))
        if not eq:
            entries.append(("", entry))
        elif not MODEL_NAME.fullmatch(name):
            raise ValueError(f"in {entry!r}, {name!r} is not a model name ({NAME_RULE})")
        elif not path:
            raise ValueError(f"{entry!r} names no path (NAME=PATH)")
        else:
            entries.append((name, path))
    return entries


def _listed(directory: str) -> list[ModelSource]:
    """The models of a CHARGEN_MODELS directory: its subdirectories that hold meta.json (an artifact)
    or best/meta.json (a training run), by name. Hidden entries and other subdirectories (lost+found)
    are left out."""
    where = f"CHARGEN_MODELS entry {directory}"
    root = Path(directory)
    if not root.is_dir():
        raise SettingsError(f"invalid configuration: {where}: no such directory (an entry without '=' is a directory "
                            "whose subdirectories are artifacts; name a single artifact as NAME=PATH)")
    if artifact_in(root) is not None:
        raise SettingsError(f"invalid configuration: {where}: is an artifact itself, not a directory of artifacts; "
                            f"name it: NAME={directory}")
    try:
        found = sorted(p for p in root.iterdir() if not p.name.startswith(".") and p.is_dir() and artifact_in(p) is not None)
    except OSError as e:
        raise SettingsError(f"invalid configuration: {where}: cannot list it: {e.strerror or e}") from None
    if not found:
        raise SettingsError(f"invalid configuration: {where}: holds no model (no subdirectory with meta.json or "
                            "best/meta.json)")
    return [ModelSource(p.name, str(p), f"CHARGEN_MODELS directory {directory} (its subdirectory {p.name})") for p in found]


def chat_names(value: str) -> dict[str, str]:
    """CHARGEN_CHAT_NAMES -> {role: name}; the roles not named keep their default names."""
    names = dict(entry.split("=", 1) for entry in CHAT_NAMES.split(","))
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        role, eq, name = entry.partition("=")
        if not eq or role.strip() not in CHAT_ROLES:
            raise ValueError(f"{entry!r} is not ROLE=NAME with a role among {', '.join(CHAT_ROLES)}")
        names[role.strip()] = name.strip()
    return names


def prefixed(environ: Mapping[str, str]) -> dict[str, str]:
    return {key[len(PREFIX):]: value for key, value in environ.items() if key.startswith(PREFIX)}


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """CHARGEN_* variables that nothing reads: most likely typos."""
    known = {name.upper() for name in Settings.model_fields}
    return sorted(PREFIX + key for key in prefixed(os.environ if environ is None else environ) if key not in known)


def describe(error: ValidationError) -> str:
    lines = []
    for e in error.errors():
        message = e["msg"].removeprefix("Value error, ")
        if not e["loc"]:  # a check of several settings (_consistent): its message names them
            lines.append(message)
            continue
        field = str(e["loc"][0])
        got = f" (got {e['input']!r})" if field not in SECRET and not isinstance(e["input"], dict) else ""
        lines.append(f"{PREFIX}{field.upper()}: {message}{got}")
    return "invalid configuration: " + "; ".join(lines)
