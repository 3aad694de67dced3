"""Request schemas (pydantic): they validate every request and produce /openapi.json.

They are built per application from its Settings, so the limits and defaults they enforce are the
ones /info shows and the OpenAPI document states. Unknown fields are refused (a typo such as
`temprature` is a 422 naming it, not a silently ignored setting). JSON bodies are validated
strictly (a string is not a number; 3.0 is the integer 3, as JSON Schema counts it); query-string
settings for plain-text requests arrive as strings and are converted by the same schema in lax
mode. Every rule the schemas enforce is stated in the document too, rules across fields included,
so that a request valid by /openapi.json is accepted (tests/test_fuzz.py holds them to it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, field_validator, model_validator
from pydantic_core import PydanticCustomError

from model.defaults import MAX_TEMPERATURE, MAX_TOP_K

if TYPE_CHECKING:
    from service.config import Settings

MAX_STOP = 4  # stop sequences per request
MAX_STOP_CHARS = 64
MAX_LOGPROBS = 10  # alternatives per character (also capped at the vocabulary size)
MAX_SEED = 2**63 - 1
# The fixed bounds of the request fields (/info shows them; the configurable ones are its limits).
BOUNDS = {"max_temperature": MAX_TEMPERATURE, "max_top_k": MAX_TOP_K, "max_logprobs": MAX_LOGPROBS,
          "max_stop": MAX_STOP, "max_stop_chars": MAX_STOP_CHARS, "max_seed": MAX_SEED}
DEFAULTED = {"max_tokens", "temperature", "top_p", "top_k", "n"}  # CompletionRequest fields null leaves at their defaults
# OpenAI fields this server cannot honour, with the one value (besides null) it accepts for each.
NEUTRAL = {"suffix": "", "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}}


def _whole_float(value):
    # JSON Schema counts 83342.0 as an integer, and /openapi.json says "integer": so it is one.
    return int(value) if isinstance(value, float) and value.is_integer() else value


Whole = Annotated[int, BeforeValidator(_whole_float)]  # an integer; 1.5 is refused, 3.0 is 3
# (not `Whole | None`: pydantic would write its bounds as ge/le into the document, not as minimum/maximum)
WholeOrNull = Annotated[int | None, BeforeValidator(_whole_float)]
StopText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = StopText | Annotated[list[StopText], Field(max_length=MAX_STOP)]

STOP_DOC = (f"Stop before the first occurrence of this text (or of any of up to {MAX_STOP} texts); "
            "the stop text itself is not returned.")
PROMPT_DOC = ("Text to continue. Characters outside the model's vocabulary are replaced by their unaccented "
              "base form when the vocabulary has it (é -> e), otherwise dropped (usage.dropped_chars counts "
              "them); \\r\\n and \\r become \\n. An empty prompt starts as if after a newline.")
TEMPERATURE_DOC = f"Sampling temperature, 0 to {MAX_TEMPERATURE:g}; 0 is greedy (always the most likely character)."
TOP_K_DOC = "Sample from the k most likely characters only (0: off; k at or above the vocabulary size: off)."


def completion_document(max_n: int):
    """What CompletionRequest's JSON Schema says beyond its fields' types, for /openapi.json: null
    is accepted where it means the default, prompts x n is at most max_n, and echo takes no
    logprobs. The validators below enforce the same."""
    rules = [{"not": {"required": ["echo", "logprobs"],
                      "properties": {"echo": {"const": True}, "logprobs": {"type": "integer", "minimum": 1}}}}]
    for k in range(2, max_n + 1):
        if max_n // k < max_n // (k - 1):  # where the most n for k prompts drops
            rules.append({"if": {"required": ["prompt"], "properties": {"prompt": {"type": "array", "minItems": k}}},
                          "then": {"properties": {"n": {"maximum": max_n // k}}}})

    def amend(schema: dict) -> None:
        for name in DEFAULTED:
            schema["properties"][name]["type"] = [schema["properties"][name]["type"], "null"]
        schema["allOf"] = rules

    return amend


def _neutral(name: str):
    value = NEUTRAL[name]
    return Field(None, description=f"Not supported: accepted only as {value!r} or null.", json_schema_extra={"enum": [value, None]})


class Schemas:
    """The request models of one application."""

    def __init__(self, settings: Settings):
        s = settings

        class GenerateRequest(BaseModel):
            """POST /v1/generate as JSON, or as plain text with these fields in the query string."""

            model_config = ConfigDict(extra="forbid", strict=True, title="GenerateRequest")
            prompt: str = Field("", max_length=s.max_prompt_chars, description=PROMPT_DOC)
            max_chars: Whole = Field(s.default_max_chars, ge=1, le=s.max_chars, description="Characters to generate per choice (at most).")
            temperature: float = Field(s.default_temperature, ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False, description=TEMPERATURE_DOC)
            top_k: Whole = Field(s.default_top_k, ge=0, le=MAX_TOP_K, description=TOP_K_DOC)
            top_p: float = Field(s.default_top_p, gt=0, le=1, description="Sample from the smallest set of characters whose probability reaches p (1: off).")
            seed: WholeOrNull = Field(None, ge=0, le=MAX_SEED, description="Random seed; the same seed and settings give the same text. "
                                       "Omitted: the server draws one and returns it. Choice i uses seed + i.")
            stop: Stop | None = Field(None, description=STOP_DOC)
            n: Whole = Field(1, ge=1, le=s.max_n, description="Number of choices (independent continuations).")
            stream: bool = Field(False, description="Stream the text as server-sent events (plain text: chunked text) as it is generated.")
            logprobs: Whole = Field(0, ge=0, le=MAX_LOGPROBS, description="Return the log-probability of each generated character "
                                    "and of this many most likely alternatives (0: none).")

        class StreamOptions(BaseModel):
            model_config = ConfigDict(extra="forbid", strict=True)
            include_usage: bool = False

        class CompletionRequest(BaseModel):
            """POST /v1/completions, OpenAI's completions API; one token is one character."""

            model_config = ConfigDict(extra="forbid", strict=True, title="CompletionRequest",
                                      json_schema_extra=completion_document(s.max_n))
            model: str | None = Field(None, description="Accepted and ignored (this server has one model; responses name it).")
            prompt: (Annotated[str, StringConstraints(max_length=s.max_prompt_chars)]
                     | Annotated[list[Annotated[str, StringConstraints(max_length=s.max_prompt_chars)]],
                                 Field(min_length=1, max_length=s.max_n)]) = Field("", description=PROMPT_DOC)
            max_tokens: Whole = Field(s.default_max_chars, ge=1, le=s.max_chars, description="Characters to generate.")
            temperature: float = Field(s.default_temperature, ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False, description=TEMPERATURE_DOC)
            top_p: float = Field(s.default_top_p, gt=0, le=1)
            top_k: Whole = Field(s.default_top_k, ge=0, le=MAX_TOP_K, description="Extension (as llama.cpp and vLLM). " + TOP_K_DOC)
            n: Whole = Field(1, ge=1, le=s.max_n, description=f"Choices per prompt; prompts x n is at most {s.max_n}.")
            stop: Stop | None = Field(None, description=STOP_DOC)
            seed: WholeOrNull = Field(None, ge=0, le=MAX_SEED)
            logprobs: WholeOrNull = Field(None, ge=0, le=MAX_LOGPROBS, description="Top alternatives per character (not with echo).")
            stream: bool | None = False
            stream_options: StreamOptions | None = None
            echo: bool | None = Field(False, description="Return the prompt before the completion.")
            user: str | None = Field(None, description="Accepted and ignored.")
            suffix: str | None = _neutral("suffix")
            best_of: WholeOrNull = _neutral("best_of")
            presence_penalty: float | None = _neutral("presence_penalty")
            frequency_penalty: float | None = _neutral("frequency_penalty")
            logit_bias: dict[str, float] | None = _neutral("logit_bias")

            @model_validator(mode="before")
            @classmethod
            def _null_is_default(cls, data):
                """OpenAI's API reads null as "not given": such fields take their defaults."""
                if isinstance(data, dict):
                    return {k: v for k, v in data.items() if not (v is None and k in DEFAULTED)}
                return data

            # The rules across fields are checked on the later field, which sees the earlier ones
            # (info.data, in declaration order), so the error names it.
            @field_validator("n")
            @classmethod
            def _fits_one_request(cls, n, info):
                prompt = info.data.get("prompt")
                if isinstance(prompt, list) and len(prompt) * n > s.max_n:
                    raise PydanticCustomError("out_of_range", f"{len(prompt)} prompts x n={n} is more than the {s.max_n} "
                                              "choices a request may have (CHARGEN_MAX_N)")
                return n

            @field_validator("echo")
            @classmethod
            def _echo_without_logprobs(cls, echo, info):
                if echo and info.data.get("logprobs"):
                    raise PydanticCustomError("unsupported", "echo with logprobs is not supported (the prompt's characters are not scored)")
                return echo

            @field_validator(*NEUTRAL)
            @classmethod
            def _neutral_only(cls, value, info):
                neutral = NEUTRAL[info.field_name]
                if value is not None and value != neutral:
                    raise ValueError(f"{info.field_name} is not supported by this server (only {neutral!r} or null)")
                return value

        self.settings = settings
        self.generate = GenerateRequest
        self.completion = CompletionRequest


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, rate_limit_error, unavailable_error, "
                                  "timeout_error or server_error")
    param: str | None = Field(description="The request field at fault, when there is one.")
    code: str


class ErrorResponse(BaseModel):
    """The body of every error response."""

    error: ErrorDetail

