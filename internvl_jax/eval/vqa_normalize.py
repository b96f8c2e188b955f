"""Answer normalisation of the EvalAI VQA evaluator (the TextVQA/VQAv2 answer processor).

Both the model's answer and every annotator answer go through `normalize_vqa_answer` before
they are compared as strings. The published processor runs four steps, reproduced here in the
same order because the order changes results (e.g. commas are gone before the punctuation step
looks for digit-comma-digit):

1. `lowercase_and_split_possessives`: lowercase; drop "," and "?"; "'s" -> " 's".
2. newlines and tabs -> spaces.
3. `process_punctuation`: listed punctuation removed or replaced by a space; periods that are
   not followed by a digit removed.
4. `process_words`: number words -> digits, articles dropped, contraction table applied,
   whitespace collapsed.
"""
from __future__ import annotations

import re

# The punctuation characters the processor handles ("." is treated separately; characters
# such as "'", ":", "%", "#", "$", "&", "*" are deliberately left alone).
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
               "@", "`", ",", "?", "!")

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

ARTICLES = frozenset({"a", "an", "the"})

# Apostrophe-less spellings -> the canonical contraction. Entries are as published, including
# the ones that can never fire (keys with capitals, because words are lowercased first; keys
# ending in "'s", because step 1 splits "'s" off) and the one entry that runs backwards
# ("somebody'd" -> "somebodyd").
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}

_DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d),+(?=\d)")

# The published pattern reads like "a period not between digits", but its leading group is a
# lookahead, not a lookbehind, so it only requires that no digit follows: "v.2" keeps its
# period, "2.b" loses it.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")

# The published processor passes re.UNICODE (= 32) in re.sub's `count` slot, so at most the
# first 32 such periods are removed.
_MAX_PERIODS_REMOVED = 32


def lowercase_and_split_possessives(text: str) -> str:
    """Step 1: lowercase, drop every "," and "?", split "'s" into its own token, strip."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    return text.strip()


def process_punctuation(text: str) -> str:
    """Step 3: punctuation of `PUNCTUATION` removed or turned into spaces; stray periods removed.

    A character is removed outright when it touches a space somewhere in the text (or when the
    text contains a digit-comma-digit pattern, which after step 1 can no longer happen);
    otherwise each occurrence becomes a space so that "black-and-white" splits into words.
    The decision is made per character against the step's input text.
    """
    remove_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    result = text
    for mark in PUNCTUATION:
        touches_space = (mark + " " in text) or (" " + mark in text)
        result = result.replace(mark, "" if touches_space or remove_all else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", result, count=_MAX_PERIODS_REMOVED)


def process_words(text: str) -> str:
    """Step 4: number words -> digits, articles dropped, contractions canonicalised."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    # Articles are dropped after number mapping, and contractions looked up after both.
    kept = [CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES]
    return " ".join(kept)


def normalize_vqa_answer(text: str) -> str:
    """The EvalAI normal form of one answer string (all four steps, in the published order)."""
    text = lowercase_and_split_possessives(text)
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = process_punctuation(text)
    return process_words(text)
