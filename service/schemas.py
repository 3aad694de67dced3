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

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, field_validator, model_validator
from pydantic_core import PydanticCustomError

from model.records.defaults import MAX_TEMPERATURE, MAX_TOP_K
from model.runtime.constraints import MAX_SOURCE_CHARS as MAX_CONSTRAINT_CHARS
from model.runtime.sampling import MAX_BIAS, MAX_PENALTY, MAX_REPETITION_PENALTY, MAX_REPETITION_WINDOW, OFF

if TYPE_CHECKING:
    from service.config import Models, Settings

MAX_STOP = 4  # stop sequences per request
MAX_STOP_CHARS = 64
MAX_LOGPROBS = 10  # alternatives per character (also capped at the vocabulary size)
MAX_SEED = 2**63 - 1
MAX_LOGIT_BIAS = 300  # entries of logit_bias (OpenAI's limit)
MAX_BIAS_KEY = 64  # characters of one logit_bias key
MAX_MESSAGES = 1024  # messages of one chat request
MAX_ID = 2**31 - 1  # a character id (/v1/detokenize); ids at or beyond the vocabulary size are reported, not errors
# OpenAI's bound on its endpoints, so that a request this server accepts is one OpenAI's API accepts
# too; /v1/generate keeps model.records.defaults.MAX_TEMPERATURE.
MAX_OPENAI_TEMPERATURE = 2.0
# The fixed bounds of the request fields (/info shows them; the configurable ones are its limits).
BOUNDS = {"max_temperature": MAX_TEMPERATURE, "max_openai_temperature": MAX_OPENAI_TEMPERATURE, "max_top_k": MAX_TOP_K,
          "max_logprobs": MAX_LOGPROBS, "max_stop": MAX_STOP, "max_stop_chars": MAX_STOP_CHARS, "max_seed": MAX_SEED, "max_penalty": MAX_PENALTY,
          "max_repetition_penalty": MAX_REPETITION_PENALTY, "max_repetition_window": MAX_REPETITION_WINDOW,
          "max_logit_bias": MAX_BIAS, "max_logit_bias_entries": MAX_LOGIT_BIAS, "max_messages": MAX_MESSAGES,
          "max_constraint_chars": MAX_CONSTRAINT_CHARS}
# The fields of the sampling adjustments, at the sampler's values that turn them off (their defaults;
# logit_bias is a JSON object here).
ADJUSTMENTS = {**{name: OFF[name] for name in ("presence_penalty", "frequency_penalty", "repetition_penalty",
                                                 "repetition_window", "min_p")}, "logit_bias": {}}
# OpenAI request fields that null leaves at their defaults (OpenAI's API reads null as "not given").
DEFAULTED = {"max_tokens", "temperature", "top_p", "top_k", "n", *ADJUSTMENTS}
CHAT_DEFAULTED = DEFAULTED | {"max_completion_tokens", "logprobs", "top_logprobs"}
# OpenAI fields this server cannot honour, with the one value (besides null) it accepts for each.
NEUTRAL = {"suffix": ""}
# OpenAI chat fields for what a character model does not do (tools, audio, predicted outputs, search):
# accepted only as null, so a request that needs them is refused by name instead of being
# answered as if they had been honoured.
CHAT_UNSUPPORTED = {"tools": "this server calls no tools", "tool_choice": "this server calls no tools",
                    "parallel_tool_calls": "this server calls no tools", "functions": "this server calls no functions",
                    "function_call": "this server calls no functions", "audio": "a character model writes no audio",
                    "prediction": "predicted outputs are not used", "web_search_options": "this server searches nothing"}

# Responses API fields for what this server does not do: accepted only as null, refused by name otherwise.
RESPONSES_UNSUPPORTED = {"tools": "this server calls no tools", "tool_choice": "this server calls no tools",
                         "parallel_tool_calls": "this server calls no tools", "max_tool_calls": "this server calls no tools",
                         "previous_response_id": "this server stores no responses; send the conversation in input",
                         "conversation": "this server stores no conversations; send the conversation in input",
                         "reasoning": "a character model does not reason", "include": "there is nothing more to include",
                         "background": "responses run while the request waits", "prompt": "this server stores no prompts"}
RESPONSES_DEFAULTED = {"temperature", "top_p", "top_k", *ADJUSTMENTS}  # null: the default, as OpenAI reads it


MAX_IGNORED_ITEMS = 256  # items of a list accepted only to be ignored (a previous response's annotations, logprobs)


def _whole_float(value):
    # JSON Schema counts 83342.0 as an integer, and /openapi.json says "integer": so it is one.
    return int(value) if isinstance(value, float) and value.is_integer() else value


WHOLE = BeforeValidator(_whole_float)
Whole = Annotated[int, WHOLE]  # an integer; 1.5 is refused, 3.0 is 3
# (not `Whole | None`: pydantic would write its bounds as ge/le into the document, not as minimum/maximum)
WholeOrNull = Annotated[int | None, WHOLE]
StopText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = StopText | Annotated[list[StopText], Field(max_length=MAX_STOP)]

STOP_DOC = (f"Stop before the first occurrence of this text (or of any of up to {MAX_STOP} texts); "
            "the stop text itself is not returned.")
PROMPT_DOC = ("Text to continue. Characters outside the model's vocabulary are replaced by their unaccented "
              "base form when the vocabulary has it (é -> e), otherwise dropped (usage.dropped_chars counts "
              "them); \\r\\n and \\r become \\n. An empty prompt starts as if after a newline.")
TEMPERATURE_DOC = f"Sampling temperature, 0 to {MAX_TEMPERATURE:g}; 0 is greedy (always the most likely character)."
OPENAI_TEMPERATURE_DOC = (f"Sampling temperature, 0 to {MAX_OPENAI_TEMPERATURE:g} as in OpenAI's API (/v1/generate allows up "
                          f"to {MAX_TEMPERATURE:g}); 0 is greedy (always the most likely character).")
