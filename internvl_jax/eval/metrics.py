"""Official benchmark metrics as pure-Python scorers (spec §12.3, quirks of §13 item 20).

Per-sample scorers take the model's raw output and the list of ground-truth answers and return
a float in [0, 1]; a benchmark score is `mean_score` over its samples. MME and POPE need the
whole result set, so they take records and return a dict. Each function reproduces the
published evaluator, quirks included, because the reported numbers depend on them.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Callable, Iterable, Mapping, Sequence

from internvl_jax.eval.vqa_normalize import normalize_vqa_answer

# VQA accuracy: an answer is fully right once this many (other) annotators gave it.
_VQA_FULL_CREDIT_MATCHES = 3

ANLS_THRESHOLD = 0.5

# ChartQA: largest relative error still counted as correct.
CHART_MAX_RELATIVE_ERROR = 0.05

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                  "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
                 "code_reasoning")

# The MME post-processor deletes exactly this block (CJK Unified Ideographs up to U+9FA5);
# CJK punctuation and rarer ideographs survive.
_MME_CJK = re.compile("[\u4e00-\u9fa5]")

# MMBench circular copies of a question carry index + k * this offset.
MMBENCH_CIRCULAR_OFFSET = 1_000_000


def _require_answers(answers: Sequence[str]) -> None:
    if not answers:
        raise ValueError("at least one ground-truth answer is required")


def mean_score(scores: Iterable[float]) -> float:
    """Mean of per-sample scores; an empty benchmark is an error rather than a silent 0."""
    values = list(scores)
    if not values:
        raise ValueError("cannot average an empty list of scores")
    return sum(values) / len(values)


# ---------------------------------------------------------------------------------------------
# VQA accuracy (TextVQA, VQAv2, OKVQA, VizWiz)
# ---------------------------------------------------------------------------------------------

def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy of one prediction against the annotators' answers (normally 10).

    Everything is normalised with the EvalAI processor. For each annotator i, the prediction
    earns min(1, matches among the other annotators / 3); the score is the mean over all i.
    With one answer the only subset is empty, so the score is always 0 (the published
    definition; such data should use `exact_match` instead).
    """
    _require_answers(answers)
    predicted = normalize_vqa_answer(prediction)
    matches = [normalize_vqa_answer(answer) == predicted for answer in answers]
    total_matches = sum(matches)
    per_subset = [min(1.0, (total_matches - left_out_matched) / _VQA_FULL_CREDIT_MATCHES)
                  for left_out_matched in matches]
    return sum(per_subset) / len(per_subset)


# ---------------------------------------------------------------------------------------------
# ANLS (DocVQA, InfographicVQA)
# ---------------------------------------------------------------------------------------------

