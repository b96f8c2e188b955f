"""Benchmark readers, prompts and official scores on hand-written files in each official format.

`tests/eval_data/` holds small files written by hand in the layout of InternVL's data folder
(JSONL, MMBench/VLMEvalKit TSVs, MME question lists, POPE label files). The tests copy it, draw the
images it names (plain colours, listed in `images.txt`) and put base64 PNGs where a TSV says
`@@colour@@`. A scripted predictor answers each (sample id, exact prompt) pair, so a wrong prompt
fails the test, and every expected score is worked out by hand in the comment next to it.

These helpers (the data folder, the scripted predictor, the expected prompts) are shared with
test_eval_runner.py and test_eval_cli.py.
"""
import base64
import io
import pathlib
import shutil

import pytest
from PIL import Image

from internvl_jax.eval import presets
from internvl_jax.eval.benchmarks import get_benchmark
from internvl_jax.eval.presets import resolve_options
from internvl_jax.eval.runner import Request
from internvl_jax.eval.samples import BenchmarkError

EVAL_DATA = pathlib.Path(__file__).resolve().parent / "eval_data"
TSV_IMAGE_SIZE = (8, 8)

VQA = "Answer the question using a single word or phrase."
MC = "Answer with the option's letter from the given choices directly."


def make_data_dir(root: pathlib.Path) -> pathlib.Path:
    """A copy of tests/eval_data with its images drawn and base64 images put into the TSVs."""
    data = root / "data"
    shutil.copytree(EVAL_DATA, data)
    for line in (EVAL_DATA / "images.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            path, width, height, colour = line.split()
            (data / path).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (int(width), int(height)), colour).save(data / path)
    for tsv in data.rglob("*.tsv"):
        text = tsv.read_text(encoding="utf-8")
        for colour in ("red", "green", "blue"):
            text = text.replace(f"@@{colour}@@", png_base64(colour))
        tsv.write_text(text, encoding="utf-8")
    return data


def png_base64(colour: str) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", TSV_IMAGE_SIZE, colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
    return make_data_dir(tmp_path_factory.mktemp("eval"))


class ScriptedPredictor:
    """Answers each (request id, exact question) pair from a script; records every request.

    An unscripted pair raises KeyError, which the harness records as that sample's failure.
    """

    def __init__(self, script):
        self.script = dict(script)
        self.requests: list[Request] = []

    def predict(self, requests):
        self.requests.extend(requests)
        return [self.script[(request.id, request.question)] for request in requests]


