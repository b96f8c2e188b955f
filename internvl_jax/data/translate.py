"""Translating the text of a conversation data set with an LLM (the paper's bilingual data recipe).

    python -m internvl_jax.data.translate --meta meta.json --out-dir data_zh --target-language Chinese \\
        --backend openai --endpoint http://localhost:8000/v1 --model-name Qwen2-72B-Instruct

Every turn of every row (the ``value`` of each ``conversations`` entry) is translated on its own,
by a loaded checkpoint through our generation (``--backend model --checkpoint DIR``) or by any
OpenAI-compatible chat endpoint (``--backend openai``), with a prompt modelled on the paper's
(``DEFAULT_PROMPT``; ``--prompt-file`` replaces it: a text with ``{language}`` and ``{text}``).

Markup is data, not language. Each markup span of a turn (``<image>``, ``<ref>``, ``</ref>``,
``<box>[[...]]</box>`` and ``<quad>...</quad>`` with their coordinates, ``<img>...</img>``,
``Image-1:`` / ``Frame-1:`` labels, ``<|...|>`` and any other ``<tag>``) is replaced by a
placeholder ``<m1>``, ``<m2>``, ... before translation and put back after; markup and whitespace
at the start and end of a turn (the usual ``<image>\\n``) are not sent at all. A translation is
accepted when its markup is exactly the source's: the same spans (coordinates to the letter) and
the same sequence once box/quad coordinates are set aside (so ``<ref>``/``</ref>`` pairs, boxes
after their refs and image labels keep their structure, while whole groups may change places as
the target language's word order wants). A row with any turn that breaks its markup, comes back
empty or truncated is written untranslated (never dropped) and reported with its ``file:line``.

Output, in ``--out-dir``:

* ``<name><suffix>.jsonl`` per data set: the source rows in order, translated rows with their new
  turns (and no ``length`` field, which counted the source's tokens), kept rows as they were;
* ``<meta><suffix>.json``: the same entries, named ``<name><suffix>``, ``annotation`` pointing at
  the new file, ``root`` unchanged (made absolute) so the images still resolve, ``length`` the rows
  written; written last, through a rename, so it only ever describes finished files;
* ``progress/<name>/predictions.jsonl``: one record per finished row, appended and flushed batch by
  batch (:class:`internvl_jax.eval.store.PredictionStore`), keyed by the source line. A re-run
  with the same settings (language, prompt, backend, ...) skips the rows recorded there, so a
  killed run loses at most the batch in flight; other settings are an error.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import hashlib
import http.client
import json
import logging
import os
import pathlib
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

from etils import epath

from internvl_jax.data.sources import DataError, DatasetSpec, load_meta, parse_record
from internvl_jax.eval.report import write_json
from internvl_jax.eval.samples import BenchmarkError
from internvl_jax.eval.store import PredictionStore

log = logging.getLogger(__name__)

# Paraphrased from the translation prompt shown in the InternVL 1.5 paper (the spec gives no text),
# plus the rule that keeps the placeholders.
DEFAULT_PROMPT = """\
You are a translator fluent in English and {language}. Translate the text below into natural, \
fluent {language}, avoiding a stiff word-for-word rendering. In doing so:
1. Keep proper nouns, brand names and place names as they are written.
2. Keep technical terms in their original form; a short {language} explanation may follow them.
3. Render idioms and sayings with equivalent {language} expressions.
4. Make quotations and direct speech sound natural in {language}, keeping their tone.
5. Write acronyms out in {language}, with the original acronym in parentheses.
6. Copy numbers, formulas, code and every tag such as <m1> or <m2> exactly, each tag once.
Reply with the translation only.

