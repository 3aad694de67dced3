"""The int8 graph (model.int8.onnx, issue 24): training and `chargen export --int8` write and record
it, the loader checks it like model.onnx (missing, damaged, not the recorded file: each its own
error naming the file), the quality gate refuses with the figures, and the precision switch
(CHARGEN_PRECISION, `chargen sample --precision`, /info, /v1/models) picks the graph that serves.
On the shipped model, int8's greedy text is float32's up to the first near-tie."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from chargen.cli import main
from model.records.meta import INT8_GRAPH, ArtifactMeta
from model.runtime import artifact
from conftest import PERIODIC, loaded_app, train_tiny, words

SHIPPED = Path(__file__).resolve().parents[1] / "artifacts" / "default"


def chargen(*args: str, env: dict | None = None):
    result = CliRunner().invoke(main, list(args), env=env)
    assert "Traceback" not in result.output, result.output
    return result


def corpus_of(tiny: Path) -> Path:
    """The text train_tiny trained `tiny` (RUN/best) on."""
    return tiny.parent.parent / f"{tiny.parent.name}-corpus.txt"


def meta_of(path: Path) -> ArtifactMeta:
    return ArtifactMeta.from_json((path / "meta.json").read_text())


def rewrite_meta(path: Path, changes: dict | None) -> None:
    """meta.json with fields of its int8 record changed (None: the record removed, as in an
    artifact made before int8 graphs)."""
    data = json.loads((path / "meta.json").read_text())
    if changes is None:
        del data["int8"]
    else:
        data["int8"].update(changes)
    (path / "meta.json").write_text(json.dumps(data))


@pytest.fixture
def copy(tiny_artifact, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_artifact, tmp_path / "art"))


# ---------------------------------------------------------------- writing and recording


def test_training_writes_and_records_the_int8_graph(tiny_artifact):
    meta = meta_of(tiny_artifact)
    data = (tiny_artifact / INT8_GRAPH).read_bytes()
    assert meta.int8.sha256 == hashlib.sha256(data).hexdigest()
    assert meta.int8.float32_sha256 == hashlib.sha256((tiny_artifact / "model.onnx").read_bytes()).hexdigest()
    assert meta.int8.text == "the artifact's validation text" and meta.int8.window == 256
    assert meta.int8.passed and abs(meta.int8.increase) <= 0.005
    assert len(data) < (tiny_artifact / "model.onnx").stat().st_size  # int8 weights
    loaded = artifact.load(tiny_artifact)
    assert (loaded.precision, loaded.graph) == ("int8", tiny_artifact / INT8_GRAPH)


def test_export_int8_writes_the_graph_and_both_figures(tiny_artifact, copy):
    (copy / INT8_GRAPH).unlink()
    rewrite_meta(copy, None)
    assert artifact.load(copy).precision == "float32"  # an artifact made before int8 serves float32
    with pytest.raises(artifact.MissingInt8Graph) as asked:  # and says how to give it one
        artifact.load(copy, "int8")
    assert str(asked.value) == (
        f"{copy}: int8 was asked for, but this artifact has no int8 graph (meta.json records none: the artifact was "
        f"made before int8 graphs); add one with: chargen export --int8 --artifact {copy} --corpus FILE, or run it "
        "in float32 (--precision float32 or CHARGEN_PRECISION=float32)")
    result = chargen("export", "--int8", "--artifact", str(copy), "--corpus", str(corpus_of(tiny_artifact)))
    assert result.exit_code == 0, result.output
    assert f"wrote {copy / INT8_GRAPH}" in result.output and "so serving runs int8 by default" in result.output
    assert (copy / INT8_GRAPH).read_bytes() == (tiny_artifact / INT8_GRAPH).read_bytes()  # what training made
    meta, trained = meta_of(copy), meta_of(tiny_artifact)
    assert meta.int8.sha256 == trained.int8.sha256
    assert meta.int8.text.startswith(f"the validation text (the last {meta.split.validation_chars:,} characters of")
    # the same graphs on the same characters: the figures training recorded
    assert meta.int8.float32_nats_per_char == pytest.approx(trained.int8.float32_nats_per_char, abs=1e-4)
    assert meta.int8.int8_nats_per_char == pytest.approx(trained.int8.int8_nats_per_char, abs=1e-4)
    assert f"int8 {meta.int8.int8_nats_per_char:.4f} nats/char against float32 {meta.int8.float32_nats_per_char:.4f}" in result.output
    assert artifact.load(copy).precision == "int8"

    again = chargen("export", "--int8", "--artifact", str(copy), "--corpus", str(corpus_of(tiny_artifact)))
    assert again.exit_code == 0 and f"up to date: {copy / INT8_GRAPH}" in again.output, again.output


def test_export_int8_needs_the_validation_text(tiny_artifact, copy, tmp_path):
    result = chargen("export", "--int8", "--artifact", str(copy))
    assert result.exit_code == 2 and "--corpus FILE" in result.output and "--text FILE" in result.output
    other = tmp_path / "other.txt"
    other.write_text(PERIODIC * 10)
    result = chargen("export", "--int8", "--artifact", str(copy), "--corpus", str(other))
    assert result.exit_code == 1 and "not the corpus this artifact was trained on" in result.output
    result = chargen("export", "--artifact", str(copy), "--text", str(other))
    assert result.exit_code == 2 and "options of --int8" in result.output
    result = chargen("export", "--int8", "--artifact", str(copy), "--text", str(other))  # another text: scored on it
    assert result.exit_code == 0, result.output
    assert meta_of(copy).int8.text == "other.txt"


def test_the_quality_gate_refuses_with_the_figures(tiny_artifact, copy):
    # a gate no graph passes (int8 would have to score 1 nat/char better): the same measure, refused
    result = chargen("export", "--int8", "--artifact", str(copy), "--corpus", str(corpus_of(tiny_artifact)),
                     "--int8-max-increase", "-1")
    assert result.exit_code == 1, result.output
    info = meta_of(copy).int8
    assert not info.passed and info.max_increase == -1
    assert "int8 is not made the default" in result.output
    assert f"int8 {info.int8_nats_per_char:.4f} nats/char against float32 {info.float32_nats_per_char:.4f}" in result.output
    assert artifact.load(copy).precision == "float32"  # auto: float32
    with pytest.raises(artifact.MissingInt8Graph, match=r"int8 was asked for.*failed its quality gate: int8 [0-9.]+ nats/char against float32 [0-9.]+ .*not made the default"):
        artifact.load(copy, "int8")
    result = chargen("sample", "--artifact", str(copy), "--precision", "int8", "--max-chars", "5")
    assert result.exit_code == 1 and "int8 was asked for" in result.output


# ---------------------------------------------------------------- the loader's checks


def test_a_missing_int8_graph_is_its_own_error(copy):
    (copy / INT8_GRAPH).unlink()
    with pytest.raises(artifact.MissingInt8Graph, match=rf"{copy / INT8_GRAPH}: missing; .*chargen export --int8"):
        artifact.load(copy)
    assert artifact.load(copy, "float32").graph == copy / "model.onnx"  # float32 still serves


def test_a_damaged_int8_graph_is_its_own_error(copy):
    data = (copy / INT8_GRAPH).read_bytes()
    (copy / INT8_GRAPH).write_bytes(data[: len(data) // 2])
    with pytest.raises(artifact.CorruptInt8Graph, match=rf"{copy / INT8_GRAPH}: not the int8 graph meta.json records"):
        artifact.load(copy)
    # damaged and recorded as such (meta.json's sha256 of the damaged file): ONNX Runtime's refusal
    rewrite_meta(copy, {"sha256": hashlib.sha256(data[: len(data) // 2]).hexdigest()})
    with pytest.raises(artifact.CorruptInt8Graph, match=rf"{copy / INT8_GRAPH}: (not an ONNX model|damaged ONNX graph)"):
        artifact.load(copy)


def test_inspect_reads_model_onnx_whatever_the_int8_graph(copy, tmp_path):
    # chargen inspect runs model.onnx's weights with numpy: a damaged or missing int8 graph is no concern of it
    text = tmp_path / "text.txt"
    text.write_text(PERIODIC * 4)
    data = (copy / INT8_GRAPH).read_bytes()
    (copy / INT8_GRAPH).write_bytes(data[: len(data) // 2])
    result = chargen("inspect", "--artifact", str(copy), "--text", str(text), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["chars"] == len(PERIODIC * 4)


def test_an_int8_graph_that_is_not_the_recorded_file(copy, other_artifact):
    shutil.copyfile(other_artifact / INT8_GRAPH, copy / INT8_GRAPH)  # a sound int8 graph, of another network
    with pytest.raises(artifact.CorruptInt8Graph, match="its sha256 differs"):
        artifact.load(copy)
    # the float32 graph where the int8 one belongs, recorded: its metadata says so
    shutil.copyfile(copy / "model.onnx", copy / INT8_GRAPH)
    rewrite_meta(copy, {"sha256": hashlib.sha256((copy / INT8_GRAPH).read_bytes()).hexdigest()})
    with pytest.raises(artifact.CorruptInt8Graph, match="it is the float32 graph, expected the int8 one"):
        artifact.load(copy)


def another_model_onnx(path: Path) -> bytes:
    """A sound model.onnx of the same shape as the artifact's at `path`, of another network (its
    output layer's bias moved)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_model_from_string((path / "model.onnx").read_bytes())
    bias = next(t for t in model.graph.initializer if t.name == "logits_bias")
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 1.0, "logits_bias"))
    return model.SerializeToString()