# Per benchmark: (sample id, the exact prompt the official script builds, scripted answer).
EXPECTED_PROMPTS = {
    "textvqa": [
        # Ten answers: 2x "coca cola", 8x "coke". "Coca-Cola." normalises to "coca cola" ('-' not
        # next to a space becomes a space; the final period goes): an annotator giving it sees
        # 1 other match (1/3), the other 8 see 2 (2/3): (2/3 + 16/3) / 10 = 0.6.
        ("101", "what brand is the sign? " + VQA, "Coca-Cola."),
        # "ten" -> "10", given by 3 of 10: (3 * 2/3 + 7 * 1) / 10 = 0.9.
        ("102", "what number is on the bus? " + VQA, "ten"),
        ("103", "what color is the sign? " + VQA, "blue"),  # 0
    ],
    "docvqa": [
        # vs "March 3, 1999": distance 1 (the comma) over len("MARCH 3, 1999") = 13 -> 12/13.
        ("201", "What is the date? " + VQA, "March 3 1999"),
        # The spec's example: "the cab" vs "The  Cat" -> 1 - 1/8 = 0.875.
        ("202", "Who signed the letter? " + VQA, "the cab"),
    ],
    "infovqa": [
        ("301", "How many countries are shown? " + VQA, "seven"),  # distance 5 / 5 -> 0
        ("302", "Which year had the most sales? " + VQA, "2019"),  # 1
        ("303", "What percentage use mobile? " + VQA, "45 %"),  # "45 %" vs "45%": 1 - 1/4 = 0.75
    ],
    "chartqa": [
        ("human/1", "What is the value of the blue bar? " + VQA, "95"),  # truth 100: 5/95 > 0.05 -> 0
        ("human/2", "What is the value of the red bar? " + VQA, "100"),  # truth 95: 5/100 <= 0.05 -> 1
        ("human/3", "Which country is the largest? " + VQA, " japan "),  # stripped, case-blind -> 1
        ("human/4", "What is the share of Asia? " + VQA, "0.4"),  # truth 40% = 0.4 -> 1
        ("augmented/1", "What is the highest value? " + VQA, "12.5"),  # 1
        ("augmented/2", "What is the lowest value? " + VQA, "0.0"),  # model value 0: "0.0" != "0" -> 0
    ],
    "ai2d": [  # the question already holds the options and the instruction
        ("1", "Which stage comes after the egg?\nA. larva\nB. adult\nC. pupa\nD. nymph\n" + MC, "A"),  # 1
        ("2", "Which stage comes last?\nA. larva\nB. egg\nC. adult\n" + MC, " b "),  # "b" != "c" -> 0
        ("3", "What does the arrow show?\nA. eats\nB. is eaten by\nC. lives in\n" + MC, "c"),  # 1
    ],
    "mmbench_dev_en": [
        ("0", "What color is the square?\nA. red\nB. blue\n" + MC, "A"),
        ("1", "How many circles are there?\nA. 1\nB. 2\nC. 3\n" + MC, "C"),
        ("2", "The picture shows a farm.\nWhich animal is shown?\nA. cow\nB. horse\n" + MC, "cow"),  # text -> A
        ("1000000", "What color is the square?\nA. blue\nB. red\n" + MC, "B. red"),
        ("1000001", "How many circles are there?\nA. 2\nB. 3\nC. 1\n" + MC, "The answer is 3"),  # text -> B
        ("2000001", "How many circles are there?\nA. 3\nB. 1\nC. 2\n" + MC, "B"),  # wrong: answer A
    ],
    "mmbench_dev_cn": [
        ("0", "图中方块是什么颜色？\nA. 红色\nB. 蓝色\n请直接回答选项字母。", "A"),
    ],
    "mmbench_test_en": [
        ("10", "What shape is this?\nA. circle\nB. square\nC. triangle\n" + MC, "A"),
        ("1000010", "What shape is this?\nA. square\nB. triangle\nC. circle\n" + MC, "circle"),
    ],
    "mme": [  # lists in file-name order
        ("code_reasoning:1", "Is the output of the code 5? Please answer yes or no. " + VQA, "是"),  # -> yes
        ("code_reasoning:2", "Is the output of the code 6? Please answer yes or no. " + VQA, "不是"),  # -> no
        ("existence:1", "Is there a red square in the image? Please answer yes or no. " + VQA, "Yes"),
        ("existence:2", "Is there a blue square in the image? Please answer yes or no. " + VQA, "No, there is not."),
        ("existence:3", "Is there a cat in the image? Please answer yes or no. " + VQA, "yes"),  # wrong
        ("existence:4", "Is there a dog in the image? Please answer yes or no. " + VQA, "Yes"),
    ],
    "pope": [  # the official script appends ' ' + an empty prompt
        ("1", "Is there a dog in the image? " + VQA + " ", "Yes"),  # label yes: TP
        ("2", "Is there a cat in the image? " + VQA + " ", "No, there is no cat."),  # label no: TN
        ("3", "Is there a car in the image? " + VQA + " ", "There is not a car."),  # label yes: FN
        ("4", "Is there a bus in the image? " + VQA + " ", "Yes"),  # label no: FP
        ("5", "Is there a tree in the image? " + VQA + " ", "yes"),  # label yes: TP
        ("6", "Is there a bench in the image? " + VQA + " ", "I think No"),  # label yes: FN
    ],
    "scienceqa": [
        ("1", "Ducks have webbed feet.\nWhich animal's feet are also adapted for swimming?\nA. otter\nB. giraffe\n"
         + MC, "A"),
        ("2", "What is the capital of Utah?\nA. Denver\nB. Salt Lake City\nC. Boise\n" + MC, "(B)"),
        ("3", "Which is a conductor?\nA. rubber\nB. copper\n" + MC, "rubber"),  # -> A, wrong
    ],
    "jsonl:custom/shapes.jsonl": [
        ("q1", "What shape is shown? " + VQA, "Circle"),  # exact match, case-blind: 1
        ("q2", "Are the two shapes the same? " + VQA, "No."),  # "no." != "no": 0
        ("q3", "What is 2 + 3? " + VQA, "5"),  # 1 (a text-only row)
        ("q4", "What colour is the shape? " + VQA, "navy "),  # 1
    ],
    "tsv:seed/SEEDBench_IMG_mini.tsv": [
        ("5", "How many apples are there?\nA. 1\nB. 2\nC. 3\nD. 4\n" + MC, "B"),
        ("7", "What is the main colour?\nA. red\nB. green\nC. blue\nD. yellow\n" + MC, "green"),  # B, wrong
        ("9", "Is the object round?\nA. yes\nB. no\n" + MC, "A"),
    ],
}