TOP_K_DOC = "Sample from the k most likely characters only (0: off; k at or above the vocabulary size: off)."
LOGIT_BIAS_DOC = (f"Added to the logits of characters before sampling, -{MAX_BIAS:g} (never) to {MAX_BIAS:g} (always). "
                  "A key of decimal digits is a character id as POST /v1/tokenize gives it; any other key is text, each of "
                  "whose characters gets the bias (outside the vocabulary: the prompt's rule, replaced by the base form or "
                  "dropped). Ids at or beyond the vocabulary size and dropped characters change nothing (as llama.cpp); "
                  f"biases of one character add up, within ±{MAX_BIAS:g}.")
# The sampling fields of the three generation requests (/v1/generate, /v1/completions,
# /v1/chat/completions); each request gives the default (the application's) and, where it says
# more, its own description. The OpenAI endpoints bound the temperature as OpenAI does. (Bounds stand
# before WHOLE: after it, pydantic would write them as ge/le, as for `Whole | None`.)
Temperature = Annotated[float, Field(ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False, description=TEMPERATURE_DOC)]
OpenAITemperature = Annotated[float, Field(ge=0, le=MAX_OPENAI_TEMPERATURE, allow_inf_nan=False, description=OPENAI_TEMPERATURE_DOC)]
TopK = Annotated[int, Field(ge=0, le=MAX_TOP_K, description=TOP_K_DOC), WHOLE]
TopP = Annotated[float, Field(gt=0, le=1, description="Sample from the smallest set of characters whose probability reaches p (1: off).")]
Seed = Annotated[int | None, Field(ge=0, le=MAX_SEED), WHOLE]
StopOrNull = Annotated[Stop | None, Field(description=STOP_DOC)]
BiasKey = Annotated[str, StringConstraints(min_length=1, max_length=MAX_BIAS_KEY)]
Bias = Annotated[float, Field(ge=-MAX_BIAS, le=MAX_BIAS, allow_inf_nan=False)]

# ---------------------------------------------------------------- structured output
# A constraint makes the generated text match a pattern exactly (model.runtime.constraints compiles it
# over the model's vocabulary when the request arrives). The document states the shape of each field;
# whether a pattern compiles for the model at hand (its characters, its size once compiled) the
# server says with a 422 naming the field, which no JSON Schema can state.
CONSTRAINT_FIELDS = ("regex", "grammar", "json_schema", "response_format")
MASK_DOC = (" With a constraint (regex, grammar, json_schema, response_format) they are of the distribution the "
            "character was drawn from: after the constraint's mask, renormalized over the characters it allows (a "
            "character it forces has log-probability 0).")
ENDING_DOC = ("A constrained choice ends with finish_reason stop when its text is a whole match that no character "
              "continues, or a whole match where the model picked a character that does not continue it (that "
              "character is left out: the model chose to end there), or at a stop sequence; with length at max_chars. "
              "Its `incomplete` says whether the text stopped short of a whole match (then it is the start of one).")
REGEX_DOC = ("Constrain the generated text (not the prompt) to match this regular expression as a whole. "
             "Rust's regex syntax (Python's re without lookaround and backreferences); the characters it needs must "
             "be in the model's vocabulary (else a 422 naming them). " + ENDING_DOC)
GRAMMAR_DOC = ("Constrain the generated text to this grammar, in llama.cpp's GBNF (rules `name ::= ...`, the start "
               "rule `root`, alternation `|`, grouping, \"literals\" with escapes, [character classes] with ranges "
               "and negation, ?, *, +, {m,n}, # comments). " + ENDING_DOC)
JSON_SCHEMA_DOC = ("Constrain the generated text to JSON valid under this JSON Schema (the model's vocabulary must "
                   "have the characters JSON needs, such as { and \", else a 422 naming them). " + ENDING_DOC)
Pattern = Annotated[str, StringConstraints(min_length=1, max_length=MAX_CONSTRAINT_CHARS)]  # a regex or a GBNF grammar
JsonSchema = dict[str, Any] | bool  # a schema is an object, or true (any value) or false (none)


class TextFormat(BaseModel):
    """No constraint."""

    model_config = ConfigDict(extra="forbid", strict=True, title="TextFormat")
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    """Any JSON object."""

    model_config = ConfigDict(extra="forbid", strict=True, title="JsonObjectFormat")
    type: Literal["json_object"]


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, title="JsonSchemaSpec")
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = Field(description="The schema's name (OpenAI's rule: "
                                                                                     "letters, digits, _ and -, at most 64).")
    description: str | None = Field(None, description="Accepted and ignored (the model reads no instructions).")
    schema_: JsonSchema | None = Field(None, alias="schema", description="The JSON Schema the text must be valid "
                                       "under; omitted: any JSON object.")
    strict: bool | None = Field(None, description="Accepted; the schema is always kept exactly, whatever its value.")


class JsonSchemaFormat(BaseModel):
    """JSON valid under a JSON Schema."""

    model_config = ConfigDict(extra="forbid", strict=True, title="JsonSchemaFormat")
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]
RESPONSE_FORMAT_DOC = ("OpenAI's: {\"type\": \"text\"} (no constraint), {\"type\": \"json_object\"} (any JSON object) or "
                       "{\"type\": \"json_schema\", \"json_schema\": {\"name\", \"schema\", \"strict\"}}. The JSON formats "
                       "need a model whose vocabulary has JSON's characters (else a 422 naming them). " + ENDING_DOC)
ANY_OBJECT = {"type": "object"}  # what json_object means, as a JSON Schema