Text for translation:
{text}"""

# Short codes for the suffix of the output names; other languages use their lower-cased name.
LANGUAGE_CODES = {"chinese": "zh", "english": "en", "japanese": "ja", "korean": "ko", "french": "fr",
                  "german": "de", "spanish": "es", "russian": "ru", "portuguese": "pt", "italian": "it"}

# Blocks whose contents are data (coordinates, image tokens), multi-image/video labels, template
# tokens, and any other tag (<image>, <ref>, </ref>, <IMG_CONTEXT>, ...).
_BLOCKS = ("box", "quad", "img")
_MARKUP = (r"|".join(rf"<{tag}>.*?</{tag}>" for tag in _BLOCKS)
           + r"|\b(?:Image|Frame)-\d+:|<\|[^<>|\s]+\|>|</?[A-Za-z][\w.:-]*/?>")
_MARKUP_RE = re.compile(_MARKUP, re.DOTALL)
_TAG_RE = re.compile(r"<(/?)([A-Za-z][\w.:-]*)>")
_PLACEHOLDER_RE = re.compile(r"<m(\d+)>")


# ---------------------------------------------------------------------------------------------
# Markup.


class MarkupError(ValueError):
    """A translation that cannot be used; ``reason`` is a short key (markup_changed, empty, ...)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Protected:
    """A turn split for translation: ``prefix + core + suffix``, where ``core`` has the i-th markup
    span of its text replaced by ``<m{i}>`` (``spans[i - 1]``); prefix and suffix are markup and
    whitespace only and are never sent."""

    prefix: str
    core: str
    suffix: str
    spans: tuple[str, ...]

    @property
    def needs_translation(self) -> bool:
        """Whether the core holds any letters besides its placeholders."""
        return any(char.isalpha() for char in _PLACEHOLDER_RE.sub("", self.core))


def markup_spans(text: str) -> list[str]:
    """The markup spans of ``text`` in order."""
    return _MARKUP_RE.findall(text)


def protect(text: str) -> Protected:
    """Splits a turn for translation (see :class:`Protected`)."""
    start, end = _frame(text)
    spans = []

    def placeholder(match: re.Match) -> str:
        spans.append(match.group())
        return f"<m{len(spans)}>"

    core = _MARKUP_RE.sub(placeholder, text[start:end])
    return Protected(text[:start], core, text[end:], tuple(spans))


def _frame(text: str) -> tuple[int, int]:
    """Where the core of a turn starts and ends: leading and trailing markup and whitespace are
    left out, except a tag whose partner is inside (``<ref>`` of a ``<ref>...</ref>`` that the
    translation may move as a whole)."""
    matches = list(_MARKUP_RE.finditer(text))
    start = 0
    for match in matches:
        tag = _TAG_RE.fullmatch(match.group())
        if text[start:match.start()].strip() or (tag and not tag[1] and f"</{tag[2]}>" in text[match.end():]):
            break
        start = match.end()
    start = len(text) - len(text[start:].lstrip())
    end = len(text)
    for match in reversed(matches):
        tag = _TAG_RE.fullmatch(match.group())
        if (match.start() < start or text[match.end():end].strip()
                or (tag and tag[1] and f"<{tag[2]}>" in text[start:match.start()])):
            break
        end = match.start()
    return start, max(start, len(text[:end].rstrip()))


def restore(protected: Protected, translation: str, source: str) -> str:
    """The translated turn: ``translation`` of ``protected.core`` with its markup put back.

    Raises :class:`MarkupError` when it is empty, names an unknown placeholder, or its markup is
    not the markup of ``source`` (see the module docstring).
    """
    translation = translation.strip()
    if not translation:
        raise MarkupError("empty", "the translation is empty")

    def span(match: re.Match) -> str:
        index = int(match.group(1))
        if not 1 <= index <= len(protected.spans):
            raise MarkupError("markup_changed", f"unknown placeholder {match.group()}")
        return protected.spans[index - 1]

    text = protected.prefix + _PLACEHOLDER_RE.sub(span, translation) + protected.suffix
    check_markup(source, text)
    return text


def _shape(span: str) -> str:
    """A span with the contents of a box/quad/img block set aside."""
    for tag in _BLOCKS:
        if span.startswith(f"<{tag}>"):
            return f"<{tag}>"
    return span


