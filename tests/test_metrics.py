"""Hand-worked cases for the evaluation metrics (spec §12.3, quirks of §13 item 20).

Every expected value is derived by hand in the comment next to it.
"""
import pytest

from internvl_jax.eval.metrics import (
    METRICS,
    anls,
    exact_match,
    extract_choice,
    levenshtein,
    mean_score,
    mme_parse,
    mme_scores,
    mmbench_circular_accuracy,
    mmbench_circular_group,
    pope_parse,
    pope_scores,
    relaxed_accuracy,
    vqa_accuracy,
)
from internvl_jax.eval.vqa_normalize import normalize_vqa_answer, process_punctuation

LISTED_MARKS = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", "!"]


# ---------------------------------------------------------------------------------------------
# EvalAI normaliser, one rule at a time
# ---------------------------------------------------------------------------------------------

def test_lowercases():
    # Step 1 lowercases everything.
    assert normalize_vqa_answer("Yes") == "yes"


def test_commas_and_question_marks_are_deleted_not_spaced():
    # Step 1 deletes "," and "?" outright, so the pieces join up: "red,blue" -> "redblue".
    assert normalize_vqa_answer("red,blue") == "redblue"
    assert normalize_vqa_answer("1,000") == "1000"
    assert normalize_vqa_answer("yes?") == "yes"


def test_possessive_s_is_split_off():
    # "'s" -> " 's", so "man's hat" becomes three words.
    assert normalize_vqa_answer("man's hat") == "man 's hat"


def test_newlines_and_tabs_become_spaces_before_punctuation():
    # "x-\ny-z" -> "x- y-z"; now "- " occurs, so every "-" is deleted -> "x yz".
    # (Had the newline stayed, "-" would touch no space and become spaces: "x y z".)
    assert normalize_vqa_answer("x-\ny-z") == "x yz"
    assert normalize_vqa_answer("red\tbike") == "red bike"


@pytest.mark.parametrize("mark", LISTED_MARKS)
def test_listed_punctuation_not_touching_a_space_becomes_a_space(mark):
    # f"x{mark}y": the mark has no space beside it -> replaced by " " -> "x y".
    assert normalize_vqa_answer(f"x{mark}y") == "x y"


@pytest.mark.parametrize("mark", LISTED_MARKS)
def test_listed_punctuation_touching_a_space_is_deleted_everywhere(mark):
    # f"x{mark}y {mark}z": " {mark}" occurs, so every occurrence is deleted -> "xy z".
    assert normalize_vqa_answer(f"x{mark}y {mark}z") == "xy z"


@pytest.mark.parametrize("char", ["'", ":", "%", "#", "$", "&", "*"])
def test_unlisted_punctuation_is_kept(char):
    # Not in the processor's list -> untouched.
    assert normalize_vqa_answer(f"x{char}y") == f"x{char}y"


def test_digit_comma_digit_rule_in_the_punctuation_step():
    # "1,000 x-y" contains digit-comma-digit -> every listed mark is deleted, "," and "-" too:
    # "1000 xy". Without the pattern "-" touches no space and becomes a space: "1000 x y".
    assert process_punctuation("1,000 x-y") == "1000 xy"
    assert process_punctuation("1000 x-y") == "1000 x y"


def test_digit_comma_digit_rule_cannot_fire_in_the_full_pipeline():
    # Step 1 already deleted the comma, so the punctuation step sees "1000 x-y" -> "1000 x y".
    assert normalize_vqa_answer("1,000 x-y") == "1000 x y"


@pytest.mark.parametrize("text, expected", [
    ("end.", "end"),        # period followed by nothing -> deleted
    ("3.5", "3.5"),         # followed by a digit -> kept
    ("u.s.a.", "usa"),      # none followed by a digit -> all deleted
    ("1.50.", "1.50"),      # first kept (before "5"), last deleted
    ("v.2", "v.2"),         # kept although not between digits: only the next char matters
    ("2.b", "2b"),          # deleted although a digit precedes it
])
def test_periods_not_followed_by_a_digit_are_deleted(text, expected):
    assert normalize_vqa_answer(text) == expected