def _is_constraint(name: str, value) -> bool:
    return value is not None and not (name == "response_format" and value.type == "text")


def constraint_of(req) -> tuple[str, str, str | dict] | None:
    """The request's constraint as (field, kind, source) for model.runtime.constraints.compile_constraint,
    or None; the schemas have made sure there is at most one."""
    for name in CONSTRAINT_FIELDS:
        value = getattr(req, name, None)
        if not _is_constraint(name, value):
            continue
        if name != "response_format":
            return name, name, value
        if value.type == "json_object" or value.json_schema.schema_ is None:
            return name, "json_schema", ANY_OBJECT
        return name, "json_schema", value.json_schema.schema_
    return None


def _one_constraint(cls, value, info):
    """At most one constraint per request, and no constraint field on a request that only scores
    (echo, max_tokens 0; response_format {"type": "text"} too, as the document's rule is by presence).
    Checked on each constraint field, which sees the fields declared before it (info.data)."""
    name = info.field_name
    if value is None:
        return value
    if _is_constraint(name, value):
        for other in CONSTRAINT_FIELDS:
            if other != name and _is_constraint(other, info.data.get(other)):
                raise PydanticCustomError("invalid_value", f"{other} and {name} cannot be combined: a request takes at most "
                                          "one constraint (regex, grammar, json_schema or response_format)")
    if info.data.get("echo"):
        raise PydanticCustomError("invalid_value", f"{name} cannot be combined with echo: the echoed prompt is not written "
                                  "under a constraint")
    if info.data.get("max_tokens") == 0:
        raise PydanticCustomError("invalid_value", f"{name} cannot be combined with max_tokens 0: nothing is generated "
                                  "to constrain")
    return value


# What the document says of a request with a constraint (_one_constraint enforces it). The constraint
# fields take no null on the endpoints with rules across them, so that a field's presence is what a
# rule looks at: the rules are then dependentSchemas, which the fuzzer's generator (tests/test_fuzz.py)
# can still model beside CompletionRequest's other rules (it gives up when three if/then rules are
# added to them).
_TEXT_OR_NULL = {"properties": {"type": {"const": "text"}}}  # a response_format that constrains nothing ("properties" holds for null)
_NOT_SCORING = {"echo": {"enum": [False, None]}, "max_tokens": {"minimum": 1}}  # null passes "minimum"


def constraint_document(names: tuple[str, ...], *, scoring: bool = False) -> dict:
    """The document's statement of _one_constraint for a request with the constraint fields `names`
    (response_format, if there, last): a field present leaves the later ones absent (response_format:
    absent or text); with `scoring`, any of them present needs echo off and max_tokens above 0."""
    off = _NOT_SCORING if scoring else {}
    dependent = {}
    for i, name in enumerate(names):
        later = {n: _TEXT_OR_NULL if n == "response_format" else False for n in names[i + 1:]}
        if later or off:
            dependent[name] = {"properties": {**later, **off}}
    return {"dependentSchemas": dependent}


class Adjusting(BaseModel):
    """The sampling adjustments every generation endpoint takes (model/runtime/sampling.py applies them,
    in this order: logit_bias, repetition_penalty, presence and frequency, then the temperature and
    min_p, top_k, top_p)."""

    presence_penalty: float = Field(OFF["presence_penalty"], ge=-MAX_PENALTY, le=MAX_PENALTY, allow_inf_nan=False, description=(
        "OpenAI's: subtracted from the logit of every character generated at least once so far (the prompt does "
        "not count); positive values discourage repeating, negative ones encourage it."))
    frequency_penalty: float = Field(OFF["frequency_penalty"], ge=-MAX_PENALTY, le=MAX_PENALTY, allow_inf_nan=False, description=(
        "OpenAI's: subtracted from a character's logit once per time it was generated so far (the prompt does not count)."))
    repetition_penalty: float = Field(OFF["repetition_penalty"], gt=0, le=MAX_REPETITION_PENALTY, allow_inf_nan=False, description=(
        "llama.cpp's repeat_penalty: the logit of every character among the last repetition_window characters (the "
        "prompt's included) is divided by it when positive and multiplied by it when not; 1: off, above 1 discourages "
        "repeating."))
    repetition_window: Whole = Field(OFF["repetition_window"], ge=0, le=MAX_REPETITION_WINDOW, description=(
        "llama.cpp's repeat_last_n: how many of the last characters, the prompt's included, repetition_penalty looks "
        "at (0: off)."))
    min_p: float = Field(OFF["min_p"], ge=0, le=1, allow_inf_nan=False, description=(
        "Drop characters whose probability (after the temperature) is below min_p times the most likely one's (0: off)."))
    logit_bias: dict[BiasKey, Bias] = Field(default_factory=dict, max_length=MAX_LOGIT_BIAS, description=LOGIT_BIAS_DOC)