def check_markup(source: str, translation: str) -> None:
    """Raises :class:`MarkupError` unless ``translation`` keeps the markup of ``source``."""
    before, after = markup_spans(source), markup_spans(translation)
    missing = collections.Counter(before) - collections.Counter(after)
    extra = collections.Counter(after) - collections.Counter(before)
    if missing or extra:
        parts = [f"missing {', '.join(missing)}" if missing else "", f"extra {', '.join(extra)}" if extra else ""]
        raise MarkupError("markup_changed", "; ".join(part for part in parts if part))
    if [_shape(span) for span in before] != [_shape(span) for span in after]:
        raise MarkupError("markup_changed", f"markup out of order: {''.join(after)}")


# ---------------------------------------------------------------------------------------------
# Backends.


class Reply(NamedTuple):
    """A backend's answer to one prompt; ``truncated`` when it hit the token limit."""

    text: str
    truncated: bool = False


class BackendError(RuntimeError):
    """The backend failed (after its retries); the run stops and can be resumed."""


class Backend(Protocol):
    settings: Mapping[str, Any]  # what decides its output (recorded with every row)

    def translate(self, prompts: Sequence[str]) -> list[Reply]:
        """One reply per prompt, in order."""


@dataclasses.dataclass
class OpenAIBackend:
    """An OpenAI-compatible ``/chat/completions`` endpoint (vLLM, lmdeploy, OpenAI, ...), one
    request per prompt, up to ``workers`` at a time; transient failures (connection errors,
    timeouts, HTTP 408/429/5xx) are retried ``retries`` times with exponential back-off.

    ``endpoint`` is the API base (``http://host:8000/v1``) or the full completions URL.
    """

    endpoint: str
    model_name: str
    api_key: str | None = dataclasses.field(default=None, repr=False)
    max_new_tokens: int = 1024
    temperature: float = 0.0
    timeout: float = 300.0
    retries: int = 3
    backoff: float = 2.0
    workers: int = 16

    def __post_init__(self):
        endpoint = self.endpoint.rstrip("/")
        self.url = endpoint if endpoint.endswith("/chat/completions") else endpoint + "/chat/completions"
        self.settings = {"backend": "openai", "url": self.url, "model": self.model_name,
                         "max_new_tokens": self.max_new_tokens, "temperature": self.temperature}

    def translate(self, prompts: Sequence[str]) -> list[Reply]:
        if not prompts:
            return []
        with concurrent.futures.ThreadPoolExecutor(min(self.workers, len(prompts))) as pool:
            return list(pool.map(self._ask, prompts))

    def _ask(self, prompt: str) -> Reply:
        body = json.dumps({"model": self.model_name, "messages": [{"role": "user", "content": prompt}],
                           "max_tokens": self.max_new_tokens, "temperature": self.temperature}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return self._reply(response.read())
            except urllib.error.HTTPError as error:
                transient = error.code in (408, 429) or error.code >= 500
                failure = f"HTTP {error.code}: {error.read()[:300].decode(errors='replace')}"
            except (OSError, http.client.HTTPException) as error:  # refused, reset, timed out, cut short
                transient, failure = True, str(getattr(error, "reason", error))
            if not transient or attempt == self.retries:
                raise BackendError(f"{self.url}: {failure}")
            time.sleep(self.backoff * 2 ** attempt)
        raise AssertionError("unreachable")

    def _reply(self, payload: bytes) -> Reply:
        try:
            choice = json.loads(payload)["choices"][0]
            return Reply(choice["message"]["content"] or "", choice.get("finish_reason") == "length")
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise BackendError(f"{self.url}: not a chat completion ({error!r}): {payload[:300]!r}") from None


class ModelBackend:
    """A checkpoint answering through :func:`internvl_jax.chat.batch_chat` (greedy, text only).

    Give ``checkpoint`` (loaded with ``load_pretrained`` when first needed) or a loaded
    ``model``, ``tokenizer`` and ``config``. A reply as long as ``max_new_tokens`` counts as
    truncated.
    """

    def __init__(self, checkpoint: str | None = None, *, model=None, tokenizer=None, config=None,
                 max_new_tokens: int = 1024, mesh=None):
        if (checkpoint is None) == (model is None):
            raise ValueError("give either a checkpoint or a loaded model, tokenizer and config")
        self.checkpoint = checkpoint
        self._loaded = None if model is None else (model, tokenizer, config)
        self.max_new_tokens = max_new_tokens
        self.mesh = mesh
        self.settings = {"backend": "model", "checkpoint": checkpoint, "max_new_tokens": max_new_tokens}

    def _load(self):
        if self._loaded is None:
            from internvl_jax.pretrained import load_pretrained  # jax only when a model is used

            model, tokenizer, config = load_pretrained(self.checkpoint, mesh=self.mesh)
            if tokenizer is None:
                raise BackendError(f"{self.checkpoint}: no tokenizer files")
            self._loaded = model, tokenizer, config
        return self._loaded

    def translate(self, prompts: Sequence[str]) -> list[Reply]:
        from internvl_jax.chat import batch_chat

        model, tokenizer, config = self._load()
        answers = batch_chat(model, tokenizer, config, None, list(prompts), {"max_new_tokens": self.max_new_tokens},
                             mesh=self.mesh)
        return [Reply(answer, len(tokenizer.encode(answer, add_bos=False)) >= self.max_new_tokens)
                for answer in answers]


# ---------------------------------------------------------------------------------------------
# Rows.


class Row(NamedTuple):
    line: int  # 1-based line in the annotation file
    text: str  # the line as stored


def read_rows(spec: DatasetSpec) -> list[Row]:
    """The non-blank lines of a data set's annotation, each checked as a training row."""
    if spec.tfds:
        raise DataError(spec.name, "only JSONL annotations can be translated, not TFDS data sets")
    try:
        text = epath.Path(spec.annotation).read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError) as error:
        raise DataError(spec.annotation, f"cannot read the annotation of data set {spec.name!r}: {error}") from error
    rows = [Row(number, line.rstrip("\r")) for number, line in enumerate(text.split("\n"), start=1)
            if line.strip()]
    for row in rows:
        parse_record(row.text, f"{spec.annotation}:{row.line}", spec.root)
    return rows