def test_at_most_32_periods_are_deleted():
    # 33 periods after "x", none followed by a digit; the count cap of 32 leaves the last one.
    assert normalize_vqa_answer("x" + "." * 33) == "x."


@pytest.mark.parametrize("text, expected", [
    ("two", "2"),
    ("Three", "3"),         # lowercased first
    ("ten", "10"),
    ("zero", "0"),
    ("none", "0"),
    ("eleven", "eleven"),   # only zero..ten are mapped
    ("someone", "someone"),  # whole words only
    ("one way", "1 way"),
])
def test_number_words_become_digits(text, expected):
    assert normalize_vqa_answer(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("a dog", "dog"),
    ("an apple", "apple"),
    ("the end", "end"),
    ("theater", "theater"),  # whole words only
    ("the one", "1"),       # "one" -> "1", "the" dropped
    ("A", ""),              # an answer that is only an article normalises to ""
])
def test_articles_are_dropped(text, expected):
    assert normalize_vqa_answer(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("dont", "don't"),
    ("isnt", "isn't"),
    ("yall", "y'all"),
    ("oclock", "o'clock"),
    ("whats", "what's"),
    ("what's", "what 's"),          # step 1 split "'s" off, so it no longer matches "whats"
    ("somebody'd", "somebodyd"),    # the one table entry that runs backwards
    ("Im", "im"),                   # key "Im" has a capital, unreachable after lowercasing
])
def test_contraction_table(text, expected):
    assert normalize_vqa_answer(text) == expected


def test_whitespace_is_collapsed():
    assert normalize_vqa_answer("  red   car  ") == "red car"


# ---------------------------------------------------------------------------------------------
# VQA accuracy (leave-one-out)
# ---------------------------------------------------------------------------------------------

def _ten_answers(matching: int) -> list[str]:
    return ["red"] * matching + ["blue"] * (10 - matching)


def test_vqa_three_annotators_agree():
    # Leaving out one of the 3 "red": 2 others match -> 2/3 (3 subsets);
    # leaving out a "blue": 3 match -> 1 (7 subsets). (3*2/3 + 7) / 10 = 9/10.
    assert vqa_accuracy("red", _ten_answers(3)) == pytest.approx(0.9)


def test_vqa_two_annotators_agree():
    # (2 subsets * 1/3 + 8 subsets * 2/3) / 10 = (2/3 + 16/3) / 10 = 6/10.
    assert vqa_accuracy("red", _ten_answers(2)) == pytest.approx(0.6)


def test_vqa_one_annotator_agrees():
    # (1 subset * 0 + 9 subsets * 1/3) / 10 = 3/10.
    assert vqa_accuracy("red", _ten_answers(1)) == pytest.approx(0.3)


def test_vqa_four_annotators_agree_is_full_credit():
    # Every subset keeps >= 3 matches -> 1 each -> 1.0.
    assert vqa_accuracy("red", _ten_answers(4)) == pytest.approx(1.0)


def test_vqa_no_annotator_agrees():
    assert vqa_accuracy("green", _ten_answers(3)) == 0.0


def test_vqa_normalises_prediction_and_answers():
    # "Two." -> "two" -> "2"; "2", "two", "the two" all -> "2": 3 of 10 agree -> 0.9.
    answers = ["2", "two", "the two"] + ["three"] * 7
    assert vqa_accuracy("Two.", answers) == pytest.approx(0.9)


def test_vqa_other_answer_counts():
    # 5 answers, 2 match: (2 subsets * 1/3 + 3 subsets * 2/3) / 5 = (8/3) / 5 = 8/15.
    assert vqa_accuracy("red", ["red", "red", "blue", "blue", "blue"]) == pytest.approx(8 / 15)


def test_vqa_single_answer_scores_zero():
    # The only leave-one-out subset is empty: min(1, 0/3) = 0.
    assert vqa_accuracy("red", ["red"]) == 0.0


def test_vqa_requires_answers():
    with pytest.raises(ValueError):
        vqa_accuracy("red", [])