def _per_prompt(max_n: int, field: str) -> list[dict]:
    """Rules of the document: with several prompts, prompts x `field` is at most max_n."""
    return [{"if": {"required": ["prompt"], "properties": {"prompt": {"type": "array", "minItems": k}}},
             "then": {"properties": {field: {"maximum": max_n // k}}}}
            for k in range(2, max_n + 1) if max_n // k < max_n // (k - 1)]  # where the most for k prompts drops


def _nullable(schema: dict, names) -> None:
    for name in names:
        prop = schema["properties"][name]
        if "type" in prop:
            prop["type"] = [prop["type"], "null"]
        else:
            prop["anyOf"] = [*prop.pop("anyOf"), {"type": "null"}]


def completion_document(max_n: int):
    """What CompletionRequest's JSON Schema says beyond its fields' types, for /openapi.json: null
    is accepted where it means the default, prompts x n and prompts x best_of are at most max_n,
    best_of is at least n and does not stream, at most one constraint and none with echo or
    max_tokens 0. The validators below enforce the same."""
    rules = _per_prompt(max_n, "n") + _per_prompt(max_n, "best_of")
    rules += [{"if": {"required": ["n", "best_of"], "properties": {"n": {"type": "integer", "minimum": k}, "best_of": {"type": "integer"}}},
               "then": {"properties": {"best_of": {"minimum": k}}}} for k in range(2, max_n + 1)]
    rules.append({"not": {"required": ["stream", "best_of"],
                          "properties": {"stream": {"const": True}, "best_of": {"type": "integer", "minimum": 2}}}})

    def amend(schema: dict) -> None:
        _nullable(schema, DEFAULTED)
        schema["allOf"] = rules
        schema.update(constraint_document(("grammar", "json_schema", "response_format"), scoring=True))

    return amend


def chat_document(schema: dict) -> None:
    """What ChatRequest's JSON Schema says beyond its fields' types: null means the default, and
    top_logprobs above 0 needs logprobs (as OpenAI's API has it)."""
    _nullable(schema, CHAT_DEFAULTED - {"logprobs", "top_logprobs", "max_completion_tokens", "max_tokens"})
    schema["allOf"] = [{"if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer", "minimum": 1}}},
                        "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}}]


def _null_is_default(names: set[str]):
    def drop(cls, data):
        """OpenAI's API reads null as "not given": such fields take their defaults."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (v is None and k in names)}
        return data

    return model_validator(mode="before")(classmethod(drop))


def _stores_nothing(what: str):
    def refuse(cls, store):
        """store: true asks for what this server never keeps."""
        if store is True:
            raise PydanticCustomError("unsupported", f"true is not supported: this server stores no {what} "
                                      "(send false or leave it out)")
        return store

    return field_validator("store", mode="before")(classmethod(refuse))


def _neutral(name: str):
    value = NEUTRAL[name]
    return Field(None, description=f"Not supported: accepted only as {value!r} or null.", json_schema_extra={"enum": [value, None]})


def model_field(models: Models):
    """The `model` field of every request that runs a model. The document lists the names; the
    schema itself accepts any text, so that an unknown name is the 404 model_not_found that lists
    them (Chargen.served), not a 422."""
    return Field(None, description=f"The model to use: one of those GET /v1/models lists ({', '.join(models.names)}). "
                                   f"Omitted or null: the default model, {models.default}.",
                 json_schema_extra={"enum": [*models.names, None]})


class Schemas:
    """The request models of one application."""

    def __init__(self, settings: Settings, models: Models | None = None):
        s = settings
        models = models or settings.models_to_serve()

        class GenerateRequest(Adjusting):
            """POST /v1/generate as JSON, or as plain text with these fields in the query string (but logit_bias)."""

            model_config = ConfigDict(extra="forbid", strict=True, title="GenerateRequest",
                                      json_schema_extra=constraint_document(("regex", "grammar", "json_schema")))
            model: str | None = model_field(models)
            prompt: str = Field("", max_length=s.max_prompt_chars, description=PROMPT_DOC)
            max_chars: Whole = Field(s.default_max_chars, ge=1, le=s.max_chars, description="Characters to generate per choice (at most).")
            temperature: Temperature = s.default_temperature
            top_k: TopK = s.default_top_k
            top_p: TopP = s.default_top_p
            seed: Seed = Field(None, description="Random seed; the same seed and settings give the same text. "
                               "Omitted: the server draws one and returns it. Choice i uses seed + i.")
            stop: StopOrNull = None
            n: Whole = Field(1, ge=1, le=s.max_n, description="Number of choices (independent continuations).")
            stream: bool = Field(False, description="Stream the text as server-sent events (plain text: chunked text) as it is generated.")
            logprobs: Whole = Field(0, ge=0, le=MAX_LOGPROBS, description="Return the log-probability of each generated character "
                                    "and of this many most likely alternatives (0: none)." + MASK_DOC)
            regex: Pattern = Field(None, description=REGEX_DOC)
            grammar: Pattern = Field(None, description=GRAMMAR_DOC)
            json_schema: JsonSchema = Field(None, description=JSON_SCHEMA_DOC + " Only in a JSON body.")

            _one_constraint = field_validator("grammar", "json_schema")(_one_constraint)

        class StreamOptions(BaseModel):
            model_config = ConfigDict(extra="forbid", strict=True)
            include_usage: bool = False

        class CompletionRequest(Adjusting):
            """POST /v1/completions, OpenAI's completions API; one token is one character."""

            model_config = ConfigDict(extra="forbid", strict=True, title="CompletionRequest",
                                      json_schema_extra=completion_document(s.max_n))
            model: str | None = model_field(models)
            prompt: (Annotated[str, StringConstraints(max_length=s.max_prompt_chars)]
                     | Annotated[list[Annotated[str, StringConstraints(max_length=s.max_prompt_chars)]],
                                 Field(min_length=1, max_length=s.max_n)]) = Field("", description=PROMPT_DOC)
            max_tokens: Whole = Field(s.default_max_chars, ge=0, le=s.max_chars, description=(
                "Characters to generate; 0 generates nothing (with echo and logprobs: the prompt is scored only)."))
            temperature: OpenAITemperature = s.default_temperature
            top_p: TopP = s.default_top_p
            top_k: TopK = Field(s.default_top_k, description="Extension (as llama.cpp and vLLM). " + TOP_K_DOC)
            n: Whole = Field(1, ge=1, le=s.max_n, description=f"Choices per prompt; prompts x n is at most {s.max_n}.")
            stop: StopOrNull = None
            seed: Seed = None
            logprobs: WholeOrNull = Field(None, ge=0, le=MAX_LOGPROBS, description=(
                "Return each character's log-probability and this many most likely alternatives (0 or null: none). With "
                "echo, the prompt's characters too: every one but the first (null: nothing predicts it) from the ones "
                "before it." + MASK_DOC))
            stream: bool | None = False
            stream_options: StreamOptions | None = Field(None, description="With stream: include_usage adds a last chunk "
                                                         "with the usage (and usage: null in every other chunk).")
            echo: bool | None = Field(False, description="Return the prompt before the completion.")
            best_of: WholeOrNull = Field(None, ge=1, le=s.max_n, description=(
                "Sample this many choices per prompt and return the n with the highest mean log-probability per "
                f"character; at least n, prompts x best_of at most {s.max_n}, not with stream."))
            user: str | None = Field(None, description="Accepted and ignored.")
            suffix: str | None = _neutral("suffix")
            grammar: Pattern = Field(None, description="llama.cpp's. " + GRAMMAR_DOC)
            json_schema: JsonSchema = Field(None, description="llama.cpp's. " + JSON_SCHEMA_DOC)
            response_format: ResponseFormat = Field(None, description=RESPONSE_FORMAT_DOC + " Not with echo or "
                                                    "max_tokens 0 (which only score), whatever its type.")

            _defaults = _null_is_default(DEFAULTED)
            _one_constraint = field_validator("grammar", "json_schema", "response_format")(_one_constraint)

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

            @field_validator("best_of")
            @classmethod
            def _best_of(cls, best_of, info):
                if best_of is None:
                    return best_of
                prompt, n = info.data.get("prompt"), info.data.get("n", 1)
                if n is not None and best_of < n:
                    raise PydanticCustomError("out_of_range", f"best_of ({best_of}) must be at least n ({n})")
                if best_of > 1 and info.data.get("stream"):
                    raise PydanticCustomError("unsupported", "best_of above 1 cannot be streamed (as in OpenAI's API)")
                if isinstance(prompt, list) and len(prompt) * best_of > s.max_n:
                    raise PydanticCustomError("out_of_range", f"{len(prompt)} prompts x best_of={best_of} is more than the "
                                              f"{s.max_n} choices a request may have (CHARGEN_MAX_N)")
                return best_of

            @field_validator(*NEUTRAL)
            @classmethod
            def _neutral_only(cls, value, info):
                neutral = NEUTRAL[info.field_name]
                if value is not None and value != neutral:
                    raise ValueError(f"{info.field_name} is not supported by this server (only {neutral!r} or null)")
                return value

        Content = Annotated[str, StringConstraints(max_length=s.max_prompt_chars)]

        class ChatTextPart(BaseModel):
            model_config = ConfigDict(extra="forbid", strict=True, title="ChatTextPart")
            type: Literal["text"]
            text: Content

        class ChatMessage(BaseModel):
            """One message. The roles tool and function, and content parts other than text, are not supported."""

            model_config = ConfigDict(extra="forbid", strict=True, title="ChatMessage")
            role: Literal["system", "developer", "user", "assistant"]
            content: Content | Annotated[list[ChatTextPart], Field(max_length=MAX_MESSAGES)] | None = Field(
                None, description="The message's text, or text parts (joined); null: an empty message.")
            name: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = Field(
                None, description="The speaker's name in the transcript, instead of the role's (CHARGEN_CHAT_NAMES).")
            # a reply's message as OpenAI's client sends it back (messages.append(reply.choices[0].message)):
            # the fields of an answer, which this server leaves null
            refusal: Content | None = Field(None, description="Accepted (a previous reply's message) and ignored.")
            annotations: Annotated[list, Field(max_length=MAX_IGNORED_ITEMS)] | None = Field(
                None, description="Accepted (a previous reply's message) and ignored.")
            audio: None = Field(None, description="Accepted only as null (a previous reply's message).")
            function_call: None = Field(None, description="Accepted only as null (this server calls no tools).")
            tool_calls: Annotated[list, Field(max_length=0)] | None = Field(
                None, description="Accepted only as null or empty (this server calls no tools).")

            @field_validator("audio", "function_call", "tool_calls", mode="before")
            @classmethod
            def _answers_of_tools(cls, value, info):
                if value is not None and not (info.field_name == "tool_calls" and value == []):
                    raise PydanticCustomError("unsupported", f"{info.field_name} is not supported in a message: this server "
                                              "calls no tools and writes no audio (accepted only as null)")
                return None

            @field_validator("role", mode="before")
            @classmethod
            def _roles_of_tools(cls, role):
                if role in ("tool", "function"):
                    raise PydanticCustomError("unsupported", f"role {role!r} is not supported: this server calls no tools")
                return role

            @field_validator("content", mode="before")
            @classmethod
            def _text_parts_only(cls, content):
                if isinstance(content, list):
                    for part in content:
                        kind = part.get("type") if isinstance(part, dict) else None
                        if isinstance(kind, str) and kind != "text":
                            raise PydanticCustomError("unsupported", f"content parts of type {kind[:40]!r} are not supported "
                                                      "(a character model reads text only)")
                return content

        def _unsupported(name: str):
            return Field(None, description=f"Not supported ({CHAT_UNSUPPORTED[name]}): accepted only as null.",
                         json_schema_extra={"enum": [None]})

        class ChatRequest(Adjusting):
            """POST /v1/chat/completions, OpenAI's chat completions API: the messages are written into a transcript
            (CHARGEN_CHAT_TEMPLATE, CHARGEN_CHAT_NAMES) which the model continues as the assistant; one token is one
            character."""

            model_config = ConfigDict(extra="forbid", strict=True, title="ChatRequest", json_schema_extra=chat_document)
            model: str | None = model_field(models)
            messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
            max_completion_tokens: WholeOrNull = Field(None, ge=1, le=s.max_chars, description=(
                f"Characters to generate (default: max_tokens, else {s.default_max_chars})."))
            max_tokens: WholeOrNull = Field(None, ge=1, le=s.max_chars, description="The older name of max_completion_tokens.")
            temperature: OpenAITemperature = s.default_temperature
            top_p: TopP = s.default_top_p
            top_k: TopK = Field(s.default_top_k, description="Extension (as llama.cpp and vLLM). " + TOP_K_DOC)
            n: Whole = Field(1, ge=1, le=s.max_n, description="Choices (replies).")
            stop: StopOrNull = Field(None, description=STOP_DOC + " The reply also ends where the next message would begin.")
            seed: Seed = Field(None, description="Choice i uses seed + i.")
            logprobs: bool | None = Field(False, description="Return each character's log-probability (choices[].logprobs.content)."
                                          + MASK_DOC)
            top_logprobs: WholeOrNull = Field(None, ge=0, le=MAX_LOGPROBS, description="Alternatives per character (needs logprobs).")
            stream: bool | None = False
            stream_options: StreamOptions | None = Field(None, description="With stream: include_usage adds a last chunk "
                                                         "with the usage (and usage: null in every other chunk).")
            response_format: ResponseFormat | None = Field(None, description=RESPONSE_FORMAT_DOC)
            modalities: Annotated[list[Literal["text"]], Field(max_length=1)] | None = Field(None, description='Only ["text"].')
            user: str | None = Field(None, description="Accepted and ignored.")
            store: bool | None = Field(None, description="false or null only: this server stores no completions.",
                                       json_schema_extra={"enum": [False, None]})
            tools: None = _unsupported("tools")
            tool_choice: None = _unsupported("tool_choice")
            parallel_tool_calls: None = _unsupported("parallel_tool_calls")
            functions: None = _unsupported("functions")
            function_call: None = _unsupported("function_call")
            audio: None = _unsupported("audio")
            prediction: None = _unsupported("prediction")
            web_search_options: None = _unsupported("web_search_options")

            _defaults = _null_is_default(CHAT_DEFAULTED)
            _nothing_stored = _stores_nothing("completions")

            @field_validator(*CHAT_UNSUPPORTED, mode="before")
            @classmethod
            def _refuse(cls, value, info):
                if value is not None:
                    raise PydanticCustomError("unsupported", f"not supported: {CHAT_UNSUPPORTED[info.field_name]}")
                return value

            @field_validator("top_logprobs")
            @classmethod
            def _needs_logprobs(cls, top, info):
                if top and not info.data.get("logprobs"):
                    raise PydanticCustomError("invalid_value", "top_logprobs needs logprobs: true")
                return top

        class ScoreRequest(BaseModel):
            """POST /v1/score: how well the model predicts a text (as `chargen evaluate` scores it)."""

            model_config = ConfigDict(extra="forbid", strict=True, title="ScoreRequest")
            model: str | None = model_field(models)
            text: str = Field(max_length=s.max_prompt_chars, description=(
                "The text to score. Every character but the first is predicted from the ones before it (the first is "
                "the start, as in `chargen evaluate`). Characters outside the vocabulary follow the prompt's rule "
                "(replaced by the base form, or dropped) and are counted."))
            logprobs: bool = Field(False, description="Return each character's log-probability.")
            top_logprobs: Whole = Field(0, ge=0, le=MAX_LOGPROBS, description="Alternatives per character (with logprobs).")

        class TokenizeRequest(BaseModel):
            """POST /v1/tokenize: a text as the model's character ids."""

            model_config = ConfigDict(extra="forbid", strict=True, title="TokenizeRequest")
            model: str | None = model_field(models)
            text: str = Field(max_length=s.max_prompt_chars, description="The text; characters outside the vocabulary "
                              "follow the prompt's rule and are listed (replaced, dropped).")

        class DetokenizeRequest(BaseModel):
            """POST /v1/detokenize: character ids back to text."""

            model_config = ConfigDict(extra="forbid", strict=True, title="DetokenizeRequest")
            model: str | None = model_field(models)
            ids: Annotated[list[Annotated[int, Field(ge=0, le=MAX_ID), BeforeValidator(_whole_float)]],
                           Field(max_length=s.max_prompt_chars)] = Field(description=(
                "Character ids (as /v1/tokenize gives them); ids at or beyond the vocabulary size are dropped and listed."))

        # ------------------------------------------------------------ vLLM's tokenizer endpoints, at the root
        # (service/tokenizer_api.py): the shapes vLLM's clients send, lm-evaluation-harness's remote tokenizer first.

        class RootTokenizeRequest(BaseModel):
            """POST /tokenize, vLLM's request: a text as the model's character ids."""

            model_config = ConfigDict(extra="forbid", strict=True, title="RootTokenizeRequest")
            model: str | None = model_field(models)
            prompt: str = Field(max_length=s.max_prompt_chars, description=(
                "The text. Characters outside the vocabulary follow the prompt's rule (replaced by the base form, or "
                "dropped) and are listed in the answer's replaced and dropped; \\r\\n and \\r become \\n."))
            add_special_tokens: bool = Field(True, description=(
                "vLLM's field, accepted for its clients; it changes nothing here: a character model reads a prompt from "
                "its first character and adds no special token."))
            return_token_strs: bool | None = Field(False, description="Also return each id's character (token_strs).")

        class RootDetokenizeRequest(BaseModel):
            """POST /detokenize, vLLM's request: character ids back to text."""

            model_config = ConfigDict(extra="forbid", strict=True, title="RootDetokenizeRequest")
            model: str | None = model_field(models)
            tokens: Annotated[list[Annotated[int, Field(ge=0, le=MAX_ID), BeforeValidator(_whole_float)]],
                              Field(max_length=s.max_prompt_chars)] = Field(description=(
                "Character ids (as /tokenize gives them); ids at or beyond the vocabulary size are dropped and listed."))

        # ------------------------------------------------------------ OpenAI's Responses API (service/responses_api.py)

        class ResponseInputPart(BaseModel):
            model_config = ConfigDict(extra="forbid", strict=True, title="ResponseInputPart")
            type: Literal["input_text", "output_text"]
            text: Content
            annotations: Annotated[list, Field(max_length=MAX_IGNORED_ITEMS)] | None = Field(
                None, description="Accepted (a previous response's output) and ignored.")
            logprobs: Annotated[list, Field(max_length=MAX_IGNORED_ITEMS)] | None = Field(
                None, description="Accepted (a previous response's output) and ignored.")

            @field_validator("type", mode="before")
            @classmethod
            def _text_only(cls, kind):
                if isinstance(kind, str) and kind not in ("input_text", "output_text"):
                    raise PydanticCustomError("unsupported", f"content parts of type {kind[:40]!r} are not supported "
                                              "(a character model reads text only)")
                return kind

        class ResponseInputMessage(BaseModel):
            """One message of `input` (a previous response's output message included)."""

            model_config = ConfigDict(extra="forbid", strict=True, title="ResponseInputMessage")
            type: Literal["message"] | None = Field(None, description="Only \"message\": tool calls and reasoning "
                                                    "items are not supported.")
            role: Literal["system", "developer", "user", "assistant"]
            content: Content | Annotated[list[ResponseInputPart], Field(max_length=MAX_MESSAGES)]
            id: str | None = Field(None, description="Accepted (a previous response's output) and ignored.")
            status: str | None = Field(None, description="Accepted (a previous response's output) and ignored.")
            phase: str | None = Field(None, description="Accepted (a previous response's output) and ignored.")

            @field_validator("type", mode="before")
            @classmethod
            def _messages_only(cls, kind):
                if isinstance(kind, str) and kind != "message":
                    raise PydanticCustomError("unsupported", f"input items of type {kind[:40]!r} are not supported "
                                              "(this server calls no tools and keeps no reasoning)")
                return kind

        class ResponseJsonSchemaFormat(BaseModel):
            """The Responses API's json_schema format: chat's json_schema fields beside `type`."""

            model_config = ConfigDict(extra="forbid", strict=True, title="ResponseJsonSchemaFormat")
            type: Literal["json_schema"]
            name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = Field(
                description="The schema's name (letters, digits, _ and -, at most 64).")
            description: str | None = Field(None, description="Accepted and ignored (the model reads no instructions).")
            schema_: JsonSchema | None = Field(None, alias="schema", description="The JSON Schema the text must be valid "
                                               "under; omitted: any JSON object.")
            strict: bool | None = Field(None, description="Accepted; the schema is always kept exactly, whatever its value.")

        ResponseTextFormat = Annotated[TextFormat | JsonObjectFormat | ResponseJsonSchemaFormat, Field(discriminator="type")]

        class ResponseText(BaseModel):
            model_config = ConfigDict(extra="forbid", strict=True, title="ResponseText")
            format: ResponseTextFormat | None = Field(None, description=(
                "{\"type\": \"text\"} (no constraint), {\"type\": \"json_object\"} (any JSON object) or {\"type\": "
                "\"json_schema\", \"name\", \"schema\", \"strict\"}: the JSON formats hold the output to the schema "
                "exactly, as response_format does on /v1/chat/completions. " + ENDING_DOC))

        def _unanswered(name: str):
            return Field(None, description=f"Not supported ({RESPONSES_UNSUPPORTED[name]}): accepted only as null.",
                         json_schema_extra={"enum": [None]})

        class ResponsesRequest(Adjusting):
            """POST /v1/responses, OpenAI's Responses API over the chat pipeline: `instructions` and `input` are
            written into a transcript as /v1/chat/completions writes its messages (CHARGEN_CHAT_TEMPLATE), which the
            model continues as the assistant; one token is one character. Nothing is stored."""

            model_config = ConfigDict(extra="forbid", strict=True, title="ResponsesRequest",
                                      json_schema_extra=lambda schema: _nullable(schema, RESPONSES_DEFAULTED))
            model: str | None = model_field(models)
            input: (Content | Annotated[list[ResponseInputMessage], Field(min_length=1, max_length=MAX_MESSAGES)]) = Field(
                description="A user message's text, or messages (a previous response's output messages included).")
            instructions: Content | None = Field(None, description="A system message before the input.")
            max_output_tokens: WholeOrNull = Field(None, ge=1, le=s.max_chars, description=(
                f"Characters to generate (default {s.default_max_chars}); reaching it leaves the response incomplete."))
            temperature: OpenAITemperature = s.default_temperature
            top_p: TopP = s.default_top_p
            top_k: TopK = Field(s.default_top_k, description="Extension (as llama.cpp and vLLM). " + TOP_K_DOC)
            stream: bool | None = Field(False, description="Stream the Responses API's events as server-sent events.")
            text: ResponseText | None = Field(None, description="The output's format (text.format).")
            # (bool, not Literal[False]: the literal would take 0 as false)
            store: bool | None = Field(None, description="Only false or null: nothing is stored (so no previous_response_id "
                                       "either).", json_schema_extra={"enum": [False, None]})
            metadata: Annotated[dict[Annotated[str, StringConstraints(max_length=64)],
                                     Annotated[str, StringConstraints(max_length=512)]],
                                Field(max_length=16)] | None = Field(None, description="Returned with the response.")
            user: str | None = Field(None, description="Accepted and ignored.")
            tools: None = _unanswered("tools")
            tool_choice: None = _unanswered("tool_choice")
            parallel_tool_calls: None = _unanswered("parallel_tool_calls")
            max_tool_calls: None = _unanswered("max_tool_calls")
            previous_response_id: None = _unanswered("previous_response_id")
            conversation: None = _unanswered("conversation")
            reasoning: None = _unanswered("reasoning")
            include: None = _unanswered("include")
            background: None = _unanswered("background")
            prompt: None = _unanswered("prompt")

            _defaults = _null_is_default(RESPONSES_DEFAULTED)

            @field_validator(*RESPONSES_UNSUPPORTED, mode="before")
            @classmethod
            def _refuse(cls, value, info):
                if value is not None:
                    raise PydanticCustomError("unsupported", f"not supported: {RESPONSES_UNSUPPORTED[info.field_name]}")
                return value

            _nothing_stored = _stores_nothing("responses")

        self.settings = settings
        self.models = models  # the names the document lists, and the default
        self.generate = GenerateRequest
        self.completion = CompletionRequest
        self.chat = ChatRequest
        self.score = ScoreRequest
        self.tokenize = TokenizeRequest
        self.detokenize = DetokenizeRequest
        self.root_tokenize = RootTokenizeRequest
        self.root_detokenize = RootDetokenizeRequest
        self.responses = ResponsesRequest
        self.inspect = inspect_request(models)


# ---------------------------------------------------------------- POST /v1/inspect (issue 23)

INSPECT_QUANTITIES = ("hidden", "cell", "gates")
INSPECT_ENCODINGS = ("list", "float16")
MAX_INSPECT_VALUES = 4_000_000  # values one answer carries: characters x units x arrays per layer x layers
MAX_INSPECT_CELLS = 50  # cells ranked per feature


def inspect_document(schema: dict) -> None:
    """What InspectRequest's JSON Schema says beyond its fields' types: the bound on an answer's size, and that
    `gates` goes with quantities that include gates."""
    schema["description"] = (f"At most {MAX_INSPECT_VALUES:,} values per answer (characters read x units x arrays per "
                             "layer x layers); more is a 422 (code too_large) naming the sizes.")
    schema["allOf"] = [{"if": {"required": ["gates", "quantities"], "properties": {"gates": {"type": "array"}, "quantities": {"type": "array"}}},
                        "then": {"properties": {"quantities": {"contains": {"const": "gates"}}}}}]


def inspect_request(models: Models):
    from model.records.config import MAX_LAYERS
    from model.runtime.cells import FEATURES
    from model.runtime.inside import GATES, MAX_CHARS

    gate_names = tuple(dict.fromkeys(g for names in GATES.values() for g in names))
    per_cell = "; ".join(f"{cell}: {', '.join(names)}" for cell, names in GATES.items())

    class InspectRequest(BaseModel):
        """POST /v1/inspect: the network's values after each character (hidden state, LSTM cell state, gates), what it
        predicted next, and on request the cells that follow features of the text (the document's description says the bound)."""

        model_config = ConfigDict(extra="forbid", strict=True, title="InspectRequest", json_schema_extra=inspect_document)
        model: str | None = model_field(models)
        text: str = Field(min_length=1, max_length=MAX_CHARS, description=(
            "The text the network reads, from the zero state (as a prompt). Characters outside the vocabulary follow the "
            "prompt's rule (replaced by the base form, or dropped) and are listed."))
        layers: Annotated[list[Annotated[int, Field(ge=1, le=MAX_LAYERS), WHOLE]], Field(min_length=1, max_length=MAX_LAYERS)] | None = Field(
            None, description="The layers to return, 1 the lowest (default: all). A layer the model lacks is a 404 (code layer_not_found).")
        quantities: Annotated[list[Literal[INSPECT_QUANTITIES]], Field(min_length=1, max_length=3)] | None = Field(
            None, description="What to return per layer: hidden (state), cell (state; LSTM only), gates (default: all the "
                              "cell type has). `cell` for a GRU or RNN is a 404 (code quantity_not_found).")
        gates: Annotated[list[Literal[gate_names]], Field(min_length=1, max_length=len(gate_names))] | None = Field(
            None, description=f"The gates to return with quantities `gates` (default: all of the cell type's; {per_cell}). "
                              "Sigmoid gates and the candidate (tanh) are their activated values; the RNN's preactivation "
                              "is the value before tanh. A gate the cell type lacks is a 404 (code quantity_not_found).")
        encoding: Literal[INSPECT_ENCODINGS] = Field("list", description=(
            "list: each array as [[...units] x characters], rounded to 4 decimals; float16: {shape: [characters, units], "
            "dtype: float16, data: base64 of little-endian float16, row-major}."))
        @field_validator("gates")
        @classmethod
        def _gates_are_asked_for(cls, gates, info):
            quantities = info.data.get("quantities")
            if gates is not None and quantities is not None and "gates" not in quantities:
                raise PydanticCustomError("invalid_value", "gates names gates to return, but quantities leaves out gates")
            return gates

        cells: Whole = Field(0, ge=0, le=MAX_INSPECT_CELLS, description=(
            "Above 0: also rank, for each feature of the text (" + ", ".join(FEATURES) + "), the this many cells (hidden "
            "and cell states of every layer) whose values correlate best with it (Pearson's r, by |r|, sign kept), and "
            "give each gate's saturation on this text (share below 0.1 and above 0.9; tanh values below -0.9 and above 0.9)."))

    return InspectRequest


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, rate_limit_error, unavailable_error, "
                                  "timeout_error or server_error")
    param: str | None = Field(description="The request field at fault, when there is one.")
    code: str


class ErrorResponse(BaseModel):
    """The body of every error response."""

    error: ErrorDetail