@dataclasses.dataclass
class _Plan:
    """A row ready for translation: its sample, and per turn its Protected text (or a reason)."""

    row: Row
    sample: dict
    turns: list[Protected]
    problem: str | None = None

    @classmethod
    def of(cls, row: Row) -> _Plan:
        sample = json.loads(row.text)
        turns = sample["conversations"]
        if not all(isinstance(turn, dict) and isinstance(turn.get("value"), str) for turn in turns):
            return cls(row, sample, [], "a turn has no text value")
        return cls(row, sample, [protect(turn["value"]) for turn in turns])

    def cores(self) -> list[str]:
        return [] if self.problem else [turn.core for turn in self.turns if turn.needs_translation]


def fill_prompt(template: str, language: str, text: str) -> str:
    # str.replace, not format: a template may hold other braces (JSON examples) and text is inserted last.
    return template.replace("{language}", language).replace("{text}", text)


def _record(plan: _Plan, replies: Mapping[str, Reply]) -> dict:
    """The progress record of a row: PredictionStore's fields (``prediction`` = the new turn
    values), ``status`` (translated, unchanged or kept) and, for a kept row, ``reason``."""
    def kept(reason: str, detail: str) -> dict:
        return {"id": str(plan.row.line), "prediction": None, "failed": True, "error": detail, "status": "kept",
                "reason": reason}

    if plan.problem:
        return kept("not_text", f"not_text: {plan.problem}")
    values, translated = [], False
    for number, (turn, protected) in enumerate(zip(plan.sample["conversations"], plan.turns), start=1):
        if not protected.needs_translation:
            values.append(turn["value"])
            continue
        reply = replies[protected.core]
        if reply.truncated:
            return kept("truncated", f"turn {number}: truncated: the reply reached the token limit")
        try:
            values.append(restore(protected, reply.text, turn["value"]))
        except MarkupError as error:
            return kept(error.reason, f"turn {number}: {error}")
        translated = True
    return {"id": str(plan.row.line), "prediction": values, "failed": False, "error": None,
            "status": "translated" if translated else "unchanged"}


