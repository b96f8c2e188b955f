"""The run loop: predictions on disk, resume, recorded failures, two shards, multi-turn, exports, and
`ModelPredictor`'s use of the chat API (through a stand-in module, no model needed)."""
import csv
import json
import sys
import types

import pytest
from PIL import Image

from internvl_jax.eval.runner import ModelPredictor, Request, RunConfig, evaluate_benchmark
from internvl_jax.eval.samples import BenchmarkError
from internvl_jax.eval.store import Shard
from test_eval_benchmarks import (  # noqa: F401 (data_dir is a fixture)
    EXPECTED_PROMPTS, VQA, ScriptedPredictor, data_dir, load, script_for)

QUIET = RunConfig(progress=False)


def run(name, data_dir, out, predictor, config=QUIET, overrides=None):
    benchmark, options, samples = load(name, data_dir, overrides=overrides)
    return evaluate_benchmark(benchmark, samples, options, predictor, out, config, {"checkpoint": "ckpt"})


def read_records(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_requests_records_and_results(data_dir, tmp_path):
    predictor = ScriptedPredictor(script_for("textvqa"))
    document = run("textvqa", data_dir, tmp_path, predictor, RunConfig(batch_size=2, progress=False))
    request = predictor.requests[0]
    assert (request.id, request.max_new_tokens, request.min_new_tokens, request.max_tiles) == ("101", 10, 1, 24)
    assert [image.size for image in request.images] == [(64, 48)] and request.history == []
    records = read_records(tmp_path / "predictions.jsonl")
    assert [(r["id"], r["prediction"], r["failed"]) for r in records] == [
        ("101", "Coca-Cola.", False), ("102", "ten", False), ("103", "blue", False)]
    assert records[0]["prompt"] == "what brand is the sign? " + VQA
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == document
    assert saved["score"] == pytest.approx(50.0) and saved["complete"] and saved["num_failed"] == 0
    settings = saved["settings"]
    assert settings["checkpoint"] == "ckpt"
    assert (settings["options"]["max_tiles"], settings["options"]["prompt"]) == (24, VQA)


class Interrupted(BaseException):
    """Stands for Ctrl-C or a killed job: not an Exception, so it is not recorded as a failure."""


class InterruptedAfter(ScriptedPredictor):
    def __init__(self, script, calls):
        super().__init__(script)
        self.calls = calls

    def predict(self, requests):
        if self.calls == 0:
            raise Interrupted
        self.calls -= 1
        return super().predict(requests)


def test_interrupted_run_resumes(data_dir, tmp_path):
    config = RunConfig(batch_size=2, progress=False)
    with pytest.raises(Interrupted):
        run("mmbench_dev_en", data_dir, tmp_path, InterruptedAfter(script_for("mmbench_dev_en"), calls=1), config)
    predictions = tmp_path / "predictions.jsonl"
    assert [r["id"] for r in read_records(predictions)] == ["0", "1"]
    with open(predictions, "a") as stream:  # a record cut short by the interruption
        stream.write('{"id": "2", "predic')
    predictor = ScriptedPredictor(script_for("mmbench_dev_en"))
    document = run("mmbench_dev_en", data_dir, tmp_path, predictor, config)
    assert [request.id for request in predictor.requests] == ["2", "1000000", "1000001", "2000001"]
    assert document["score"] == pytest.approx(100 * 2 / 3) and document["complete"]
    lines = predictions.read_text().splitlines()
    assert lines[2] == '{"id": "2", "predic' and len(lines) == 7  # the cut line stays apart, skipped
    # Everything answered: a third run asks nothing and writes the same results.
    again = ScriptedPredictor({})
    assert run("mmbench_dev_en", data_dir, tmp_path, again, config)["score"] == document["score"]
    assert again.requests == []


def test_failures_are_recorded_then_retried(data_dir, tmp_path):
    script = script_for("textvqa")
    del script[("102", "what number is on the bus? " + VQA)]
    predictor = ScriptedPredictor(script)
    document = run("textvqa", data_dir, tmp_path, predictor)
    # The batch of three failed on 102, so each was asked again alone: 3 + 3 requests.
    assert [request.id for request in predictor.requests] == ["101", "102", "103", "101", "102", "103"]
    assert document["num_failed"] == 1 and not document["complete"]
    [failure] = document["failed"]
    assert failure["id"] == "102"
    assert "textvqa_val.jsonl, line 2: KeyError" in failure["error"]
    assert document["score"] == pytest.approx(100 * (0.6 + 0) / 2)  # over the answered samples only
    record = [r for r in read_records(tmp_path / "predictions.jsonl") if r["id"] == "102"]
    assert record[0]["failed"] and record[0]["prediction"] is None
    retry = ScriptedPredictor(script_for("textvqa"))
    document = run("textvqa", data_dir, tmp_path, retry)
    assert [request.id for request in retry.requests] == ["102"]
    assert document["complete"] and document["score"] == pytest.approx(50.0)


def test_missing_image_fails_that_sample_only(data_dir, tmp_path):
    predictor = ScriptedPredictor({("here", "What shape is shown? " + VQA): "circle"})
    document = run("jsonl:bad/missing_image.jsonl", data_dir, tmp_path, predictor)
    assert [request.id for request in predictor.requests] == ["here"]
    [failure] = document["failed"]
    assert failure["id"] == "gone"
    assert "missing_image.jsonl, line 2" in failure["error"] and "nowhere.png: missing" in failure["error"]
    assert document["score"] == 100.0 and document["num_samples"] == 2
    rows = list(csv.DictReader(open(tmp_path / "predictions_vlmevalkit.tsv"), delimiter="\t"))
    assert [(row["index"], row["prediction"]) for row in rows] == [("here", "circle"), ("gone", "")]


def test_two_shards_gather_to_the_single_process_result(data_dir, tmp_path):
    single = run("chartqa", data_dir, tmp_path / "one", ScriptedPredictor(script_for("chartqa")))
    first = ScriptedPredictor(script_for("chartqa"))
    second = ScriptedPredictor(script_for("chartqa"))
    out = tmp_path / "two"
    assert run("chartqa", data_dir, out, first, RunConfig(shard=Shard(0, 2), progress=False)) is None
    assert not (out / "results.json").exists()
    gathered = run("chartqa", data_dir, out, second, RunConfig(shard=Shard(1, 2), progress=False))
    assert [r.id for r in first.requests] == ["human/1", "human/3", "augmented/1"]
    assert [r.id for r in second.requests] == ["human/2", "human/4", "augmented/2"]
    assert [r["id"] for r in read_records(out / "predictions.shard-1-of-2.jsonl")] == \
        ["human/2", "human/4", "augmented/2"]
    assert gathered["score"] == single["score"] == pytest.approx(62.5)
    assert gathered["details"] == single["details"]
    assert gathered["predictions"] == ["predictions.shard-0-of-2.jsonl", "predictions.shard-1-of-2.jsonl"]
    export = (out / "predictions_vlmevalkit.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in export[1:]] == [i for i, _, _ in EXPECTED_PROMPTS["chartqa"]]


def test_multi_turn_feeds_earlier_turns(data_dir, tmp_path):
    predictor = ScriptedPredictor(script_for("mme"))
    document = run("mme", data_dir, tmp_path, predictor, RunConfig(multi_turn=True, progress=False))
    assert document["score"] == pytest.approx(325.0)
    prompts = {i: p for i, p, _ in EXPECTED_PROMPTS["mme"]}
    answers = {i: a for i, _, a in EXPECTED_PROMPTS["mme"]}
    # One conversation per image: first turns of all three images, then their second turns.
    assert [(r.id, r.history) for r in predictor.requests] == [
        ("code_reasoning:1", []), ("existence:1", []), ("existence:3", []),
        ("code_reasoning:2", [(prompts["code_reasoning:1"], answers["code_reasoning:1"])]),
        ("existence:2", [(prompts["existence:1"], answers["existence:1"])]),
        ("existence:4", [(prompts["existence:3"], answers["existence:3"])]),
    ]
    assert document["settings"]["multi_turn"] is True


def test_other_settings_are_not_resumed_from(data_dir, tmp_path):
    run("textvqa", data_dir, tmp_path, ScriptedPredictor(script_for("textvqa")))
    with pytest.raises(BenchmarkError, match=r"predictions\.jsonl, line 1: prediction made with other settings"):
        run("textvqa", data_dir, tmp_path, ScriptedPredictor({}), overrides={"max_tiles": "6"})


def test_multiple_choice_export_and_test_split(data_dir, tmp_path):
    run("mmbench_dev_en", data_dir, tmp_path / "dev", ScriptedPredictor(script_for("mmbench_dev_en")))
    with open(tmp_path / "dev" / "predictions_vlmevalkit.tsv", newline="") as stream:
        rows = list(csv.reader(stream, delimiter="\t"))
    assert rows[0] == ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "source", "l2-category",
                       "comment", "split", "prediction"]
    # The extracted letter, as the official submission: "cow" -> A, "The answer is 3" -> B.
    assert [(row[0], row[-1]) for row in rows[1:]] == [("0", "A"), ("1", "C"), ("2", "A"), ("1000000", "B"),
                                                      ("1000001", "B"), ("2000001", "B")]
    assert rows[3][2] == "The picture shows a farm."
    document = run("mmbench_test_en", data_dir, tmp_path / "test", ScriptedPredictor(script_for("mmbench_test_en")))
    assert document["score"] is None and "no ground truth" in document["note"]
    export = (tmp_path / "test" / "predictions_vlmevalkit.tsv").read_text().splitlines()
    assert [line.split("\t")[-1] for line in export] == ["prediction", "A", "C"]


def test_limit(data_dir, tmp_path):
    predictor = ScriptedPredictor(script_for("pope"))
    document = run("pope", data_dir, tmp_path, predictor, RunConfig(limit=2, progress=False))
    assert [r.id for r in predictor.requests] == ["1", "2"]
    assert document["num_samples"] == 2 and document["score"] == pytest.approx(100.0)  # adversarial only


def test_shard_parse():
    assert Shard.parse("1/4") == Shard(1, 4)
    for text in ("4/4", "1", "a/b"):
        with pytest.raises(ValueError):
            Shard.parse(text)


@pytest.fixture
def fake_chat(monkeypatch):
    """A stand-in `internvl_jax.chat` that records its calls."""
    calls = []
    module = types.ModuleType("internvl_jax.chat")

    def batch_chat(model, tokenizer, config, images, questions, generation_config, *, max_tiles, system_message,
                   mesh):
        calls.append(("batch_chat", images, questions, generation_config, max_tiles))
        return [f"batch:{question}" for question in questions]

    def chat(model, tokenizer, config, images, question, history, generation_config, *, max_tiles, system_message,
             mesh):
        calls.append(("chat", images, question, history, generation_config, max_tiles))
        return f"chat:{question}", (history or []) + [(question, "")]

    module.batch_chat, module.chat = batch_chat, chat
    monkeypatch.setitem(sys.modules, "internvl_jax.chat", module)
    return module, calls


def test_model_predictor_uses_the_chat_api(fake_chat):
    _, calls = fake_chat
    red, blue = Image.new("RGB", (4, 4), "red"), Image.new("RGB", (4, 4), "blue")
    requests = [
        Request("a", [red], "Q1", max_new_tokens=10, max_tiles=6, min_new_tokens=1),
        Request("b", [red, blue], "Q2", max_new_tokens=10, max_tiles=6, min_new_tokens=1),
        Request("c", [], "Q3", max_new_tokens=10, max_tiles=12, min_new_tokens=1),
        Request("d", [red], "Q5", max_new_tokens=10, max_tiles=6, history=[("Q4", "A4")]),
    ]
    predictor = ModelPredictor("model", "tokenizer", "config", generation={"top_k": 0})
    answers = predictor.predict(requests)
    assert answers == ["batch:<image>\nQ1", "batch:Image-1: <image>\nImage-2: <image>\nQ2", "batch:Q3", "chat:Q5"]
    chat_call, tiles6, tiles12 = calls
    # With history: chat(), the images belonging to the first (stored) turn.
    assert chat_call[2:4] == ("Q5", [("<image>\nQ4", "A4")]) and chat_call[1] == [red]
    assert chat_call[4] == {"max_new_tokens": 10, "min_new_tokens": 0, "do_sample": False, "top_k": 0}
    # First turns: one batch_chat per tile budget.
    assert tiles6[4] == 6 and tiles6[1] == [[red], [red, blue]]
    assert tiles12[4] == 12 and tiles12[1] == [None] and tiles12[2] == ["Q3"]
    assert tiles6[3] == {"max_new_tokens": 10, "min_new_tokens": 1, "do_sample": False, "top_k": 0}


def test_model_predictor_without_batch_chat(fake_chat):
    module, calls = fake_chat
    del module.batch_chat
    answers = ModelPredictor("m", "t", "c").predict([Request("a", [], "Q", max_new_tokens=5, max_tiles=1)])
    assert answers == ["chat:Q"] and calls[0][3] is None
