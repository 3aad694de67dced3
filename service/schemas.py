"""Request schemas (pydantic): they validate every request and produce /openapi.json.

They are built per application from its Settings, so the limits and defaults they enforce are the
ones /info shows and the OpenAPI document states. Unknown fields are refused (a typo such as
`temprature` is a 422 naming it, not a silently ignored setting). JSON bodies are validated
strictly (a string is not a number); query-string settings for plain-text requests arrive as
strings and are converted by the same schema in lax mode.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from service.config import Settings

MAX_STOP = 4  # stop sequences per request
MAX_STOP_CHARS = 64
MAX_LOGPROBS = 10  # alternatives per character (also capped at the vocabulary size)
MAX_SEED = 2**63 - 1

StopText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = StopText | Annotated[list[StopText], Field(max_length=MAX_STOP)]

STOP_DOC = (f"Stop before the first occurrence of this text (or of any of up to {MAX_STOP} texts); "
            "the stop text itself is not returned.")
PROMPT_DOC = ("Text to continue. Characters outside the model's vocabulary are replaced by their unaccented "
              "base form when the vocabulary has it (é -> e), otherwise dropped (usage.dropped_chars counts "
              "them); \\r\\n and \\r become \\n. An empty prompt starts as if after a newline.")


class Schemas:
    """The request models of one application."""

    def __init__(self, settings: Settings):
        s = settings

        class GenerateRequest(BaseModel):
            """POST /v1/generate as JSON, or as plain text with these fields in the query string."""

            model_config = ConfigDict(extra="forbid", strict=True, title="GenerateRequest")
            prompt: str = Field("", max_length=s.max_prompt_chars, description=PROMPT_DOC)
            max_chars: int = Field(s.default_max_chars, ge=1, le=s.max_chars, description="Characters to generate per choice (at most).")
            temperature: float = Field(s.default_temperature, ge=0, allow_inf_nan=False,
                                       description="Sampling temperature; 0 is greedy (always the most likely character).")
            top_k: int = Field(s.default_top_k, ge=0, le=1_000_000, description="Sample from the k most likely characters only (0: off).")
            top_p: float = Field(s.default_top_p, gt=0, le=1, description="Sample from the smallest set of characters whose probability reaches p (1: off).")
            seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Random seed; the same seed and settings give the same text. "
                                     "Omitted: the server draws one and returns it. Choice i uses seed + i.")
            stop: Stop | None = Field(None, description=STOP_DOC)
            n: int = Field(1, ge=1, le=s.max_n, description="Number of choices (independent continuations).")
            stream: bool = Field(False, description="Stream the text as server-sent events (plain text: chunked text) as it is generated.")
            logprobs: int = Field(0, ge=0, le=MAX_LOGPROBS, description="Return the log-probability of each generated character "
                                  "and of this many most likely alternatives (0: none).")

        class StreamOptions(BaseModel):
            model_config = ConfigDict(extra="forbid", strict=True)
            include_usage: bool = False

        class CompletionRequest(BaseModel):
            """POST /v1/completions, OpenAI's completions API; one token is one character."""

            model_config = ConfigDict(extra="forbid", strict=True, title="CompletionRequest")
            model: str | None = Field(None, description="Accepted and ignored (this server has one model; responses name it).")
            prompt: (Annotated[str, StringConstraints(max_length=s.max_prompt_chars)]
                     | Annotated[list[Annotated[str, StringConstraints(max_length=s.max_prompt_chars)]],
                                 Field(min_length=1, max_length=s.max_n)]) = Field("", description=PROMPT_DOC)
            max_tokens: int | None = Field(None, ge=1, le=s.max_chars, description=f"Characters to generate (default {s.default_max_chars}).")
            temperature: float | None = Field(None, ge=0, allow_inf_nan=False, description=f"Default {s.default_temperature}; 0 is greedy.")
            top_p: float | None = Field(None, gt=0, le=1, description=f"Default {s.default_top_p}.")
            top_k: int | None = Field(None, ge=0, le=1_000_000, description="Extension (as llama.cpp and vLLM): top-k filter, 0: off.")
            n: int | None = Field(None, ge=1, le=s.max_n, description="Choices per prompt.")
            stop: Stop | None = Field(None, description=STOP_DOC)
            seed: int | None = Field(None, ge=0, le=MAX_SEED)
            logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Top alternatives per character.")
            stream: bool | None = False
            stream_options: StreamOptions | None = None
            echo: bool | None = Field(False, description="Return the prompt before the completion.")
            user: str | None = Field(None, description="Accepted and ignored.")
            # OpenAI fields this server cannot honour: accepted only with their neutral values.
            suffix: str | None = None
            best_of: int | None = None
            presence_penalty: float | None = None
            frequency_penalty: float | None = None
            logit_bias: dict[str, float] | None = None

            @field_validator("suffix")
            @classmethod
            def _no_suffix(cls, v):
                if v:
                    raise ValueError("suffix is not supported by this server")
                return v

            @field_validator("best_of")
            @classmethod
            def _no_best_of(cls, v):
                if v not in (None, 1):
                    raise ValueError("best_of other than 1 is not supported by this server")
                return v

            @field_validator("presence_penalty", "frequency_penalty")
            @classmethod
            def _no_penalty(cls, v):
                if v not in (None, 0):
                    raise ValueError("penalties are not supported by this server (only 0)")
                return v

            @field_validator("logit_bias")
            @classmethod
            def _no_bias(cls, v):
                if v:
                    raise ValueError("logit_bias is not supported by this server")
                return v

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