def test_a_model_onnx_of_another_model_is_refused_whatever_serves(copy):
    """meta.json records model.onnx's sha256: float32 serving, which runs it, and int8 serving, whose
    graph was made from it, both refuse another model's graph of the same shape, naming model.onnx."""
    (copy / "model.onnx").write_bytes(another_model_onnx(copy))
    for precision in ("float32", "auto"):
        with pytest.raises(artifact.CorruptGraph) as e:
            artifact.load(copy, precision)
        assert str(e.value).startswith(f"{copy / 'model.onnx'}: does not match meta.json (sha256 "), e.value
        assert "another model's graph" in str(e.value)
    result = chargen("sample", "--artifact", str(copy), "--precision", "float32", "--max-chars", "5")
    assert result.exit_code == 1 and result.output.startswith(f"Error: {copy / 'model.onnx'}: does not match meta.json")


def test_before_meta_json_recorded_sha256_the_int8_record_still_names_model_onnx(copy):
    # an artifact from before meta.json's `sha256`: its int8 record has the sha256 of the model.onnx it was made from
    data = json.loads((copy / "meta.json").read_text())
    del data["sha256"]
    (copy / "meta.json").write_text(json.dumps(data))
    assert artifact.load(copy, "float32").meta.sha256 is None  # its own graph loads as before
    (copy / "model.onnx").write_bytes(another_model_onnx(copy))
    with pytest.raises(artifact.CorruptGraph, match="another model's graph"):
        artifact.load(copy, "float32")