# (score, metric, breakdown) worked out from the comments above.
EXPECTED_SCORES = {
    "textvqa": (100 * (0.6 + 0.9 + 0) / 3, "vqa_accuracy", {}),
    "docvqa": (100 * (12 / 13 + 0.875) / 2, "anls", {}),
    "infovqa": (100 * (0 + 1 + 0.75) / 3, "anls", {}),
    # Human 3/4, augmented 1/2; the final number is their mean (62.5), not pooled (4/6).
    "chartqa": (62.5, "relaxed_accuracy", {"subsets": {"human": 75.0, "augmented": 50.0}}),
    "ai2d": (100 * 2 / 3, "exact_match", {}),
    # Groups: 0 (both rotations right), 1 (rotation 2000001 wrong), 2 (one row, right) -> 2/3.
    "mmbench_dev_en": (100 * 2 / 3, "circular_accuracy",
                       {"groups": 3, "categories": {"animal": 100.0, "color": 100.0, "count": 0.0}}),
    "mmbench_dev_cn": (100.0, "circular_accuracy", {"groups": 1, "categories": {"color": 100.0}}),
    "mmbench_test_en": (None, None, {}),
    # existence: acc 3/4, acc+ 1/2 (only e1 fully right) -> 75 + 50 = 125 (perception);
    # code_reasoning: 200 (cognition); total 325.
    "mme": (325.0, "mme_score", None),
    # F1: adversarial 1, popular 0 (no true positive), random P 1, R 1/2 -> 2/3; mean 5/9.
    "pope": (100 * (1 + 0 + 2 / 3) / 3, "pope_f1", None),
    "scienceqa": (100 * 2 / 3, "circular_accuracy", {"groups": 3, "categories": {}}),
    "jsonl:custom/shapes.jsonl": (75.0, "exact_match", {}),
    "tsv:seed/SEEDBench_IMG_mini.tsv": (100 * 2 / 3, "circular_accuracy", None),
}

# (max_new_tokens, min_new_tokens, max_tiles) of the official preset, spec §12.2.
OFFICIAL_GENERATION = {
    "textvqa": (10, 1, 24), "docvqa": (100, 1, 18), "infovqa": (100, 1, 24), "chartqa": (100, 1, 12),
    "ai2d": (10, 1, 6), "mmbench_dev_en": (100, 1, 6), "mmbench_dev_cn": (100, 1, 6),
    "mmbench_test_en": (100, 1, 6), "mme": (20, 0, 12), "pope": (100, 1, 6), "scienceqa": (100, 1, 6),
    "jsonl:custom/shapes.jsonl": (100, 1, 6), "tsv:seed/SEEDBench_IMG_mini.tsv": (100, 1, 6),
}


def script_for(*names):
    return {(sample_id, prompt): answer for name in names for sample_id, prompt, answer in EXPECTED_PROMPTS[name]}


def load(name, data_dir, preset="official", overrides=None):
    benchmark = get_benchmark(name)
    options = resolve_options([benchmark], preset, overrides or {})[benchmark.name]
    return benchmark, options, benchmark.load(data_dir, options)


@pytest.mark.parametrize("name", list(EXPECTED_PROMPTS))
def test_official_prompts_and_scores(name, data_dir):
    benchmark, options, samples = load(name, data_dir)
    assert [(s.id, s.prompt) for s in samples] == [(i, p) for i, p, _ in EXPECTED_PROMPTS[name]]
    assert (options["max_new_tokens"], options["min_new_tokens"], options["max_tiles"]) == OFFICIAL_GENERATION[name]
    predictions = {sample_id: answer for sample_id, _, answer in EXPECTED_PROMPTS[name]}
    score = benchmark.score(samples, predictions, options)
    value, metric, details = EXPECTED_SCORES[name]
    if value is None:
        assert score is None
        return
    assert score.value == pytest.approx(value)
    assert score.metric == metric
    if details is not None:
        assert score.details == details


def test_mme_and_pope_breakdowns(data_dir):
    benchmark, options, samples = load("mme", data_dir)
    score = benchmark.score(samples, {i: a for i, _, a in EXPECTED_PROMPTS["mme"]}, options)
    assert score.details["perception"] == pytest.approx(125.0)
    assert score.details["cognition"] == pytest.approx(200.0)
    assert score.details["subtasks"]["existence"] == pytest.approx({"acc": 0.75, "acc_plus": 0.5, "score": 125.0})
    benchmark, options, samples = load("pope", data_dir)
    score = benchmark.score(samples, {i: a for i, _, a in EXPECTED_PROMPTS["pope"]}, options)
    assert {name: c["f1"] for name, c in score.details["categories"].items()} == \
        pytest.approx({"adversarial": 1.0, "popular": 0.0, "random": 2 / 3})
    # random: 2 yes labels, answers yes/no -> yes ratio 1/2; adversarial accuracy 2/2.
    assert score.details["categories"]["random"]["yes_ratio"] == 0.5
    assert score.details["categories"]["adversarial"]["accuracy"] == 1.0