def _chunks(plans: Iterable[_Plan], size: int) -> Iterable[list[_Plan]]:
    """Consecutive rows holding at least ``size`` texts to translate (the last chunk may hold fewer)."""
    chunk, texts = [], 0
    for plan in plans:
        chunk.append(plan)
        texts += len(plan.cores())
        if texts >= size:
            yield chunk
            chunk, texts = [], 0
    if chunk:
        yield chunk


# ---------------------------------------------------------------------------------------------
# Data sets.


@dataclasses.dataclass
class DatasetReport:
    """What became of one data set's rows; ``kept`` lists ``(file:line, reason, detail)``."""

    name: str
    path: pathlib.Path
    rows: int
    translated: int
    unchanged: int
    kept: list[tuple[str, str, str]]

    def format(self, max_listed: int = 10) -> str:
        reasons = collections.Counter(reason for _, reason, _ in self.kept)
        line = (f"{self.name} -> {self.path}: {self.rows} rows, {self.translated} translated, {self.unchanged} with "
                f"nothing to translate, {len(self.kept)} kept untranslated")
        if reasons:
            line += " (" + ", ".join(f"{reason} {count}" for reason, count in sorted(reasons.items())) + ")"
        listed = [f"  {where}: {detail}" for where, _, detail in self.kept[:max_listed]]
        if len(self.kept) > max_listed:
            listed.append(f"  ... {len(self.kept) - max_listed} more (see the progress records)")
        return "\n".join([line] + listed)


def language_suffix(language: str) -> str:
    """``_zh`` for Chinese, ``_<name>`` for a language without a short code."""
    name = language.strip().lower()
    return "_" + LANGUAGE_CODES.get(name, re.sub(r"\W+", "_", name))


def _file_name(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)