def test_a_changed_meta_json_is_blamed_not_the_graph(copy):
    """The graphs are the files meta.json records (their sha256), so when they disagree with its
    network, meta.json is what changed: the error names it, not the graph, and asks for no export."""
    data = json.loads((copy / "meta.json").read_text())
    data["config"]["units"] = 48
    (copy / "meta.json").write_text(json.dumps(data))
    for precision, graph in (("auto", INT8_GRAPH), ("float32", "model.onnx")):
        with pytest.raises(artifact.BadMeta) as e:
            artifact.load(copy, precision)
        assert str(e.value).startswith(f"{copy / 'meta.json'}: describes a 1-layer lstm network of 48 units"), e.value
        assert f"but {graph}, the file it records (the same sha256), is another network" in str(e.value)
        assert "metadata units is '32', meta.json says '48'" in str(e.value) and "export" not in str(e.value)


@pytest.mark.parametrize("name, error", [(INT8_GRAPH, artifact.CorruptInt8Graph),
                                         ("model.onnx", artifact.CorruptGraph)])  # hashed: it made the int8 graph
def test_an_unreadable_graph_is_named_with_the_reason(copy, name, error):
    (copy / name).unlink()
    (copy / name).symlink_to("/proc/self/mem")  # reading from its start fails (EIO), even as root
    with pytest.raises(error) as e:
        artifact.load(copy)
    assert str(e.value) == f"{copy / name}: cannot be read: {os.strerror(errno.EIO)}"
    result = chargen("sample", "--artifact", str(copy), "--max-chars", "5")
    assert result.exit_code == 1 and result.output == f"Error: {e.value}\n"


