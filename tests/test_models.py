"""Several models per server (CHARGEN_MODELS): two tiny models trained on different sentences,
`fox` (conftest's PERIODIC) and `jugs` (OTHER), whose greedy texts are known exactly, so a wrong
route shows as the other sentence.

Through Flask's test client: the `model` field and query string route to the right engine, the
default serves what names none, an unknown name is a 404 that lists the names, /v1/models, /info
and /metrics are per model, each model has its own slots and queue, and every bad CHARGEN_MODELS
stops start-up naming the variable. Through a real gunicorn: the same routing, the multiprocess
metrics with their model label, and the start-up errors of `chargen serve` and of gunicorn itself.
(The reload of a CHARGEN_MODELS directory that gained a model is in test_lifecycle.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import OTHER, PERIODIC
from polling import wait_for
from server import ROOT, chargen_command, continuation, free_port, running_server, server_env
from service.app import create_app
from service.config import Settings, SettingsError

FOX, JUGS = PERIODIC[:30], OTHER[:30]  # greedy after "\n", 30 characters


def greedy(client, model=None, prompt="\n", chars=30, path="/v1/generate"):
    body = {"prompt": prompt, "temperature": 0, **({"model": model} if model is not None else {})}
    if path == "/v1/completions":
        r = client.post(path, json={**body, "max_tokens": chars})
    else:
        r = client.post(path, json={**body, "max_chars": chars})
    assert r.status_code == 200, r.get_data(as_text=True)
    return r.get_json()


def assert_model_not_found(r, name: str):
    assert r.status_code == 404, r.get_data(as_text=True)
    error = r.get_json()["error"]
    assert (error["code"], error["param"], error["type"]) == ("model_not_found", "model", "invalid_request_error")
    assert repr(name) in error["message"] and "'fox'" in error["message"] and "'jugs'" in error["message"]


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_artifact, other_artifact):
    root = tmp_path_factory.mktemp("served") / "models"
    root.mkdir()
    (root / "fox").symlink_to(tiny_artifact)
    (root / "jugs").symlink_to(other_artifact)
    app = create_app({"MODELS": str(root), "TESTING": True, "MAX_BATCH": 1, "MAX_N": 1, "MAX_QUEUE": 0,
                      "MAX_CHARS": 1_000_000})
    chargen = app.extensions["chargen"]
    assert chargen.wait_ready(120), chargen.failed() and chargen.failed().scheduler.failure
    yield app
    chargen.close()


@pytest.fixture
def client(app):
    return app.test_client()


# ---------------------------------------------------------------- routing


def test_the_model_field_picks_the_model_and_the_default_serves_the_rest(client):
    assert greedy(client, "jugs")["choices"][0]["text"] == JUGS
    assert greedy(client, "fox")["choices"][0]["text"] == FOX
    omitted = greedy(client)
    assert omitted["model"] == "fox" and omitted["choices"][0]["text"] == FOX  # the first directory entry
    assert greedy(client, None)["model"] == "fox"  # null is omitted
    assert greedy(client, "jugs")["model"] == "jugs"
    assert greedy(client, "fox", prompt="the quick", chars=20)["choices"][0]["text"] == continuation("the quick", 20)


def test_the_model_in_the_query_string_of_a_plain_text_request(client):
    r = client.post("/v1/generate?model=jugs&temperature=0&max_chars=30", data="\n", content_type="text/plain")
    assert r.status_code == 200 and r.get_data(as_text=True) == JUGS + "\n"
    r = client.post("/v1/generate?temperature=0&max_chars=30", data="\n", content_type="text/plain")
    assert r.get_data(as_text=True) == FOX + "\n"


def test_streamed_answers_come_from_the_model_named(client):
    r = client.post("/v1/generate", json={"prompt": "\n", "max_chars": 30, "temperature": 0, "stream": True, "model": "jugs"})
    events = [json.loads(b[len("data: "):]) for b in r.get_data(as_text=True).split("\n\n") if b.strip()]
    assert "".join(e.get("text", "") for e in events) == JUGS and events[-1]["model"] == "jugs"


def test_completions_pick_the_model(client):
    body = greedy(client, "jugs", path="/v1/completions")
    assert body["model"] == "jugs" and body["choices"][0]["text"] == JUGS
    assert greedy(client, path="/v1/completions")["choices"][0]["text"] == FOX


@pytest.mark.parametrize("name", ["gpt-4", "", "FOX", "x" * 500])
def test_an_unknown_model_is_a_404_that_lists_the_models(client, name):
    shown = name if len(name) <= 80 else name[:77] + "..."
    assert_model_not_found(client.post("/v1/generate", json={"prompt": "a", "model": name}), shown)
    assert_model_not_found(client.post("/v1/completions", json={"prompt": "a", "model": name}), shown)
    if name:
        assert_model_not_found(client.post(f"/v1/generate?model={name}", data="a", content_type="text/plain"), shown)
        assert_model_not_found(client.get(f"/info?model={name}"), shown)
        assert_model_not_found(client.get(f"/v1/models/{name}"), shown)


def test_other_mistakes_are_still_named_before_the_model(client):
    r = client.post("/v1/generate", json={"prompt": "a", "model": "nope", "temperature": -1})
    assert r.status_code == 422 and r.get_json()["error"]["param"] == "temperature"
    r = client.post("/v1/generate", json={"prompt": "a", "model": 3})
    assert r.status_code == 422 and r.get_json()["error"]["param"] == "model"


# ---------------------------------------------------------------- /v1/models, /info, /metrics, /openapi.json


def test_v1_models_lists_every_model_with_its_metadata(client, tiny_artifact, other_artifact):
    data = client.get("/v1/models").get_json()["data"]
    assert [m["id"] for m in data] == ["fox", "jugs"]
    fox, jugs = data
    assert fox["object"] == "model" and fox["owned_by"] == "chargen" and fox["created"] > 0
    assert (fox["default"], jugs["default"]) == (True, False)
    for card in data:
        assert card["parameters"] > 0 and card["bits_per_char"] > 0 and card["corpus"]
        assert (card["cell"], card["layers"], card["units"]) == ("lstm", 1, 32)
    assert fox["corpus_chars"] == len(PERIODIC * 60) and jugs["corpus_chars"] == len(OTHER * 60)
    assert fox["vocab_size"] == len(set(PERIODIC)) and jugs["vocab_size"] == len(set(OTHER))
    assert client.get("/v1/models/jugs").get_json() == jugs


def test_info_is_per_model_and_lists_them_all(client, other_artifact):
    default = client.get("/info").get_json()
    assert default["model"]["name"] == "fox" and default["model"]["default"] is True
    assert [m["name"] for m in default["models"]] == ["fox", "jugs"]
    jugs = client.get("/info?model=jugs").get_json()
    assert jugs["model"]["name"] == "jugs" and jugs["model"]["default"] is False
    assert jugs["model"]["corpus"]["chars"] == len(OTHER * 60)
    assert jugs["model"]["path"].endswith("jugs")
    assert jugs["models"] == default["models"] and jugs["limits"] == default["limits"]
    assert jugs["engine"]["max_batch"] == 1


def test_generation_metrics_carry_the_model_label(client):
    from prometheus_client import REGISTRY

    def chars(model):
        return REGISTRY.get_sample_value("chargen_chars_generated_total", {"model": model}) or 0

    fox, jugs = chars("fox"), chars("jugs")
    greedy(client, "jugs", chars=17)
    assert (chars("fox"), chars("jugs")) == (fox, jugs + 17)
    assert REGISTRY.get_sample_value("chargen_time_to_first_char_seconds_count", {"model": "jugs"}) >= 1
    text = client.get("/metrics").get_data(as_text=True)
    for name in ("chargen_queue_depth", "chargen_active_streams", "chargen_batch_size_count",
                 "chargen_queue_wait_seconds_count"):
        assert f'{name}{{model="fox"}}' in text and f'{name}{{model="jugs"}}' in text, name
    assert "chargen_workers_ready 1.0" in text  # one worker, ready once both of its models are


def test_the_document_lists_the_models(client):
    doc = client.get("/openapi.json").get_json()
    for schema in ("GenerateRequest", "CompletionRequest"):
        assert doc["components"]["schemas"][schema]["properties"]["model"]["enum"] == ["fox", "jugs", None]
    assert doc["paths"]["/info"]["get"]["parameters"][0]["schema"]["enum"] == ["fox", "jugs"]
    assert "404" in doc["paths"]["/v1/generate"]["post"]["responses"]


# ---------------------------------------------------------------- one engine, slots and queue per model


def test_each_model_has_its_own_slots_and_queue(app, client):
    """MAX_BATCH 1, MAX_QUEUE 0 per model: a long stream on fox takes fox's only slot; jugs still
    answers, and another fox request is refused with 429."""
    chargen = app.extensions["chargen"]
    long = client.post("/v1/generate", json={"prompt": "the", "max_chars": 1_000_000, "stream": True, "model": "fox"},
                       buffered=False)
    chunks = long.response
    next(chunks)  # generating
    try:
        assert chargen.served("fox").engine.active == 1
        assert greedy(client, "jugs")["choices"][0]["text"] == JUGS
        assert chargen.served("jugs").engine.active == 0
        busy = client.post("/v1/generate", json={"prompt": "a", "max_chars": 5, "model": "fox"})
        assert busy.status_code == 429 and busy.get_json()["error"]["code"] == "queue_full"
    finally:
        long.close()
    assert wait_for(lambda: chargen.served("fox").engine.active == 0, interval=0.01)


# ---------------------------------------------------------------- configuration


def names(config: dict) -> tuple[list[str], str]:
    models = Settings.from_mapping(config).models_to_serve()
    return models.names, models.default


def test_names_and_the_default(models_dir, tiny_artifact, other_artifact, tmp_path):
    (models_dir / "lost+found").mkdir()  # not a model: left out
    (models_dir / ".staging").symlink_to(tiny_artifact)  # hidden: left out
    (models_dir / "notes.txt").write_text("not a model")
    assert names({"MODELS": str(models_dir)}) == (["fox", "jugs"], "fox")
    assert names({"MODELS": str(models_dir), "DEFAULT_MODEL": "jugs"}) == (["fox", "jugs"], "jugs")
    assert names({"MODELS": f"b={other_artifact}, a={tiny_artifact},"}) == (["b", "a"], "b")  # as written
    # CHARGEN_ARTIFACT set as well: one more model, first and the default
    assert names({"ARTIFACT": str(tiny_artifact), "MODELS": f"jugs={other_artifact}"}) == (["run", "jugs"], "run")
    assert names({"ARTIFACT": str(tiny_artifact), "MODEL_NAME": "main", "MODELS": str(models_dir),
                  "DEFAULT_MODEL": "jugs"}) == (["main", "fox", "jugs"], "jugs")
    assert names({"ARTIFACT": str(tiny_artifact)}) == (["run"], "run")  # RUN/best is named RUN
    # a model added to the directory is found the next time it is read (a reload)
    (models_dir / "later").symlink_to(tiny_artifact)
    assert names({"MODELS": str(models_dir)})[0] == ["fox", "jugs", "later"]


@pytest.mark.parametrize("config, variable, words", [
    ({"MODELS": "a b=/x"}, "CHARGEN_MODELS", "'a b' is not a model name"),
    ({"MODELS": "-a=/x"}, "CHARGEN_MODELS", "'-a' is not a model name"),
    ({"MODELS": "a="}, "CHARGEN_MODELS", "names no path"),
    ({"MODELS": "a=/x,a=/y"}, "CHARGEN_MODELS entry a=/y", "taken twice"),
    ({"MODELS": "{dir},fox=/x"}, "CHARGEN_MODELS entry fox=/x", "taken twice"),
    ({"MODELS": "{dir}", "ARTIFACT": "{fox}", "MODEL_NAME": "jugs"}, "CHARGEN_MODELS directory", "taken twice"),
    ({"MODELS": "/no/such/models"}, "CHARGEN_MODELS entry /no/such/models", "no such directory"),
    ({"MODELS": "{fox}"}, "CHARGEN_MODELS entry", "is an artifact itself"),
    ({"MODELS": "{empty}"}, "CHARGEN_MODELS entry", "holds no model"),
    ({"MODELS": "{dir}", "DEFAULT_MODEL": "nope"}, "CHARGEN_DEFAULT_MODEL", "'nope' is not one of the models served (fox, jugs)"),
    ({"ARTIFACT": "{fox}", "MODEL_NAME": "my model"}, "CHARGEN_ARTIFACT", "'my model' is not a model name"),
])
def test_a_bad_models_setting_stops_start_up_naming_the_variable(models_dir, tiny_artifact, tmp_path, config, variable, words):
    (tmp_path / "empty" / "lost+found").mkdir(parents=True)
    config = {k: v.format(dir=models_dir, fox=tiny_artifact, empty=tmp_path / "empty") for k, v in config.items()}
    with pytest.raises(SettingsError) as e:
        create_app(config)
    assert f"invalid configuration: {variable}" in str(e.value) and words in str(e.value), str(e.value)


# ---------------------------------------------------------------- a real gunicorn


@pytest.mark.slow
def test_a_real_server_routes_by_model_and_labels_its_metrics(tiny_artifact, other_artifact):
    """CHARGEN_ARTIFACT (the default, `run`) plus CHARGEN_MODELS' `jugs`, two workers: every answer
    comes from the model named whichever worker takes it, and /metrics adds the workers up per model."""
    with running_server(tiny_artifact, workers=2, env={"CHARGEN_MODELS": f"jugs={other_artifact}"}) as server:
        assert [m["id"] for m in server.get("/v1/models").json()["data"]] == ["run", "jugs"]
        for _ in range(4):
            for model, text in (("jugs", JUGS), ("run", FOX), (None, FOX)):
                body = {"prompt": "\n", "max_chars": 30, "temperature": 0, **({"model": model} if model else {})}
                r = server.post("/v1/generate", json=body)
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == text, (model, r.text)
        r = server.post("/v1/completions", json={"model": "nope", "prompt": "a"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found" and "'jugs'" in r.json()["error"]["message"]
        assert server.get("/info?model=jugs").json()["model"]["name"] == "jugs"
        assert server.metric("chargen_chars_generated_total", {"model": "jugs"}) == 4 * 30
        assert server.metric("chargen_chars_generated_total", {"model": "run"}) == 8 * 30
        assert server.metric("chargen_workers_ready") == 2
        assert server.metric("chargen_active_streams", {"model": "jugs"}) == 0
        log = server.log()
    assert "serving run=" in log and "jugs=" in log and "(default run)" in log


def test_a_bad_models_setting_stops_chargen_serve_and_gunicorn(tiny_artifact, tmp_path):
    env = server_env(tiny_artifact, {"CHARGEN_MODELS": "fox=/x,fox=/y"})
    serve = subprocess.run(chargen_command() + ["serve", "--bind", f"127.0.0.1:{free_port()}"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
    assert serve.returncode == 1 and "CHARGEN_MODELS entry fox=/y: the model name 'fox' is taken twice" in serve.stderr
    gunicorn = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "python:service.gunicorn_conf", "--bind",
                               f"127.0.0.1:{free_port()}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert gunicorn.returncode == 1 and "CHARGEN_MODELS entry fox=/y" in gunicorn.stderr
    # a pair whose path is no artifact: `chargen serve` names it before gunicorn starts
    env = server_env(tiny_artifact, {"CHARGEN_MODELS": f"gone={tmp_path / 'gone'}"})
    serve = subprocess.run(chargen_command() + ["serve", "--bind", f"127.0.0.1:{free_port()}"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
    assert serve.returncode == 1 and f"{tmp_path / 'gone'}: no such artifact directory" in serve.stderr