# ---------------------------------------------------------------------------------------------
# ANLS
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("first, second, distance", [
    ("kitten", "sitting", 3),   # k->s, e->i, +g
    ("flaw", "lawn", 2),        # -f, +n
    ("", "abc", 3),
    ("abc", "", 3),
    ("same", "same", 0),
])
def test_levenshtein(first, second, distance):
    assert levenshtein(first, second) == distance


def test_anls_spec_example():
    # "the cat" vs "the cab": d = 1; raw upper lengths 8 ("THE  CAT") and 7 -> 1 - 1/8.
    assert anls("the cab", ["The  Cat"]) == pytest.approx(0.875)


def test_anls_normalises_case_and_whitespace():
    # " The Cat " and "the cat" collapse to the same string: d = 0 -> 1.0.
    assert anls("the cat", [" The Cat "]) == 1.0


def test_anls_denominator_uses_raw_length():
    # "cat    " vs "bat": d("cat", "bat") = 1, denominator max(7, 3) = 7 -> 6/7
    # (the collapsed lengths would give 1 - 1/3).
    assert anls("bat", ["cat    "]) == pytest.approx(6 / 7)


def test_anls_denominator_uses_upper_length_eszett():
    # d("maß", "mas") = 1; "MASS" has 4 chars, "MAS" 3 -> 1 - 1/4 (plain len: 1 - 1/3).
    assert anls("mas", ["maß"]) == pytest.approx(0.75)


def test_anls_score_at_threshold_is_kept():
    # d("ßß", "ss") = 2; "SSSS" has 4 chars -> 1 - 2/4 = 0.5, not below 0.5 -> kept.
    # (plain len would give 1 - 2/2 = 0.)
    assert anls("ss", ["ßß"]) == pytest.approx(0.5)


def test_anls_score_below_threshold_is_zeroed():
    # d("abcd", "axyz") = 3 -> 1 - 3/4 = 0.25 < 0.5 -> 0.
    assert anls("axyz", ["abcd"]) == 0.0
    # The spec example's 0.875 falls below a custom threshold of 0.9 -> 0.
    assert anls("the cab", ["The  Cat"], threshold=0.9) == 0.0


def test_anls_empty_pair_is_a_perfect_match():
    # Both lengths 0 -> NL 0 -> 1.0.
    assert anls("", [""]) == 1.0
    # "  " collapses to "" too: d = 0, denominator 2 -> NL 0 -> 1.0.
    assert anls("", ["  "]) == 1.0


def test_anls_takes_best_answer():
    # vs "the cab": NL 1/7. vs "xyz": none of x, y, z occurs in "the cat", so d = 7 and
    # NL = 7/7. min NL = 1/7 -> 6/7.
    assert anls("the cat", ["xyz", "the cab"]) == pytest.approx(6 / 7)


# ---------------------------------------------------------------------------------------------
# ChartQA relaxed accuracy
# ---------------------------------------------------------------------------------------------

def test_relaxed_denominator_is_the_model_answer():
    # truth 100, model 95: |100 - 95| / 95 = 0.0526 > 0.05 -> wrong.
    assert relaxed_accuracy("95", ["100"]) == 0.0
    # truth 95, model 100: |95 - 100| / 100 = 0.05 <= 0.05 -> right.
    assert relaxed_accuracy("100", ["95"]) == 1.0


def test_relaxed_percent_divides_by_100():
    # "50%" -> 0.5 on either side.
    assert relaxed_accuracy("0.5", ["50%"]) == 1.0
    assert relaxed_accuracy("50%", ["0.5"]) == 1.0
    # truth 0.5 vs model 50: |0.5 - 50| / 50 = 0.99 -> no; "50" != "50%" -> 0.
    assert relaxed_accuracy("50", ["50%"]) == 0.0


def test_relaxed_zero_prediction_falls_back_to_string_match():
    # Model value 0 -> exact string comparison: "0" == "0" -> 1, "0" != "0.0" -> 0.
    assert relaxed_accuracy("0", ["0"]) == 1.0
    assert relaxed_accuracy("0", ["0.0"]) == 0.0
    # Model 0.01 is non-zero: |0 - 0.01| / 0.01 = 1 > 0.05 -> 0.
    assert relaxed_accuracy("0.01", ["0"]) == 0.0


