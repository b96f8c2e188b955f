"""Data translation: markup protection, a fake OpenAI-compatible endpoint, resume, bad input, the tiny model.

The fake endpoint (a thread on 127.0.0.1) "translates" by upper-casing the text outside tags, and
misbehaves on cue: a text holding "lose markup" comes back without its first placeholder, "say
nothing" empty, "ramble" cut at the token limit.
"""
import http.server
import json
import re
import socket
import threading

import pytest

from internvl_jax.data import translate as tr
from internvl_jax.data.sources import open_meta
from test_chat import tokenizer, tokenizer_dir  # noqa: F401  (the tiny model's tokenizer, all ids decodable)

GROUNDING = [
    {"id": 1, "image": "a.jpg", "length": 50, "conversations": [
        {"from": "human", "value": "<image>\nWhere is <ref>the cat</ref>?"},
        {"from": "gpt", "value": "<ref>the cat</ref><box>[[10, 20, 300, 400]]</box>"}]},
    {"id": 2, "image": ["a.jpg", "b.jpg"], "conversations": [
        {"from": "human", "value": "Image-1: <image>\nImage-2: <image>\nWhat differs?"},
        {"from": "gpt", "value": "The second one is red."}]},
    {"id": 3, "image": "a.jpg", "conversations": [
        {"from": "human", "value": "<image>\nlose markup <box>[[1, 2, 3, 4]]</box> here"},
        {"from": "gpt", "value": "Yes."}]},
    None,  # a blank line
    {"id": 4, "image": "a.jpg", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "<box>[[5, 6, 7, 8]]</box>"}]},
]
TEXT = [
    {"conversations": [{"from": "human", "value": "Say nothing, please."}, {"from": "gpt", "value": "ok"}]},
    {"conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "It is 4."}]},
    {"conversations": [{"from": "human", "value": "ramble on"}, {"from": "gpt", "value": "x"}]},
    {"conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "Four."}]},
    {"conversations": [{"from": "human", "value": ["not", "text"]}, {"from": "gpt", "value": "No."}]},
]


def write_jsonl(path, rows):
    path.write_text("".join(("" if row is None else json.dumps(row)) + "\n" for row in rows))
    return path


@pytest.fixture
def meta(tmp_path):
    source = tmp_path / "source"
    (source / "images").mkdir(parents=True)
    write_jsonl(source / "grounding.jsonl", GROUNDING)
    write_jsonl(source / "text.jsonl", TEXT)
    path = source / "meta.json"
    path.write_text(json.dumps({
        "grounding": {"root": "images", "annotation": "grounding.jsonl", "data_augment": True, "repeat_time": 2},
        "text": {"root": "", "annotation": "text.jsonl", "repeat_time": 0.5, "max_dynamic_patch": 4}}))
    return path


def fake_translation(text: str) -> str:
    return re.sub(r"[^<>]+(?=<|$)", lambda match: match.group().upper(), text)


class FakeEndpoint(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        with server.lock:
            server.prompts.append(prompt)
            server.headers.append(self.headers.get("Authorization"))
            failing = server.fail_after is not None and len(server.prompts) > server.fail_after
        if self.path != "/v1/chat/completions" or failing:
            self.send_response(404 if not failing else 500)
            self.end_headers()
            return
        text = prompt.split("Text for translation:\n")[-1]
        finish = "stop"
        if "lose markup" in text:
            text = re.sub(r"<m\d+>", "", text, count=1)
        elif "Say nothing" in text:
            text = ""
        elif "ramble" in text:
            finish = "length"
        reply = {"choices": [{"message": {"role": "assistant", "content": fake_translation(text)},
                              "finish_reason": finish}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def endpoint():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeEndpoint)
    server.lock = threading.Lock()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield server
    server.shutdown()


@pytest.fixture
def fake(endpoint):
    endpoint.prompts, endpoint.headers, endpoint.fail_after = [], [], None
    return endpoint


def cli(meta, out, fake, *extra):
    return tr.main(["--meta", str(meta), "--out-dir", str(out), "--backend", "openai", "--endpoint", fake.url,
                    "--model-name", "fake", "--retries", "0", *extra])


def asked(fake):
    """The texts the endpoint was asked to translate."""
    return [prompt.split("Text for translation:\n")[-1] for prompt in fake.prompts]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def values(row):
    return [turn["value"] for turn in row["conversations"]]


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source, translation, expected", [
    ("<image>\nWhat is <ref>the cat</ref><box>[[1, 2, 3, 4]]</box> doing?", "猫<m1>猫咪<m2><m3>在干什么？",
     "<image>\n猫<ref>猫咪</ref><box>[[1, 2, 3, 4]]</box>在干什么？"),
    ("Image-1: <image>\nImage-2: <image>\nWhat differs?", "有什么不同？", "Image-1: <image>\nImage-2: <image>\n有什么不同？"),
    ("<ref>the man</ref><box>[[1,2,3,4]]</box>", " <m1>那个男人<m2> ", "<ref>那个男人</ref><box>[[1,2,3,4]]</box>"),
    # Groups may change places; coordinates stay with their markup.
    ("<ref>a</ref><box>[[1]]</box> and <ref>b</ref><box>[[2]]</box> here", "在这里：<m4>B<m5><m6> 和 <m1>A<m2><m3>",
     "在这里：<ref>B</ref><box>[[2]]</box> 和 <ref>A</ref><box>[[1]]</box>"),
])
def test_markup_is_restored(source, translation, expected):
    assert tr.restore(tr.protect(source), translation, source) == expected


@pytest.mark.parametrize("source, translation, message", [
    ("<image>\nWhat is <ref>cat</ref><box>[[1, 2, 3, 4]]</box>?", "什么<m1>猫<m2>？", r"missing <box>\[\[1, 2, 3, 4\]\]</box>"),
    ("<image>\nWhat is <ref>cat</ref>?", "什么<m2>猫<m1>？", "out of order"),
    ("What is <ref>cat</ref>?", "<m1>猫<m2><m3>", "unknown placeholder <m3>"),
    ("What is <ref>cat</ref>?", "<m1>猫<m2><b>", "extra <b>"),
    ("Look at <quad>[[1, 2], [3, 4]]</quad> now", "看现在", r"missing <quad>"),
    ("What is it?", "  \n", "empty"),
])
def test_broken_markup_is_rejected(source, translation, message):
    with pytest.raises(tr.MarkupError, match=message):
        tr.restore(tr.protect(source), translation, source)


def test_markup_only_turns_need_no_translation():
    for text in ("<image>", " <image>\n", "Image-1: <image>\nImage-2: <image>", "<box>[[1, 2, 3, 4]]</box>", "42."):
        assert not tr.protect(text).needs_translation
    protected = tr.protect("a <m1> b <|im_end|>")  # a literal placeholder-like tag is markup like any other
    assert protected.core == "a <m1> b" and protected.spans == ("<m1>",)
    assert tr.language_suffix("Chinese") == "_zh" and tr.language_suffix("Old Norse") == "_old_norse"


def test_meta_translated_through_an_openai_endpoint(meta, tmp_path, fake, monkeypatch, capsys, caplog):
    monkeypatch.setenv("FAKE_KEY", "sekrit")
    out = tmp_path / "out"
    assert cli(meta, out, fake, "--api-key-env", "FAKE_KEY", "--batch-size", "2") == 0
    assert set(fake.headers) == {"Bearer sekrit"}
    # "What is 2+2?" is asked once; markup-only turns never, nor the markup around a turn.
    assert len(asked(fake)) == len(set(asked(fake))) == 13
    assert "<image>" not in "".join(asked(fake)) and "Where is <m1>the cat<m2>?" in asked(fake)

    new_meta = json.loads((out / "meta_zh.json").read_text())
    assert new_meta == {
        "grounding_zh": {"root": str(meta.parent / "images"), "annotation": "grounding_zh.jsonl",
                         "data_augment": True, "repeat_time": 2.0, "length": 4},
        "text_zh": {"root": "", "annotation": "text_zh.jsonl", "data_augment": False, "repeat_time": 0.5,
                    "length": 5, "max_dynamic_patch": 4}}
    # The new set reads as training data, its images where they were.
    old, new = open_meta(meta), open_meta(out / "meta_zh.json")
    assert [record.images for record in new.source(0)] == [record.images for record in old.source(0)]

    grounding = read_jsonl(out / "grounding_zh.jsonl")
    source_lines = [line for line in (meta.parent / "grounding.jsonl").read_text().splitlines() if line]
    assert values(grounding[0]) == ["<image>\nWHERE IS <ref>THE CAT</ref>?",
                                    "<ref>THE CAT</ref><box>[[10, 20, 300, 400]]</box>"]
    assert "length" not in grounding[0] and grounding[0]["id"] == 1
    assert values(grounding[1]) == ["Image-1: <image>\nImage-2: <image>\nWHAT DIFFERS?", "THE SECOND ONE IS RED."]
    kept = (out / "grounding_zh.jsonl").read_text().splitlines()
    assert kept[2] == source_lines[2] and kept[3] == source_lines[3]  # box dropped: kept; nothing to translate
    text = read_jsonl(out / "text_zh.jsonl")
    assert [values(row) for row in text] == [values(row) for row in TEXT[:1]] + [["WHAT IS 2+2?", "IT IS 4."]] + [
        values(TEXT[2]), ["WHAT IS 2+2?", "FOUR."], values(TEXT[4])]

    report = capsys.readouterr().out
    assert "grounding_zh -> " in report and "4 rows, 2 translated, 1 with nothing to translate, 1 kept untranslated " \
                                            "(markup_changed 1)" in report
    assert "2 translated, 0 with nothing to translate, 3 kept untranslated (empty 1, not_text 1, truncated 1)" in report
    assert f"{meta.parent / 'grounding.jsonl'}:3: turn 1: markup_changed: missing <box>[[1, 2, 3, 4]]</box>" in report
    assert f"{meta.parent / 'text.jsonl'}:3: kept untranslated: turn 1: truncated" in caplog.text


def test_an_interrupted_run_resumes(meta, tmp_path, fake, capsys):
    out = tmp_path / "out"
    fake.fail_after = 3
    assert cli(meta, out, fake, "--batch-size", "2") == 1
    assert "run the same command again to resume" in capsys.readouterr().err
    assert not (out / "meta_zh.json").exists()
    finished = fake.prompts[:2]  # the first batch (row 1); row 2's batch failed

    fake.prompts, fake.fail_after = [], None
    assert cli(meta, out, fake, "--batch-size", "2", "--limit", "3") == 0
    assert not set(finished) & set(fake.prompts)
    assert json.loads((out / "meta_zh.json").read_text())["grounding_zh"]["length"] == 3
    assert len(read_jsonl(out / "text_zh.jsonl")) == 3

    fake.prompts = []
    assert cli(meta, out, fake, "--batch-size", "2") == 0
    assert sorted(asked(fake)) == ["Four.", "What is 2+2?"]  # only the last text row (the last image row has no text)
    fresh = tmp_path / "fresh"
    assert cli(meta, fresh, fake, "--batch-size", "5") == 0
    for name in ("grounding_zh.jsonl", "text_zh.jsonl", "meta_zh.json"):
        assert (out / name).read_text() == (fresh / name).read_text()

    capsys.readouterr()
    assert cli(meta, out, fake, "--target-language", "French") == 2
    assert "translated with other settings" in capsys.readouterr().err


def test_bad_input_is_reported_with_its_place(meta, tmp_path, fake, capsys):
    out = tmp_path / "out"
    assert cli(tmp_path / "absent.json", out, fake) == 2
    assert "absent.json: meta file not found" in capsys.readouterr().err

    (meta.parent / "text.jsonl").write_text(json.dumps(TEXT[0]) + "\n{\"conversations\": [\n")
    assert cli(meta, out, fake) == 2
    assert f"{meta.parent / 'text.jsonl'}:2: invalid_json" in capsys.readouterr().err
    (meta.parent / "text.jsonl").unlink()
    assert cli(meta, out, fake) == 2
    assert "text.jsonl" in capsys.readouterr().err
    assert fake.prompts == []  # every source is checked before anything is translated

    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Translate into {language}.")
    assert cli(meta, out, fake, "--prompt-file", str(prompt)) == 2
    assert "no {text} placeholder" in capsys.readouterr().err
    assert tr.main(["--jsonl", str(meta.parent / "grounding.jsonl"), "--out-dir", str(out), "--backend",
                    "openai"]) == 2
    assert "needs --endpoint and --model-name" in capsys.readouterr().err


def test_endpoint_failures_stop_the_run(fake):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    backend = tr.OpenAIBackend(f"http://127.0.0.1:{port}/v1", "fake", retries=1, backoff=0.01)
    with pytest.raises(tr.BackendError, match="refused"):
        backend.translate(["hello"])
    wrong_path = tr.OpenAIBackend(fake.url.removesuffix("/v1") + "/v2/chat/completions", "fake", retries=3)
    with pytest.raises(tr.BackendError, match="HTTP 404"):  # not transient: no retries
        wrong_path.translate(["hello"])
    assert len(fake.prompts) == 1


def test_tiny_model_backend(tmp_path, tiny_model, tokenizer, capsys):  # noqa: F811
    """A random model never stops: its replies are cut at the token limit, and those rows kept."""
    export = pytest.importorskip("internvl_jax.convert.export", reason="checkpoint export not available")
    checkpoint = export.export_model(tiny_model, tmp_path / "checkpoint", tokenizer=tokenizer)
    rows = [GROUNDING[0], TEXT[1], GROUNDING[4]]
    source = write_jsonl(tmp_path / "small.jsonl", rows)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("To {language}: {text}")
    out = tmp_path / "out"
    assert tr.main(["--jsonl", str(source), "--root", str(tmp_path / "images"), "--out-dir", str(out),
                    "--backend", "model", "--checkpoint", str(checkpoint), "--prompt-file", str(prompt),
                    "--batch-size", "2", "--max-new-tokens", "12"]) == 0
    assert "small_zh.jsonl: 3 rows, 0 translated, 1 with nothing to translate, 2 kept untranslated (truncated 2)" \
        in capsys.readouterr().out
    assert (out / "small_zh.jsonl").read_text() == source.read_text()
    assert json.loads((out / "small_zh.json").read_text())["small_zh"]["root"] == str(tmp_path / "images")
    assert len(open_meta(out / "small_zh.json")) == 3
