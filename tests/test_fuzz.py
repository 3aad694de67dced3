"""The API fuzzed from its own /openapi.json by schemathesis, against a real gunicorn serving
conftest's tiny model: what the document calls valid is accepted, what it calls invalid is refused
with a 4xx, nothing is a 5xx, and every answer has a documented status, content type and shape.
This is what keeps the document and the server honest (service/schemas.py, service/openapi.py).

Seeded and bounded: the same cases every run, under three minutes on two cores (about 9,000 cases
over the generation, chat, scoring and tokenizing operations). Its figures (cases per
operation) are printed with `pytest -s`. Hostile bodies through the same server follow.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import pytest
import requests

schemathesis = pytest.importorskip("schemathesis", reason="the fuzz test needs schemathesis (pip install -e '.[test]')")
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)

from hypothesis.configuration import set_hypothesis_home_dir  # noqa: E402

from server import running_server  # noqa: E402
from service.config import Settings  # noqa: E402
from service.openapi import document  # noqa: E402
from service.reading import MAX_JSON_DEPTH  # noqa: E402
from service.schemas import Schemas  # noqa: E402

pytestmark = pytest.mark.slow  # real gunicorn, and thousands of generated requests

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection, positive_data_acceptance]
SEED = 20261201
MAX_EXAMPLES = 1000  # per operation and generation mode (valid, invalid), besides the coverage phase's own cases
# Small limits keep each generation short; the document states them, so the cases respect them. The
# rules across fields of CompletionRequest grow with MAX_N (service/schemas.py), and at 4 they and the
# constraint rules are more than the generator models (it gives up on the operation): 3 keeps them within.
ENV = {"CHARGEN_MODEL_NAME": "tiny", "CHARGEN_MAX_CHARS": 64, "CHARGEN_DEFAULT_MAX_CHARS": 32, "CHARGEN_MAX_N": 3, "CHARGEN_MAX_BATCH": 16,
       "CHARGEN_MAX_PROMPT_CHARS": 256}
CONFIG = {
    "seed": SEED,
    "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "database": "none"},  # no example database in the tree
    "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True}, "fuzzing": {"enabled": True}},
    "request-timeout": 30,
    # An invalid body over CHARGEN_MAX_BODY_BYTES is refused with 413 before it is read: a rejection too
    "checks": {"negative_data_rejection": {"expected-statuses": [
        "400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]}},
}

# The document the server will serve, built here the same way (service/openapi.py), so that the cases
# are made at collection time, before the server is up; the first test checks that the server serves
# exactly this. (schemathesis.pytest.from_fixture, which would load it from the server, fails under
# pytest 9: schemathesis 4.32 sets a node attribute, _nodeid, that pytest 9 no longer has.)
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "chargen-hypothesis")  # its caches, not in ./.hypothesis
DOCUMENT = document(Schemas(Settings.from_mapping({k.removeprefix("CHARGEN_"): v for k, v in ENV.items()})), "0")
schema = schemathesis.openapi.from_dict(DOCUMENT, config=schemathesis.Config.from_dict(CONFIG))
cases: Counter[str] = Counter()


@pytest.fixture(scope="module")
def server(tiny_artifact):
    with running_server(tiny_artifact, env=ENV) as s:
        yield s
    if cases:
        print(f"\nschemathesis: {sum(cases.values())} cases: " + ", ".join(f"{op} {n}" for op, n in sorted(cases.items())))


def test_the_document_fuzzed_is_the_one_the_server_serves(server):
    served = server.get("/openapi.json").json()
    assert {**served, "info": None} == {**DOCUMENT, "info": None}


# A constraint (regex, grammar, json_schema, response_format) valid by the document may still be one
# this model cannot write (characters its vocabulary lacks, no text at all, too complex once compiled):
# a 422 with code invalid_constraint that no JSON Schema can foresee. Such answers keep every other
# check; tests/test_structured_api.py tests the constraints themselves.
CONSTRAINT_CHECKS = [check for check in CHECKS if check is not positive_data_acceptance]


@schema.parametrize()
def test_the_server_keeps_to_its_own_document(case, server):
    cases[case.operation.label] += 1
    response = case.call(base_url=server.url)
    refused_constraint = response.status_code == 422 and _code(response) == "invalid_constraint"
    case.validate_response(response, checks=CONSTRAINT_CHECKS if refused_constraint else CHECKS,
                           transport_kwargs={"base_url": server.url})


def _code(response) -> str | None:
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def test_the_fuzzer_reached_every_operation():
    # runs after the fuzz test (file order)
    if not cases:
        pytest.skip("the fuzz test did not run (deselected)")
    assert set(cases) == {f"{method.upper()} {path}" for path, item in DOCUMENT["paths"].items() for method in item}
    assert min(cases[f"POST /v1/{op}"] for op in ("generate", "completions", "chat/completions", "score", "tokenize",
                                                  "detokenize")) >= MAX_EXAMPLES


# ---------------------------------------------------------------- hostile bodies, through gunicorn


@pytest.mark.parametrize("depth", [100, 10_000, 100_000, 1_000_000])
@pytest.mark.parametrize("path", ["/v1/generate", "/v1/completions", "/v1/chat/completions", "/v1/score"])
def test_json_nested_any_depth_is_a_400_from_the_real_server(server, path, depth):
    body = b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
    if len(body) > 1 << 20:  # the default body limit: send it unclosed (the parser recursed before the end)
        body = body[: len(body) // 2]
    r = server.post(path, data=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text[:300]
    error = r.json()["error"]
    assert error["code"] == "too_deep" and f"at most {MAX_JSON_DEPTH} levels" in error["message"]
    assert server.get("/health").status_code == 200  # the worker is still there
    assert "Traceback" not in server.log() and "RecursionError" not in server.log()


def test_the_real_server_answers_after_hostile_bodies(server):
    r = requests.post(server.url + "/v1/generate", json={"prompt": "the quick", "max_chars": 9, "temperature": 0}, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == " brown fo"