def test_relaxed_non_numeric_is_case_insensitive_exact_match():
    assert relaxed_accuracy("yes", ["Yes"]) == 1.0
    assert relaxed_accuracy("yes.", ["Yes"]) == 0.0
    # Truth "ten" does not parse -> string match "10" vs "ten" -> 0.
    assert relaxed_accuracy("10", ["ten"]) == 0.0


def test_relaxed_strips_prediction_and_takes_best_answer():
    # " 100\n" -> "100"; vs "10": 90/100 -> no; vs "95": 5/100 = 0.05 -> yes -> 1.
    assert relaxed_accuracy(" 100\n", ["10", "95"]) == 1.0


# ---------------------------------------------------------------------------------------------
# Exact match (AI2D)
# ---------------------------------------------------------------------------------------------

def test_exact_match():
    assert exact_match(" B \n", ["b"]) == 1.0       # strip + lowercase
    assert exact_match("B.", ["B"]) == 0.0          # no punctuation handling
    assert exact_match("c", ["a", "C "]) == 1.0     # any answer


# ---------------------------------------------------------------------------------------------
# MME
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction, parsed", [
    ("Yes", "yes"),             # lowercased, exact
    ("no", "no"),
    ("N\no", "no"),             # newline deleted (not spaced) -> "No" -> exact "no"
    ("是", "yes"),              # 是 -> Yes
    ("不是", "no"),             # 不是 -> No before 是 is replaced
    ("否", "no"),
    ("True", "yes"),            # "true" -> "yes"
    ("False", "no"),            # "false" -> "no"
    ("好的yes", "yes"),         # CJK deleted -> "yes"
    ("yes, it is", "yes"),      # first 4 chars "yes," contain "yes"
    ("No.", "no"),              # "no." contains "no"
    ("not sure", "no"),         # "not " contains "no"
    ("know", "no"),             # "know" contains "no" within the first 4 chars
    ("ayes", "yes"),            # "yes" is checked before "no"
    ("There is no dog", "other"),  # "ther" contains neither
    ("abc yes", "other"),       # "yes" only after the first 4 chars
])
def test_mme_parse(prediction, parsed):
    assert mme_parse(prediction) == parsed


def test_mme_scores_acc_plus():
    records = [
        # existence: img1 both right; img2 one right.
        ("existence", "img1.jpg", "Yes", "Yes"),
        ("existence", "img1.jpg", "No", "No"),
        ("existence", "img2.jpg", "Yes", "Yes"),
        ("existence", "img2.jpg", "No", "Yes"),
        # code_reasoning: one right, one unparseable ("other" is wrong).
        ("code_reasoning", "c1.png", "Yes", "yes"),
        ("code_reasoning", "c1.png", "No", "maybe"),
    ]
    result = mme_scores(records)
    existence = result["subtasks"]["existence"]
    # acc = 3/4, acc+ = 1/2 (img1) -> 75 + 50 = 125.
    assert existence["acc"] == pytest.approx(0.75)
    assert existence["acc_plus"] == pytest.approx(0.5)
    assert existence["score"] == pytest.approx(125.0)
    # acc = 1/2, acc+ = 0 -> 50.
    assert result["subtasks"]["code_reasoning"]["score"] == pytest.approx(50.0)
    assert result["perception"] == pytest.approx(125.0)
    assert result["cognition"] == pytest.approx(50.0)
    assert result["total"] == pytest.approx(175.0)


def test_mme_rejects_unknown_subtask():
    with pytest.raises(ValueError):
        mme_scores([("existance", "a.jpg", "Yes", "Yes")])


# ---------------------------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction, parsed", [
    ("No, there is not.", "no"),        # "No there is not" contains "No"
    ("no, it", "no"),                   # comma removed -> word "no"
    ("Yes. But there is no cat.", "yes"),  # only the text before the first "."
    ("There is no cat.", "no"),
    ("NO", "yes"),                      # case-sensitive: "NO" is not in the list
    ("Not really", "yes"),              # "Not" (capital) is not in the list
    ("No\nthere is", "yes"),            # split on " " only: the word is "No\nthere"
    ("none", "yes"),                    # whole words only
    ("cannot", "yes"),
])
def test_pope_parse(prediction, parsed):
    assert pope_parse(prediction) == parsed