def test_an_int8_graph_made_from_another_model_onnx(copy):
    rewrite_meta(copy, {"float32_sha256": "0" * 64})  # a sound model.onnx, not the one int8 was made from
    with pytest.raises(artifact.CorruptInt8Graph, match=rf"{copy / INT8_GRAPH}: made from another model.onnx"):
        artifact.load(copy)
    (copy / "model.onnx").write_bytes(b"half a graph")  # a damaged one is said as model.onnx's problem
    with pytest.raises(artifact.CorruptGraph, match=rf"{copy / 'model.onnx'}: not an ONNX model"):
        artifact.load(copy)


# ---------------------------------------------------------------- the precision switch


def test_chargen_precision_is_checked():
    from service.config import Settings, SettingsError

    assert Settings.from_env({}).precision == "auto"
    assert Settings.from_env({"CHARGEN_PRECISION": "float32"}).precision == "float32"
    with pytest.raises(SettingsError, match="CHARGEN_PRECISION"):
        Settings.from_env({"CHARGEN_PRECISION": "fp16"})


@pytest.mark.parametrize("precision, graph", [(None, INT8_GRAPH), ("int8", INT8_GRAPH), ("float32", "model.onnx")])
def test_info_and_models_say_which_graph_serves(tiny_artifact, precision, graph):
    config = {} if precision is None else {"PRECISION": precision}
    with loaded_app(tiny_artifact, **config) as app:
        client = app.test_client()
        card = client.get("/v1/models").get_json()["data"][0]
        assert (card["precision"], card["graph"]) == ("float32" if graph == "model.onnx" else "int8", graph)
        info = client.get("/info").get_json()["model"]
        assert (info["precision"], info["graph"]) == (card["precision"], graph)
        assert info["int8"]["sha256"] == meta_of(tiny_artifact).int8.sha256
        # the graph that serves generates and scores: greedy text is what the model learned either way
        body = client.post("/v1/generate", json={"prompt": "the quick", "max_chars": 30, "temperature": 0}).get_json()
        assert body["choices"][0]["text"] == PERIODIC[9:39]


def test_scoring_comes_from_the_graph_that_serves(tiny_artifact):
    """/v1/score's and echo's log-probabilities on an int8 server are the int8 graph's (run over the
    text from the zero state, as `chargen evaluate --precision int8` runs it), not float32's."""
    from model.runtime.sampling import log_softmax
    from model.training.evaluate import GraphNetwork

    text = "a lazy fox jumps over the quick dog. the end.\n" * 2
    ids = artifact.load(tiny_artifact).vocab.encode(text).ids
    want = {}
    for precision in ("int8", "float32"):
        logits = GraphNetwork(artifact.load(tiny_artifact, precision).graph).predict_on_batch(ids[None, :-1])[0]
        want[precision] = np.take_along_axis(log_softmax(logits.astype(np.float64)), ids[1:, None], axis=1)[:, 0]
    assert np.abs(want["int8"] - want["float32"]).max() > 1e-3  # the graphs are told apart at the bound below
    with loaded_app(tiny_artifact) as app:
        client = app.test_client()
        scored = client.post("/v1/score", json={"text": text, "logprobs": True}).get_json()
        echo = client.post("/v1/completions", json={"prompt": text, "echo": True, "logprobs": 1, "max_tokens": 0}).get_json()
    got = np.array([c["logprob"] for c in scored["logprobs"][1:]])
    assert np.abs(got - want["int8"]).max() < 1e-4
    assert np.abs(np.array(echo["choices"][0]["logprobs"]["token_logprobs"][1:]) - want["int8"]).max() < 1e-4


