"""Generation settings per benchmark (presets), and `key=value` overrides of every option.

Each benchmark runs with five generation settings next to its file options:

    prompt          text appended to the question (the task instruction)
    prompt_sep      what joins question and prompt
    max_new_tokens  / min_new_tokens
    max_tiles       dynamic-resolution tile budget per image (+ thumbnail)

Decoding is greedy in both presets.

`official` is the InternVL repository's evaluation (spec §12.2): the prompt joined with a space
(a newline after multiple choice options), the scripts' max_new_tokens, min_new_tokens 1 except
for MME, and the tile budgets used for InternVL-Chat-V1-5 (TextVQA/InfoVQA 24, DocVQA 18,
ChartQA/MME 12, others 6).

`vlmevalkit` is VLMEvalKit's InternVL-Chat-V1-5 wrapper as of mid-2024 (vlmeval/vlm/
internvl_chat.py, `build_prompt` and `generate_v1_5`): tiles 12 for ChartQA, 18 for DocVQA, 24
for InfoVQA (and OCRBench), 6 for everything else (so TextVQA and MME get 6); open questions get
'\\nAnswer the question using a single word or phrase.', MME ' Answer the question using a single
word or phrase.', multiple choice the same construction as the official scripts, yes/no sets the
question alone; max_new_tokens 1024 and no min_new_tokens. Not reproduced: for V1-5 on MME that
wrapper samples with 5 beams (top-k 50, top-p 0.9, max_new_tokens 5); here MME decodes greedily
with max_new_tokens 5. The preset reproduces VLMEvalKit's inference; its scoring (its own answer
matching, optionally an LLM judge) is done by VLMEvalKit on the exported predictions.

Overrides: `key=value` applies to every selected benchmark, `KIND.key=value` to a family (`mmbench`
for all MMBench splits and CCBench, `jsonl`, `tsv`, ...), `NAME.key=value` to one benchmark; the
more specific wins. Values take the type of the setting they replace; in text values `\\n` and
`\\t` stand for newline and tab.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from internvl_jax.eval.benchmarks import Benchmark

VQA_PROMPT = "Answer the question using a single word or phrase."
CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
CHOICE_PROMPT_CN = "请直接回答选项字母。"

GENERATION_OPTIONS = ("prompt", "prompt_sep", "max_new_tokens", "min_new_tokens", "max_tiles")


def _settings(prompt: str, prompt_sep: str, max_new_tokens: int, min_new_tokens: int, max_tiles: int) -> dict:
    return dict(zip(GENERATION_OPTIONS, (prompt, prompt_sep, max_new_tokens, min_new_tokens, max_tiles)))


# Keyed by benchmark name, or by kind for users' files (jsonl, tsv).
OFFICIAL = {
    "textvqa": _settings(VQA_PROMPT, " ", 10, 1, 24),
    "docvqa": _settings(VQA_PROMPT, " ", 100, 1, 18),
    "docvqa_test": _settings(VQA_PROMPT, " ", 100, 1, 18),
    "infovqa": _settings(VQA_PROMPT, " ", 100, 1, 24),
    "infovqa_test": _settings(VQA_PROMPT, " ", 100, 1, 24),
    "chartqa": _settings(VQA_PROMPT, " ", 100, 1, 12),
    # The AI2D file's questions already hold the options and the instruction.
    "ai2d": _settings("", " ", 10, 1, 6),
    "mmbench_dev_en": _settings(CHOICE_PROMPT, "\n", 100, 1, 6),
    "mmbench_test_en": _settings(CHOICE_PROMPT, "\n", 100, 1, 6),
    "mmbench_dev_cn": _settings(CHOICE_PROMPT_CN, "\n", 100, 1, 6),
    "mmbench_test_cn": _settings(CHOICE_PROMPT_CN, "\n", 100, 1, 6),
    "ccbench": _settings(CHOICE_PROMPT_CN, "\n", 100, 1, 6),
    "mme": _settings(VQA_PROMPT, " ", 20, 0, 12),
    # POPE's questions already end with the instruction; the script still appends ' ' + ''.
    "pope": _settings("", " ", 100, 1, 6),
    "scienceqa": _settings(CHOICE_PROMPT, "\n", 100, 1, 6),
    "jsonl": _settings(VQA_PROMPT, " ", 100, 1, 6),
    "tsv": _settings(CHOICE_PROMPT, "\n", 100, 1, 6),
}

_VLMEVALKIT_TILES = {"chartqa": 12, "docvqa": 18, "docvqa_test": 18, "infovqa": 24, "infovqa_test": 24}
_VLMEVALKIT_MAX_NEW_TOKENS = 1024


def _vlmevalkit(name: str, official: Mapping[str, Any]) -> dict:
    settings = dict(official, max_new_tokens=_VLMEVALKIT_MAX_NEW_TOKENS, min_new_tokens=0,
                    max_tiles=_VLMEVALKIT_TILES.get(name, 6))
    if name == "mme":
        settings["max_new_tokens"] = 5
    elif name == "pope":
        settings["prompt_sep"] = ""  # a yes/no set: the question as it is
    elif official["prompt"] == VQA_PROMPT:
        settings["prompt_sep"] = "\n"
    return settings


PRESETS: dict[str, dict[str, dict]] = {
    "official": OFFICIAL,
    "vlmevalkit": {name: _vlmevalkit(name, settings) for name, settings in OFFICIAL.items()},
}


def preset_settings(benchmark: Benchmark, preset: str) -> dict:
    """The preset's generation settings for the benchmark."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    table = PRESETS[preset]
    return dict(table[benchmark.name] if benchmark.name in table else table[benchmark.kind])