def test_pope_scores():
    records = [
        # random: TP ("Yes there is" -> yes), FN ("No"), TN ("... no cat"), FP ("Yes").
        ("random", "yes", "Yes, there is"),
        ("random", "yes", "No."),
        ("random", "no", "There is no cat."),
        ("random", "no", "Yes"),
        # popular: all four right, two "yes" predictions.
        ("popular", "yes", "Yes"),
        ("popular", "yes", "yes"),
        ("popular", "no", "No"),
        ("popular", "no", "no"),
    ]
    result = pope_scores(records)
    random = result["categories"]["random"]
    # TP=1 FP=1 FN=1 TN=1: precision 1/2, recall 1/2, F1 1/2, accuracy 2/4, yes ratio 2/4.
    assert random == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5,
                                    "accuracy": 0.5, "yes_ratio": 0.5})
    # TP=2 TN=2: all 1 except yes ratio 2/4.
    assert result["categories"]["popular"] == pytest.approx(
        {"precision": 1.0, "recall": 1.0, "f1": 1.0, "accuracy": 1.0, "yes_ratio": 0.5})
    # mean F1 = (0.5 + 1.0) / 2.
    assert result["mean_f1"] == pytest.approx(0.75)


def test_pope_no_yes_predictions_gives_zero_precision():
    # TP=0 FP=0 FN=1 TN=1: precision and F1 reported as 0, accuracy 1/2, yes ratio 0.
    result = pope_scores([("adversarial", "yes", "No"), ("adversarial", "no", "No")])
    assert result["categories"]["adversarial"] == pytest.approx(
        {"precision": 0.0, "recall": 0.0, "f1": 0.0, "accuracy": 0.5, "yes_ratio": 0.0})


# ---------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------

ANIMALS = {"A": "cat", "B": "dog", "C": "bird"}


@pytest.mark.parametrize("prediction, choice", [
    ("B", "B"),
    ("z", "z"),                     # one character -> returned as is
    ("  C \n", "C"),                # stripped first
    ("A. cat", "A"),                # first char is an option letter
    ("B) dog", "B"),
    ("(C) bird", "C"),              # parenthesised letter
    ("(C)", "C"),
    ("The answer is dog", "B"),     # "T" is no option; "dog" occurs
    ("It is a dog or a cat", "A"),  # options are tried in order A, B, C: "cat" first
    ("Apple", "A"),                 # first-char rule wins even inside a word
    ("I don't know", None),         # no letter, no option text
    ("", None),
])
def test_extract_choice(prediction, choice):
    assert extract_choice(prediction, ANIMALS) == choice


def test_mmbench_circular_group():
    # Circular copies are offset by multiples of 1e6.
    assert mmbench_circular_group(7) == 7
    assert mmbench_circular_group(3_000_007) == 7


def test_mmbench_circular_accuracy():
    records = [
        # question 0: both rotations right ("cat" is option B in the rotated row).
        {"group": 0, "options": {"A": "cat", "B": "dog"}, "answer": "A", "prediction": "A"},
        {"group": 0, "options": {"A": "dog", "B": "cat"}, "answer": "B", "prediction": "cat"},
        # question 1: second rotation wrong -> the whole question is wrong.
        {"group": 1, "options": {"A": "red", "B": "blue"}, "answer": "B", "prediction": "B"},
        {"group": 1, "options": {"A": "blue", "B": "red"}, "answer": "A", "prediction": "B"},
    ]
    # 1 of 2 questions -> 0.5.
    assert mmbench_circular_accuracy(records) == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def test_mean_score():
    assert mean_score([1.0, 0.0, 0.5]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mean_score([])


def test_metrics_registry():
    assert set(METRICS) == {"vqa_accuracy", "anls", "relaxed_accuracy", "exact_match"}
    # Same spec example as above, through the registry: 1 - 1/8.
    assert METRICS["anls"]("the cab", ["The  Cat"]) == pytest.approx(0.875)