def test_sample_precision_from_the_option_and_the_environment(tiny_artifact, copy):
    for args, env in ((["--precision", "float32"], None), ([], {"CHARGEN_PRECISION": "int8"}), ([], None)):
        result = chargen("sample", "--artifact", str(tiny_artifact), "--prompt", "the quick", "--max-chars", "30",
                         "--temperature", "0", *args, env=env)
        assert result.exit_code == 0 and result.output == "the quick" + PERIODIC[9:39], result.output
    result = chargen("sample", "--artifact", str(tiny_artifact), "--precision", "fp16")
    assert result.exit_code == 2 and "fp16" in result.output
    (copy / INT8_GRAPH).unlink()
    result = chargen("sample", "--artifact", str(copy), "--max-chars", "5", env={"CHARGEN_PRECISION": "float32"})
    assert result.exit_code == 0, result.output  # float32 needs no int8 graph
    result = chargen("sample", "--artifact", str(copy), "--max-chars", "5")
    assert result.exit_code == 1 and f"{copy / INT8_GRAPH}: missing" in result.output


def test_evaluate_scores_the_int8_graph(tiny_artifact, tmp_path):
    meta = meta_of(tiny_artifact)
    ids_text = corpus_of(tiny_artifact).read_text()
    validation = tmp_path / "validation.txt"
    validation.write_text(ids_text[len(ids_text) - meta.split.validation_chars:])
    result = chargen("evaluate", "--artifact", str(tiny_artifact), "--text", str(validation), "--precision", "int8",
                     "--json")
    assert result.exit_code == 0, result.output
    scored = json.loads(result.output.strip().splitlines()[-1])
    assert scored["precision"] == "int8"
    # the measure export recorded, on the same characters: the same figure
    assert scored["window"]["nats_per_char"] == pytest.approx(meta.int8.int8_nats_per_char, abs=1e-4)
    result = chargen("evaluate", "--artifact", str(tiny_artifact), "--text", str(validation), "--precision", "int8",
                     "--dynamic")
    assert result.exit_code == 2 and "--precision int8" in result.output


def test_gru_serves_float32_and_says_why(tmp_path):
    gru = train_tiny(tmp_path / "gru", words(3000), cell="gru", units=16, epochs=1)
    meta = meta_of(gru)
    assert meta.int8.sha256 is None and "no quantized GRU operator" in meta.int8.reason
    assert not (gru / INT8_GRAPH).exists() and artifact.load(gru).precision == "float32"
    result = chargen("export", "--int8", "--artifact", str(gru))  # no text needed: nothing to score
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == f"no int8 graph: {meta.int8.reason}; serving runs float32"
    # int8 asked for: one line that says why there is none and what to run instead, and no export to try
    with pytest.raises(artifact.MissingInt8Graph) as asked:
        artifact.load(gru, "int8")
    assert str(asked.value) == (
        f"{gru}: int8 was asked for, but a GRU artifact has no int8 graph and `chargen export --int8` cannot add one: "
        f"{meta.int8.reason}; run it in float32 (--precision float32 or CHARGEN_PRECISION=float32; auto, the default, does)")
    text = tmp_path / "text.txt"
    text.write_text(words(300, seed=1))
    for args, env in ((["sample", "--precision", "int8"], None), (["sample"], {"CHARGEN_PRECISION": "int8"}),
                      (["evaluate", "--text", str(text), "--precision", "int8"], None)):
        result = chargen(*args, "--artifact", str(gru), env=env)
        assert result.exit_code == 1 and result.output == f"Error: {asked.value}\n", (args, result.output)


# ---------------------------------------------------------------- the shipped model


