"""lm-evaluation-harness end to end: its `local-completions` model with `tokenizer_backend=remote`
(vLLM's /tokenizer_info, /tokenize, /detokenize) against real gunicorn and a tiny model, offline, on
a local task the test writes: multiple choice, loglikelihood_rolling perplexity and generate_until.
Its log-likelihoods are the server's own (/v1/score) and its accuracy the one those scores imply."""

from __future__ import annotations

import json
import math

import pytest

from conftest import PERIODIC
from server import continuation, running_server

pytestmark = pytest.mark.slow

# Multiple choice over the tiny model's text: a piece of PERIODIC, then its true continuation and
# others. A few are written with characters the vocabulary lacks (é is read as e, € is dropped,
# \r\n is \n), which lm-eval's token counts must follow as /v1/completions reads them.
ITEMS = [
    ("the quick brown", [" fox", " dog", " box"], 0),
    ("the quick", [" brown", " yellow", " lazy"], 0),
    ("jumps over the", [" quick", " lazy", " brown"], 1),
    ("over the lazy", [" fox.", " dog.", " cat."], 1),
    ("the lazy dog", [".\nthe", " the", ", the"], 0),
    ("fox jumps", [" under", " over", " around"], 1),
    ("dog.\nthe quick", [" brown", " red", " slow"], 0),
    ("brown fox", [" runs", " sleeps", " jumps"], 2),
    ("the quick brown fox jumps over", [" a", " the", " one"], 1),
    ("quick brown fox jumps over the lazy", [" dog", " fox", " hen"], 0),
    ("the qu", ["ick", "ack", "een"], 0),
    ("the quick bro", ["wn", "ad", "ke"], 0),
    ("jumps ov", ["er", "en", "al"], 0),
    ("the la", ["zy", "te", "st"], 0),
    ("lazy d", ["og", "ay", "ust"], 0),
    ("the quick brown f", ["ox", "ix", "ence"], 0),
    ("thé quick", [" brown", " green", " lazy"], 0),
    ("the quick€ brown", [" fox", " dog", " box"], 0),
    ("lazy dog.\r\nthe", [" quick", " lazy", " brown"], 0),
    ("a", [" b", " c", " d"], 0),
]
PARAGRAPHS = [PERIODIC * 3, "the lazy dog jumps over the quick brown fox.\n", (PERIODIC * 2)[10:70]]
PROMPTS = ["the quick brown", "jumps over the", "the lazy"]


def _write_tasks(root) -> None:
    def jsonl(name: str, rows: list[dict]) -> None:
        (root / name).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")

    jsonl("choice.jsonl", [{"context": c, "choices": ch, "answer": a} for c, ch, a in ITEMS])
    jsonl("text.jsonl", [{"text": t} for t in PARAGRAPHS])
    jsonl("prompts.jsonl", [{"prompt": p, "target": continuation(p, 100).split(".")[0]} for p in PROMPTS])

    def task(name: str, data: str, body: str) -> None:
        (root / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / data}\n"
            f"test_split: test\n{body}", encoding="utf-8")

    task("tiny_choice", "choice.jsonl", 'output_type: multiple_choice\ndoc_to_text: "{{context}}"\n'
         'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\ntarget_delimiter: ""\n'
         "metric_list:\n  - metric: acc\n")
    task("tiny_text", "text.jsonl", 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
         "metric_list:\n  - metric: bits_per_byte\n")
    task("tiny_prompts", "prompts.jsonl", 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\n'
         'doc_to_target: "{{target}}"\ngeneration_kwargs:\n  until: ["."]\n  max_gen_toks: 60\n'
         "metric_list:\n  - metric: exact_match\n")


def _score(server, text: str) -> list[float]:
    """The logprob of every character the model reads in `text` but the first (/v1/score)."""
    body = server.post("/v1/score", json={"text": text, "logprobs": True}).json()
    return [c["logprob"] for c in body["logprobs"][1:]]


def _count(server, text: str) -> int:
    return server.post("/tokenize", json={"prompt": text}).json()["count"]


def test_lm_eval_runs_the_three_task_kinds_offline_with_the_servers_tokenizer(tiny_artifact, tmp_path, monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # the datasets cache, out of the user's home
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write_tasks(tasks)
    with running_server(tiny_artifact) as server:
        info = server.get("/tokenizer_info").json()
        assert info["eos_token"] is None and info["model_max_length"] is None
        out = simple_evaluate(model="local-completions",
                              model_args=f"model=run,base_url={server.url}/v1/completions,tokenizer_backend=remote,"
                                         "tokenized_requests=False",
                              tasks=["tiny_choice", "tiny_text", "tiny_prompts"], task_manager=TaskManager(include_path=str(tasks)),
                              log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
        samples = {name: sorted(out["samples"][name], key=lambda s: s["doc_id"]) for name in out["samples"]}

        # multiple choice: each choice's log-likelihood is the server's, and acc is what they imply
        right = 0
        for (context, choices, answer), sample in zip(ITEMS, samples["tiny_choice"], strict=True):
            got = [float(r[0][0]) for r in sample["resps"]]
            expected = [sum(_score(server, context + choice)[_count(server, context) - 1:]) for choice in choices]
            assert got == pytest.approx(expected, abs=1e-6), context
            right += max(range(len(choices)), key=expected.__getitem__) == answer
        assert out["results"]["tiny_choice"]["acc,none"] == pytest.approx(right / len(ITEMS))
        # is_greedy (lm-eval's "the continuation is what greedy decoding gives"): the character logprobs
        # and their top alternatives agree exactly
        assert [r[0][1] for r in samples["tiny_choice"][0]["resps"]] == [True, False, False]  # " fox" after "the quick brown"
        assert right >= len(ITEMS) // 2  # the tiny model knows its text: a broken handshake would score at chance

        # perplexity: the whole text scored from the model's start (an empty prompt's state, a newline)
        for text, sample in zip(PARAGRAPHS, samples["tiny_text"], strict=True):
            assert float(sample["resps"][0][0]) == pytest.approx(sum(_score(server, "\n" + text)), abs=1e-6)
        nats = -sum(sum(_score(server, "\n" + t)) for t in PARAGRAPHS)
        assert out["results"]["tiny_text"]["bits_per_byte,none"] == pytest.approx(
            nats / math.log(2) / sum(len(t.encode()) for t in PARAGRAPHS), rel=1e-9)

        # generation: greedy, up to the stop text, as /v1/completions gives it
        for prompt, sample in zip(PROMPTS, samples["tiny_prompts"], strict=True):
            assert sample["resps"][0][0] == continuation(prompt, 100).split(".")[0]
        assert out["results"]["tiny_prompts"]["exact_match,none"] == 1.0