def resolve_options(benchmarks: Sequence[Benchmark], preset: str, overrides: Mapping[str, str],
                    max_tiles: int | None = None) -> dict[str, dict]:
    """benchmark name -> all its options: file options, then the preset, then the overrides.

    Raises ValueError for an override that names an unknown setting or selects no benchmark.
    `max_tiles` (a tile sweep's budget) replaces every benchmark's tile budget.
    """
    used = set()
    resolved = {}
    for benchmark in benchmarks:
        options = {**benchmark.options, **preset_settings(benchmark, preset)}
        # Least specific first, so 'name.key' beats 'kind.key' beats 'key'.
        scopes = ("", benchmark.kind, benchmark.name)
        matching = sorted((scopes.index(scope), option, key)
                          for key in overrides
                          for scope, _, option in [key.rpartition(".")] if scope in scopes)
        for _, option, key in matching:
            if option not in options:
                raise ValueError(f"'{key}': {benchmark.name} has no setting '{option}'; its settings: "
                                 f"{', '.join(options)}")
            options[option] = _coerce(key, overrides[key], options[option])
            used.add(key)
        if max_tiles is not None:
            options["max_tiles"] = max_tiles
        resolved[benchmark.name] = options
    unused = [key for key in overrides if key not in used]
    if unused:
        raise ValueError(f"override(s) {unused} select no benchmark; prefix a setting with a benchmark name "
                         f"({', '.join(b.name for b in benchmarks)}) or kind, or leave it bare for all")
    return resolved


def _coerce(key: str, text: str, current: Any) -> Any:
    if isinstance(current, int):
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"'{key}' must be an integer, got {text!r}") from None
        if value < (0 if key.endswith("min_new_tokens") else 1):
            raise ValueError(f"'{key}' is out of range: {value}")
        return value
    return text.replace("\\n", "\n").replace("\\t", "\t")


GENERATION_PREFIX = "generation."


def split_settings(pairs: Sequence[str]) -> tuple[dict[str, str], dict[str, Any]]:
    """(benchmark option overrides, decoding options) from key=value arguments."""
    options, generation = {}, {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key:
            raise ValueError(f"settings are written key=value, got {pair!r}")
        if key.startswith(GENERATION_PREFIX):
            try:
                generation[key[len(GENERATION_PREFIX):]] = json.loads(value)
            except json.JSONDecodeError:
                generation[key[len(GENERATION_PREFIX):]] = value
        else:
            options[key] = value
    return options, generation