def test_images_resolve_and_decode(data_dir):
    """Official 'data/...' paths, MME's nested images/ folder, base64 TSV cells and VLMEvalKit's
    image references (a row index in place of the data) all decode to the drawn images."""
    _, _, samples = load("textvqa", data_dir)
    assert samples[0].images[0].load().size == (64, 48)
    assert samples[0].images[0].load().getpixel((0, 0)) == (255, 0, 0)
    _, _, samples = load("mme", data_dir)
    by_id = {s.id: s for s in samples}
    assert by_id["existence:1"].images[0].path.endswith("existence/images/e1.png")
    assert by_id["code_reasoning:1"].images[0].load().size == (48, 24)
    _, _, samples = load("tsv:seed/SEEDBench_IMG_mini.tsv", data_dir)
    by_id = {s.id: s for s in samples}
    assert by_id["9"].images[0].load().tobytes() == by_id["5"].images[0].load().tobytes()
    assert by_id["9"].images[0].load().getpixel((0, 0)) == (255, 0, 0)
    _, _, samples = load("jsonl:custom/shapes.jsonl", data_dir)
    assert [len(s.images) for s in samples] == [1, 2, 0, 1]


def test_annotation_files_give_the_ground_truth(data_dir):
    """InfoVQA scored against its DocVQA-format GT file equals the JSONL answers' score; TextVQA
    takes its ten answers from the VQA-format annotation file."""
    predictions = {i: a for i, _, a in EXPECTED_PROMPTS["infovqa"]}
    gt_file = {"annotation": "infographicsvqa/infographicsVQA_val_v1.0_withQT.json"}
    benchmark, options, samples = load("infovqa", data_dir, overrides=gt_file)
    assert samples[1].answers == ("2019", "in 2019")
    assert benchmark.score(samples, predictions, options).value == pytest.approx(100 * 1.75 / 3)
    _, _, samples = load("textvqa", data_dir)
    assert samples[0].answers == ("coca cola",) * 2 + ("coke",) * 8


def test_vlmevalkit_preset(data_dir):
    """VLMEvalKit's InternVL-V1-5 wrapper: '\\n' before the VQA instruction, TextVQA and MME at
    6 tiles, DocVQA 18, InfoVQA 24, ChartQA 12; POPE's question as it is."""
    _, options, samples = load("textvqa", data_dir, preset="vlmevalkit")
    assert samples[0].prompt == "what brand is the sign?\n" + VQA
    assert options["max_tiles"] == 6 and options["max_new_tokens"] == 1024 and options["min_new_tokens"] == 0
    _, options, samples = load("mme", data_dir, preset="vlmevalkit")
    assert samples[2].prompt == "Is there a red square in the image? Please answer yes or no. " + VQA
    assert options["max_tiles"] == 6
    _, _, samples = load("pope", data_dir, preset="vlmevalkit")
    assert samples[0].prompt == "Is there a dog in the image? " + VQA
    tiles = {name: presets.PRESETS["vlmevalkit"][name]["max_tiles"]
             for name in ("docvqa", "infovqa", "chartqa", "ai2d")}
    assert tiles == {"docvqa": 18, "infovqa": 24, "chartqa": 12, "ai2d": 6}
    _, _, samples = load("mmbench_dev_en", data_dir, preset="vlmevalkit")
    assert samples[0].prompt == EXPECTED_PROMPTS["mmbench_dev_en"][0][1]


def test_overrides_by_scope(data_dir):
    """Bare keys apply to all, KIND.key to a family, NAME.key to one; the most specific wins."""
    benchmarks = [get_benchmark(name) for name in ("mmbench_dev_en", "mmbench_dev_cn", "textvqa")]
    options = resolve_options(benchmarks, "official", {"max_tiles": "3", "mmbench.max_tiles": "4",
                                                       "mmbench_dev_cn.max_tiles": "5",
                                                       "textvqa.prompt": "Short answer:", "prompt_sep": "\\n"})
    assert [options[b.name]["max_tiles"] for b in benchmarks] == [4, 5, 3]
    assert options["textvqa"]["prompt"] == "Short answer:" and options["textvqa"]["prompt_sep"] == "\n"
    benchmark = benchmarks[2]
    samples = benchmark.load(data_dir, options["textvqa"])
    assert samples[0].prompt == "what brand is the sign?\nShort answer:"
    assert resolve_options(benchmarks[2:], "official", {}, max_tiles=40)["textvqa"]["max_tiles"] == 40