def levenshtein(first: str, second: str) -> int:
    """Edit distance (unit-cost insert, delete, substitute) between two strings."""
    if len(first) < len(second):
        first, second = second, first
    previous = list(range(len(second) + 1))
    for i, char_a in enumerate(first, start=1):
        current = [i]
        for j, char_b in enumerate(second, start=1):
            current.append(min(previous[j] + 1,           # delete char_a
                               current[j - 1] + 1,        # insert char_b
                               previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _anls_collapse(text: str) -> str:
    return " ".join(text.strip().lower().split())


def normalized_levenshtein(truth: str, prediction: str) -> float:
    """Distance of the normalised strings over the longer RAW string's `.upper()` length.

    The denominator deliberately uses the unstripped strings after `.upper()` (so trailing
    spaces count and 'ß' counts twice), as the official script does.
    """
    length = max(len(truth.upper()), len(prediction.upper()))
    if length == 0:
        return 0.0
    return levenshtein(_anls_collapse(truth), _anls_collapse(prediction)) / length


def anls(prediction: str, answers: list[str], threshold: float = ANLS_THRESHOLD) -> float:
    """Average Normalised Levenshtein Similarity of one prediction (before averaging).

    1 - the smallest normalised distance to any answer; similarities below `threshold` count
    as 0 (a similarity exactly at the threshold is kept).
    """
    _require_answers(answers)
    similarity = 1.0 - min(normalized_levenshtein(answer, prediction) for answer in answers)
    return similarity if similarity >= threshold else 0.0


# ---------------------------------------------------------------------------------------------
# Relaxed accuracy (ChartQA)
# ---------------------------------------------------------------------------------------------

def _parse_chart_number(text: str) -> float | None:
    """A float, with a trailing '%' meaning "divide by 100"; None when it does not parse."""
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def _relaxed_match(model_answer: str, truth: str) -> bool:
    model_value = _parse_chart_number(model_answer)
    truth_value = _parse_chart_number(truth)
    # The official code feeds (model answer, truth) into pix2struct's (target, prediction)
    # slots, so the relative error is measured against the MODEL's value, and a model value
    # of 0 (or a non-number) falls back to string comparison.
    if truth_value is not None and model_value is not None and model_value != 0:
        return abs(truth_value - model_value) / abs(model_value) <= CHART_MAX_RELATIVE_ERROR
    return model_answer.lower() == truth.lower()


def relaxed_accuracy(prediction: str, answers: list[str]) -> float:
    """ChartQA relaxed accuracy: 1.0 if the stripped prediction matches any answer."""
    _require_answers(answers)
    model_answer = prediction.strip()
    return float(any(_relaxed_match(model_answer, truth) for truth in answers))


# ---------------------------------------------------------------------------------------------
# Exact match (AI2D)
# ---------------------------------------------------------------------------------------------

def exact_match(prediction: str, answers: list[str]) -> float:
    """1.0 if the prediction equals any answer after strip + lowercase, else 0.0."""
    _require_answers(answers)
    predicted = prediction.strip().lower()
    return float(any(predicted == answer.strip().lower() for answer in answers))


# ---------------------------------------------------------------------------------------------
# MME
# ---------------------------------------------------------------------------------------------

def mme_postprocess(prediction: str) -> str:
    """The harness's answer clean-up, applied before parsing (order matters: 不是 before 是)."""
    text = prediction.replace("\n", "")
    text = text.replace("不是", "No").replace("是", "Yes").replace("否", "No")
    text = text.lower().replace("true", "yes").replace("false", "no")
    return _MME_CJK.sub("", text)


def mme_parse(prediction: str) -> str:
    """'yes' / 'no' / 'other': exact yes/no, else whichever occurs in the first 4 characters."""
    text = mme_postprocess(prediction)
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def _mme_subtask_scores(questions: list[tuple[str, str, str]]) -> dict[str, float]:
    """acc (per question), acc_plus (per image, all its questions right) and their score."""
    correct_by_image: dict[str, list[bool]] = defaultdict(list)
    for image, truth, prediction in questions:
        truth = truth.strip().lower()
        if truth not in ("yes", "no"):
            raise ValueError(f"MME ground truth must be yes/no, got {truth!r}")
        correct_by_image[image].append(mme_parse(prediction) == truth)
    outcomes = [ok for per_image in correct_by_image.values() for ok in per_image]
    acc = sum(outcomes) / len(outcomes)
    images_all_correct = sum(all(per_image) for per_image in correct_by_image.values())
    acc_plus = images_all_correct / len(correct_by_image)
    return {"acc": acc, "acc_plus": acc_plus, "score": 100.0 * (acc + acc_plus)}


def mme_scores(records: Iterable[tuple[str, str, str, str]]) -> dict:
    """MME scores from (subtask, image, gt, prediction) records; predictions are raw outputs.

    Returns {"subtasks": {name: {"acc", "acc_plus", "score"}}, "perception", "cognition",
    "total"}; a subtask scores 100·acc + 100·acc+ (max 200), perception sums the ten perception
    subtasks present and cognition the four cognition ones.
    """
    by_subtask: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for subtask, image, truth, prediction in records:
        if subtask not in MME_PERCEPTION and subtask not in MME_COGNITION:
            raise ValueError(f"unknown MME subtask {subtask!r}")
        by_subtask[subtask].append((image, truth, prediction))
    subtasks = {name: _mme_subtask_scores(questions) for name, questions in by_subtask.items()}
    perception = sum(s["score"] for name, s in subtasks.items() if name in MME_PERCEPTION)
    cognition = sum(s["score"] for name, s in subtasks.items() if name in MME_COGNITION)
    return {"subtasks": subtasks, "perception": perception, "cognition": cognition,
            "total": perception + cognition}


# ---------------------------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------------------------

def pope_parse(prediction: str) -> str:
    """'no' if the first sentence contains the word 'No', 'not' or 'no', else 'yes'.

    Words are split on single spaces only (so "No\\nthere" is one word), case-sensitively.
    """
    first_sentence = prediction.split(".")[0].replace(",", "")
    words = first_sentence.split(" ")
    return "no" if any(word in ("No", "not", "no") for word in words) else "yes"


def _ratio(numerator: int, denominator: int) -> float:
    # The official script divides by zero here; 0.0 keeps a degenerate category reportable.
    return numerator / denominator if denominator else 0.0


def _pope_category_scores(labels: list[bool], predictions: list[bool]) -> dict[str, float]:
    pairs = list(zip(labels, predictions))
    true_pos = sum(label and pred for label, pred in pairs)
    false_pos = sum(pred and not label for label, pred in pairs)
    false_neg = sum(label and not pred for label, pred in pairs)
    true_neg = len(pairs) - true_pos - false_pos - false_neg
    precision = _ratio(true_pos, true_pos + false_pos)
    recall = _ratio(true_pos, true_pos + false_neg)
    return {
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "accuracy": (true_pos + true_neg) / len(pairs),
        "yes_ratio": sum(predictions) / len(predictions),
    }


def pope_scores(records: Iterable[tuple[str, str, str]]) -> dict:
    """POPE scores from (category, label, prediction) records; label is 'yes' or 'no'.

    Returns {"categories": {name: {"precision", "recall", "f1", "accuracy", "yes_ratio"}},
    "mean_f1"}, all in [0, 1], with "yes" as the positive class.
    """
    labels: dict[str, list[bool]] = defaultdict(list)
    predictions: dict[str, list[bool]] = defaultdict(list)
    for category, label, prediction in records:
        if label not in ("yes", "no"):
            raise ValueError(f"POPE label must be yes/no, got {label!r}")
        labels[category].append(label == "yes")
        predictions[category].append(pope_parse(prediction) == "yes")
    categories = {name: _pope_category_scores(labels[name], predictions[name]) for name in labels}
    return {"categories": categories,
            "mean_f1": mean_score(scores["f1"] for scores in categories.values())}


# ---------------------------------------------------------------------------------------------
# Multiple choice (MMBench, CCBench, ScienceQA)
# ---------------------------------------------------------------------------------------------

def _parenthesised_letter(text: str, options: Mapping[str, str]) -> str | None:
    if len(text) >= 3 and text[0] == "(" and text[2] == ")" and text[1] in options:
        return text[1]
    return None


def extract_choice(prediction: str, options: Mapping[str, str]) -> str | None:
    """The option letter a model output picks, or None if none can be found.

    Rules in order: a one-character output is returned as is (even if it is not an option);
    an output starting with an option letter gives that letter ("A.", "A cat", and also
    "Apple" when "A" is an option); "(A)" gives "A"; otherwise the first option, in `options`
    order, whose text occurs in the output. Empty option texts are skipped, since "" would
    match every output.
    """
    text = prediction.strip()
    if len(text) == 1:
        return text
    if not text:
        return None
    if text[0] in options:
        return text[0]
    letter = _parenthesised_letter(text, options)
    if letter is not None:
        return letter
    for letter, option_text in options.items():
        if option_text and option_text in text:
            return letter
    return None


def mmbench_circular_group(index: int) -> int:
    """The original question a (possibly rotated) MMBench row belongs to."""
    return index % MMBENCH_CIRCULAR_OFFSET


def mmbench_circular_accuracy(records: Iterable[Mapping]) -> float:
    """Circular-evaluation accuracy over question groups, in [0, 1].

    Each record is a mapping with "group" (the original question, e.g. from
    `mmbench_circular_group`), "prediction" (raw model output), "options" (letter -> text, as
    shown for that rotation) and "answer" (the correct letter for that rotation). A group is
    correct only if every one of its rows is; with one row per group this is plain accuracy
    (ScienceQA).
    """
    group_correct: dict[object, bool] = {}
    for record in records:
        correct = extract_choice(record["prediction"], record["options"]) == record["answer"]
        group_correct[record["group"]] = group_correct.get(record["group"], True) and correct
    return mean_score(float(ok) for ok in group_correct.values())


# Per-sample scorers for the generic JSONL benchmark runner: name -> f(prediction, answers).
METRICS: dict[str, Callable[[str, list[str]], float]] = {
    "vqa_accuracy": vqa_accuracy,
    "anls": anls,
    "relaxed_accuracy": relaxed_accuracy,
    "exact_match": exact_match,
}