def _settings_key(spec: DatasetSpec, language: str, prompt: str, backend_settings: Mapping[str, Any]) -> str:
    material = {"annotation": spec.annotation, "language": language, "prompt": prompt, "backend": backend_settings}
    return hashlib.sha1(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _records(store: PredictionStore) -> dict[str, dict]:
    try:
        return store.records()
    except BenchmarkError as error:
        raise DataError(error.where, "rows translated with other settings (language, prompt, backend, token limit); "
                                     f"use another --out-dir, or delete {store.directory} to start over") from None


def translate(specs: Sequence[DatasetSpec], out_dir: str | os.PathLike, backend: Backend, *,
              language: str = "Chinese", suffix: str | None = None, prompt: str = DEFAULT_PROMPT,
              batch_size: int = 16, limit: int | None = None, meta_name: str = "meta") -> list[DatasetReport]:
    """Translates the first ``limit`` rows (all by default) of each data set, resuming from the
    progress records in ``out_dir``, then writes the JSONL files and ``<meta_name><suffix>.json``.

    Every source is read and checked before anything is translated. Raises :class:`DataError`
    (naming file and line) for bad input and :class:`BackendError` when the backend fails; the
    rows finished until then are kept for the next run.
    """
    if "{text}" not in prompt:
        raise ValueError("the prompt has no {text} placeholder")
    suffix = language_suffix(language) if suffix is None else suffix
    out_dir = pathlib.Path(out_dir)
    names = [_file_name(spec.name) for spec in specs]
    if len(set(names)) != len(names):
        raise DataError(meta_name, f"data set names {sorted(names)} do not give distinct file names")
    jobs = []
    for spec, name in zip(specs, names):
        rows = read_rows(spec)[:limit]
        path = out_dir / f"{name}{suffix}.jsonl"
        if path.resolve() == pathlib.Path(spec.annotation).resolve():
            raise DataError(spec.annotation, "the output would overwrite the source; choose another --out-dir")
        store = PredictionStore(out_dir / "progress" / name, _settings_key(spec, language, prompt, backend.settings))
        jobs.append((spec, rows, path, store, _records(store)))
    reports, cache = [], _ReplyCache()
    for spec, rows, path, store, done in jobs:
        pending = (_Plan.of(row) for row in rows if str(row.line) not in done)
        for chunk in _chunks(pending, batch_size):
            records = _translate_chunk(chunk, backend, prompt, language, batch_size, cache)
            for plan, record in zip(chunk, records):
                if record["failed"]:
                    log.warning("%s:%d: kept untranslated: %s", spec.annotation, plan.row.line, record["error"])
            store.append(records)
        reports.append(_write_dataset(spec, rows, _records(store), path, suffix))
    _write_meta(out_dir / f"{meta_name}{suffix}.json", specs, reports, suffix)
    return reports


class _ReplyCache:
    """Replies to the most recently asked texts, so a templated question is asked once a run."""

    def __init__(self, capacity: int = 100_000):
        self.capacity = capacity
        self._replies: collections.OrderedDict[str, Reply] = collections.OrderedDict()

    def get(self, text: str) -> Reply | None:
        if text in self._replies:
            self._replies.move_to_end(text)
        return self._replies.get(text)

    def put(self, text: str, reply: Reply) -> None:
        self._replies[text] = reply
        self._replies.move_to_end(text)
        if len(self._replies) > self.capacity:
            self._replies.popitem(last=False)


def _translate_chunk(plans: list[_Plan], backend: Backend, prompt: str, language: str, batch_size: int,
                     cache: _ReplyCache) -> list[dict]:
    replies = {core: cache.get(core) for plan in plans for core in plan.cores()}
    missing = [core for core, reply in replies.items() if reply is None]
    for start in range(0, len(missing), batch_size):
        batch = missing[start:start + batch_size]
        answers = backend.translate([fill_prompt(prompt, language, core) for core in batch])
        if len(answers) != len(batch):
            raise BackendError(f"{len(answers)} replies to {len(batch)} prompts")
        for core, answer in zip(batch, answers):
            replies[core] = answer
            cache.put(core, answer)
    return [_record(plan, replies) for plan in plans]


def _write_dataset(spec: DatasetSpec, rows: Sequence[Row], records: Mapping[str, dict], path: pathlib.Path,
                   suffix: str) -> DatasetReport:
    """Writes the translated JSONL (through a rename) from the rows and their records."""
    counts = collections.Counter()
    kept = []
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w", encoding="utf-8") as stream:
        for row in rows:
            record = records[str(row.line)]
            counts[record["status"]] += 1
            if record["status"] == "kept":
                kept.append((f"{spec.annotation}:{row.line}", record["reason"], record["error"]))
            if record["status"] != "translated":
                stream.write(row.text + "\n")
                continue
            sample = json.loads(row.text)
            sample.pop("length", None)
            sample["conversations"] = [{**turn, "value": value}
                                       for turn, value in zip(sample["conversations"], record["prediction"])]
            stream.write(json.dumps(sample, ensure_ascii=False) + "\n")
    os.replace(temporary, path)
    return DatasetReport(spec.name + suffix, path, len(rows), counts["translated"], counts["unchanged"], kept)


def _write_meta(path: pathlib.Path, specs: Sequence[DatasetSpec], reports: Sequence[DatasetReport],
                suffix: str) -> None:
    meta = {}
    for spec, report in zip(specs, reports):
        root = spec.root if not spec.root or "://" in spec.root else os.path.abspath(spec.root)
        entry = {"root": root, "annotation": report.path.name, "data_augment": spec.data_augment,
                 "repeat_time": spec.repeat_time, "length": report.rows}
        if spec.max_dynamic_patch is not None:
            entry["max_dynamic_patch"] = spec.max_dynamic_patch
        meta[spec.name + suffix] = entry
    write_json(path, meta)


# ---------------------------------------------------------------------------------------------
# Command line.


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m internvl_jax.data.translate",
                                     description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--meta", help="meta JSON file: {name: {root, annotation, ...}}")
    source.add_argument("--jsonl", help="one annotation file (its meta entry is named after the file)")
    parser.add_argument("--root", default="", help="with --jsonl: the image root of its rows")
    parser.add_argument("--out-dir", required=True, help="folder for the translated files and progress records")
    parser.add_argument("--target-language", default="Chinese")
    parser.add_argument("--suffix", default=None, help="added to data set and file names (default: _zh, _ja, ...)")
    parser.add_argument("--backend", choices=("model", "openai"), required=True)
    parser.add_argument("--checkpoint", help="model backend: checkpoint folder (HF layout, e.g. an export)")
    parser.add_argument("--endpoint", help="openai backend: API base URL, e.g. http://localhost:8000/v1")
    parser.add_argument("--api-key-env", default=None, metavar="VAR",
                        help="openai backend: environment variable holding the API key (default OPENAI_API_KEY, "
                             "if set)")
    parser.add_argument("--model-name", help="openai backend: the model to ask")
    parser.add_argument("--temperature", type=float, default=0.0, help="openai backend (the model backend is greedy)")
    parser.add_argument("--retries", type=int, default=3, help="openai backend: retries of a failed request")
    parser.add_argument("--timeout", type=float, default=300.0, help="openai backend: seconds per request")
    parser.add_argument("--prompt-file", help="prompt template with {language} and {text} (default: DEFAULT_PROMPT)")
    parser.add_argument("--batch-size", type=int, default=16, help="texts per model batch / concurrent requests")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--limit", type=int, default=None, help="translate only the first N rows of each data set")
    return parser.parse_args(argv)


def _backend(args: argparse.Namespace) -> Backend:
    if args.backend == "model":
        if not args.checkpoint:
            raise ValueError("--backend model needs --checkpoint")
        return ModelBackend(args.checkpoint, max_new_tokens=args.max_new_tokens)
    if not args.endpoint or not args.model_name:
        raise ValueError("--backend openai needs --endpoint and --model-name")
    api_key = os.environ.get(args.api_key_env or "OPENAI_API_KEY")
    if args.api_key_env and not api_key:
        raise ValueError(f"environment variable {args.api_key_env} (--api-key-env) is not set")
    return OpenAIBackend(args.endpoint, args.model_name, api_key, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, timeout=args.timeout, retries=args.retries,
                         workers=args.batch_size)


def _datasets(args: argparse.Namespace) -> tuple[list[DatasetSpec], str]:
    """The data sets to translate and the stem of the meta file to write."""
    if args.meta:
        return load_meta(args.meta), pathlib.Path(args.meta).stem
    if not args.jsonl.endswith(".jsonl"):
        raise DataError(args.jsonl, "--jsonl takes a .jsonl file")
    stem = pathlib.Path(args.jsonl).stem
    root = args.root if not args.root or "://" in args.root else os.path.abspath(args.root)
    return [DatasetSpec(name=stem, root=root, annotation=args.jsonl)], stem


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    suffix = language_suffix(args.target_language) if args.suffix is None else args.suffix
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        prompt = pathlib.Path(args.prompt_file).read_text(encoding="utf-8") if args.prompt_file else DEFAULT_PROMPT
        if "{text}" not in prompt:
            raise ValueError(f"{args.prompt_file}: the prompt has no {{text}} placeholder")
        backend = _backend(args)
        specs, meta_name = _datasets(args)
        reports = translate(specs, args.out_dir, backend, language=args.target_language, suffix=suffix,
                            prompt=prompt, batch_size=args.batch_size, limit=args.limit, meta_name=meta_name)
    except (DataError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except BackendError as error:
        print(f"error: {error}\nthe rows finished so far are recorded in {args.out_dir}/progress; run the same "
              "command again to resume", file=sys.stderr)
        return 1
    for report in reports:
        print(report.format())
    print(f"meta: {pathlib.Path(args.out_dir) / f'{meta_name}{suffix}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