@pytest.mark.parametrize("overrides, message", [
    ({"textvqa.metric": "anls"}, "textvqa has no setting 'metric'"),
    ({"pope.max_tiles": "2"}, "select no benchmark"),
    ({"max_tiles": "many"}, "'max_tiles' must be an integer"),
    ({"max_new_tokens": "0"}, "out of range"),
])
def test_bad_overrides(overrides, message):
    with pytest.raises(ValueError, match=message):
        resolve_options([get_benchmark("textvqa")], "official", overrides)


def test_generic_jsonl_metric_option(data_dir):
    # ANLS instead: q2 "No." vs "no" is 1 - 1/3 -> (1 + 2/3 + 1 + 1) / 4.
    benchmark, options, samples = load("jsonl:custom/shapes.jsonl", data_dir, overrides={"jsonl.metric": "anls"})
    predictions = {i: a for i, _, a in EXPECTED_PROMPTS["jsonl:custom/shapes.jsonl"]}
    assert benchmark.score(samples, predictions, options).value == pytest.approx(100 * (3 + 2 / 3) / 4)
    with pytest.raises(BenchmarkError, match="unknown metric 'bleu'"):
        load("jsonl:custom/shapes.jsonl", data_dir, overrides={"shapes.metric": "bleu"})


@pytest.mark.parametrize("name, overrides, message", [
    ("jsonl:bad/malformed.jsonl", {}, r"bad/malformed\.jsonl, line 2: malformed JSON"),
    ("jsonl:bad/empty.jsonl", {}, r"bad/empty\.jsonl: no samples for empty"),
    ("jsonl:bad/duplicate_ids.jsonl", {}, r"duplicate_ids\.jsonl, line 2: sample id 'a' repeats the one at .*line 1"),
    ("docvqa", {"docvqa.file": "bad/no_answer.jsonl"}, r"bad/no_answer\.jsonl, line 2: missing field 'answer'"),
    ("mme", {"mme.lists": "bad/mme/Your_Results"}, r"count\.txt, line 2: expected 'image<TAB>question<TAB>answer'"),
    ("tsv:bad/short_row.tsv", {}, r"short_row\.tsv, line 3: 5 fields, but the header has 6 columns"),
    ("pope", {"pope.labels": "bad", "pope.file": "pope/llava_pope_test.jsonl"}, r"coco_pope_adversarial\.json"),
    ("textvqa", {"textvqa.file": "nowhere/val.jsonl"}, r"nowhere/val\.jsonl: JSONL file not found"),
    ("mmbench_dev_en", {"mmbench.file": "mmbench/mmbench_test_en_20231003.tsv"},
     r"mmbench_test_en_20231003\.tsv, line 2: missing field 'answer'"),
])
def test_bad_input_names_file_and_line(name, overrides, message, data_dir):
    with pytest.raises(BenchmarkError, match=message):
        load(name, data_dir, overrides=overrides)


def test_pope_labels_must_pair_with_questions(data_dir, tmp_path):
    labels = tmp_path / "labels"
    shutil.copytree(data_dir / "pope" / "coco", labels)
    shutil.copy(data_dir / "bad" / "pope_short_labels.json", labels / "coco_pope_adversarial.json")
    with pytest.raises(BenchmarkError, match=r"coco_pope_adversarial\.json: 1 labels, but .* has 2 'adversarial'"):
        load("pope", data_dir, overrides={"pope.labels": str(labels)})
    # The second popular label names another image: pairs by position must agree.
    popular = (labels / "coco_pope_popular.json").read_text().replace("000000000002.jpg\", \"text\": \"Is there a bus",
                                                                       "000000000009.jpg\", \"text\": \"Is there a bus")
    shutil.copy(data_dir / "pope" / "coco" / "coco_pope_adversarial.json", labels)
    (labels / "coco_pope_popular.json").write_text(popular)
    with pytest.raises(BenchmarkError, match=r"coco_pope_popular\.json, line 2: image .*000000000009\.jpg"):
        load("pope", data_dir, overrides={"pope.labels": str(labels)})


def test_unknown_benchmark():
    with pytest.raises(ValueError, match="unknown benchmark 'textvqa_test'; known: textvqa, docvqa"):
        get_benchmark("textvqa_test")