def test_shipped_model_int8_greedy_text_is_float32s_up_to_a_near_tie():
    """Greedy text from int8 and float32 is the same until a step where float32's two most likely
    characters are within a hundredth of a nat or so: there int8's rounding can pick the other, and
    the texts part. Along float32's greedy text (both graphs fed the same characters), int8 picks
    float32's character wherever float32's margin is not such a near-tie."""
    from model.runtime.network_step import load
    from model.runtime.sampling import log_softmax

    if meta_of(SHIPPED).int8 is None:
        pytest.fail(f"{SHIPPED} has no int8 graph: chargen export --int8 --artifact {SHIPPED} --corpus tinyshakespeare.txt")
    steps = {p: load(artifact.load(SHIPPED, p), 1) for p in ("float32", "int8")}
    prompt = artifact.load(SHIPPED).vocab.encode("ROMEO:").ids

    def greedy(step, n=600):
        state, out = step.prompt(prompt), []
        for _ in range(n):
            out.append(int(np.argmax(state.logits)))
            state = step.prompt(np.array(out[-1:]), state)
        return out

    texts = {p: greedy(s) for p, s in steps.items()}
    fed = np.array([*prompt, *texts["float32"]])
    logp = {p: log_softmax(s.predict(fed[:-1])[0].astype(np.float64))[len(prompt) - 1:] for p, s in steps.items()}
    top2 = np.sort(logp["float32"], axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]  # (600,): how far float32's pick is ahead of its runner-up
    near_tie = margin < 0.05
    agree = logp["int8"].argmax(1) == logp["float32"].argmax(1)
    assert agree[~near_tie].all()  # every clear pick is the same
    assert near_tie.sum() < 0.2 * len(margin)
    differ = [i for i, (a, b) in enumerate(zip(texts["int8"], texts["float32"])) if a != b]
    if differ:  # on this machine at character 77 of 600 (after "ROMEO:"), a margin of 0.007 nats
        first = differ[0]
        assert near_tie[first], f"the texts part at {first}, where float32's margin is {margin[first]:.4f} nats"
        assert first >= 30


def test_the_thread_threshold_depends_on_the_graph(tiny_artifact):
    """A step goes on a second thread from THREADED_STEP_FLOPS of work, which is set per precision."""
    import math

    from model.runtime.onnx_step import THREADED_STEP_FLOPS, OrtStep

    for precision in ("float32", "int8"):
        step = OrtStep(artifact.load(tiny_artifact, precision).graph, 4, threads=2)
        assert step.precision == precision
        assert step.min_rows_per_thread == math.ceil(THREADED_STEP_FLOPS[precision] / step.flops_per_char())


@pytest.mark.slow
def test_chargen_serve_runs_the_shipped_model_in_int8_by_default(copy):
    """A real server of the shipped model: int8 by default, float32 with CHARGEN_PRECISION; a
    recorded int8 graph that is missing stops `chargen serve` before gunicorn starts, naming it."""
    import subprocess

    from server import chargen_command, running_server, server_env

    for env, precision in (({}, "int8"), ({"CHARGEN_PRECISION": "float32"}, "float32")):
        with running_server(SHIPPED, env=env) as server:
            card = server.get("/v1/models", timeout=30).json()["data"][0]
            assert (card["precision"], card["graph"]) == (precision, "model.onnx" if precision == "float32" else INT8_GRAPH)
            assert server.get("/info", timeout=30).json()["model"]["precision"] == precision
    (copy / INT8_GRAPH).unlink()
    done = subprocess.run([*chargen_command(), "serve", "--port", "0"], env=server_env(copy), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and f"{copy / INT8_GRAPH}: missing" in done.stderr, done.stderr


def test_int8_texts_are_fixed_by_the_seed_and_the_streams_stepped_together(tiny_artifact):
    """What README.md's Precision paragraph promises for int8: a seed gives the same text alone, and
    the same texts for the same streams stepped together (not necessarily alone's: the activations'
    scale is the batch's)."""
    from model.runtime.engine import Engine
    from model.runtime.sampling import SamplingSettings
    from model.runtime.streams import GenerationRequest

    served = artifact.load(tiny_artifact)  # auto: the int8 graph
    assert served.precision == "int8"
    requests = [GenerationRequest("the ", 200, SamplingSettings(temperature=1.0), seed=seed) for seed in (1, 2, 3, 4)]

    def together() -> list[str]:
        engine = Engine(served, max_batch=8)
        streams = [engine.start(r) for r in requests]
        for _ in range(400):  # bounded: each stream ends at 200 characters
            if all(s.finish_reason for s in streams):
                break
            engine.step([s for s in streams if s.finish_reason is None])
        return [s.text for s in streams]

    alone = [[Engine(served, max_batch=8).generate(r).text for r in requests] for _ in range(2)]
    assert alone[0] == alone[1] and len(set(alone[0])) == 4
    assert together() == together()
