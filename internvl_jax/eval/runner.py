"""Running a benchmark: the predictor interface, batching, failures, resume, shards, multi-turn.

The harness talks to a model through one narrow interface:

    Request(id, images, question, max_new_tokens, max_tiles, history=[], min_new_tokens=0)
    Predictor.predict(requests: list[Request]) -> list[str]     # one answer per request

`ModelPredictor` adapts a loaded checkpoint to it through `internvl_jax.chat` (imported only when
used); tests and other back ends pass any object with `predict`.

`evaluate_benchmark` asks this process's share of the samples (shard i of k: every k-th sample, or
every k-th conversation in multi-turn mode), appending each answered batch to the predictions
file; samples already answered there are skipped, so an interrupted run resumes. A sample whose
image cannot be read, or whose prediction raises, is recorded as failed with the error (a failing
batch is retried one request at a time, so one bad sample does not fail its neighbours). When
every shard has finished, the process that sees it scores the merged predictions and writes the
results JSON and the export.

Multi-turn mode asks the questions that share a conversation key (the same image, or MME's image
within a subtask, or a JSONL `conversation` field) one after another in one conversation: each
turn gets the earlier turns' questions and the model's answers as history.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import pathlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from PIL import Image
from tqdm import tqdm

from internvl_jax.data.images import ImageError
from internvl_jax.eval.benchmarks import Benchmark
from internvl_jax.eval.report import EXPORT, RESULTS, results_document, write_export, write_json
from internvl_jax.eval.samples import Sample
from internvl_jax.eval.store import PredictionStore, Shard, failure_record, success_record

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"


@dataclasses.dataclass(frozen=True)
class Request:
    """One question for the model.

    images: the question's images, decoded (RGB); the model tiles each with `max_tiles`.
    question: the full prompt text of this turn, without image placeholders.
    history: earlier (question, answer) turns of the conversation, oldest first; the images
        belong to the first turn.
    """
    id: str
    images: list[Image.Image]
    question: str
    max_new_tokens: int
    max_tiles: int
    history: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    min_new_tokens: int = 0


class Predictor(Protocol):
    def predict(self, requests: list[Request]) -> list[str]:
        """One answer per request, in order."""


class ModelPredictor:
    """A checkpoint answering through `internvl_jax.chat`: `batch_chat` for first turns (one call
    per tile budget and token limit), `chat` for turns with history (and when there is no
    `batch_chat`).

    Questions get image placeholders as the official API expects: `<image>\\n` in front for one
    image, `Image-1: <image>\\nImage-2: <image>\\n...` for several.

    generation: extra decoding options for every request (e.g. {"do_sample": True, "top_p": 0.9});
        the default is greedy, as every evaluation preset.
    """

    def __init__(self, model, tokenizer, config, *, mesh=None, generation: Mapping[str, Any] | None = None,
                 system_message: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.mesh = mesh
        self.generation = dict(generation or {})
        self.system_message = system_message

    def predict(self, requests: list[Request]) -> list[str]:
        chat_api = importlib.import_module("internvl_jax.chat")
        chat = getattr(chat_api, "chat", None)
        batch_chat = getattr(chat_api, "batch_chat", None)
        answers: list[str | None] = [None] * len(requests)
        first_turns: dict[tuple[int, int, int], list[int]] = defaultdict(list)
        for position, request in enumerate(requests):
            if request.history or batch_chat is None:
                answers[position] = self._chat(chat, request)
            else:
                first_turns[(request.max_tiles, request.max_new_tokens, request.min_new_tokens)].append(position)
        for positions in first_turns.values():
            batch = [requests[position] for position in positions]
            outputs = batch_chat(self.model, self.tokenizer, self.config, [request.images or None for request in batch],
                                 [_with_placeholders(request.question, len(request.images)) for request in batch],
                                 self._generation(batch[0]), max_tiles=batch[0].max_tiles,
                                 system_message=self.system_message, mesh=self.mesh)
            for position, output in zip(positions, outputs):
                answers[position] = output
        return answers

    def _chat(self, chat, request: Request) -> str:
        if chat is None:
            raise RuntimeError("internvl_jax.chat has no chat(), which questions with history need")
        history = [(question, answer) for question, answer in request.history]
        if history:  # the images belong to the first turn, as chat() itself stores it
            history[0] = (_with_placeholders(history[0][0], len(request.images)), history[0][1])
            question = request.question
        else:
            question = _with_placeholders(request.question, len(request.images))
        answer, _ = chat(self.model, self.tokenizer, self.config, request.images or None, question,
                         history or None, self._generation(request), max_tiles=request.max_tiles,
                         system_message=self.system_message, mesh=self.mesh)
        return answer

    def _generation(self, request: Request) -> dict[str, Any]:
        return {"max_new_tokens": request.max_new_tokens, "min_new_tokens": request.min_new_tokens,
                "do_sample": False, **self.generation}


def _with_placeholders(question: str, image_count: int) -> str:
    if image_count == 0 or IMAGE_PLACEHOLDER in question:
        return question
    if image_count == 1:
        return f"{IMAGE_PLACEHOLDER}\n{question}"
    return "".join(f"Image-{number}: {IMAGE_PLACEHOLDER}\n" for number in range(1, image_count + 1)) + question


# ---------------------------------------------------------------------------------------------
# Asking the samples


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """How a run is carried out (what it asks is in the benchmark options).

    limit: only the first `limit` samples (a quick check).
    """
    batch_size: int = 8
    multi_turn: bool = False
    shard: Shard = Shard()
    limit: int | None = None
    progress: bool = True

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")


def conversations(samples: Sequence[Sample], multi_turn: bool) -> list[list[Sample]]:
    """The samples as conversations, in order of first appearance (one sample each unless multi-turn)."""
    if not multi_turn:
        return [[sample] for sample in samples]
    grouped: dict[str, list[Sample]] = {}
    for sample in samples:
        grouped.setdefault(sample.conversation, []).append(sample)
    return list(grouped.values())


def _predict(predictor: Predictor, requests: list[Request]) -> list[str | Exception]:
    """The predictor's answers, or for each request that fails, its exception."""
    if not requests:
        return []
    try:
        answers = predictor.predict(requests)
        if not isinstance(answers, list) or len(answers) != len(requests) or \
                not all(isinstance(answer, str) for answer in answers):
            raise TypeError(f"predict() returned {answers!r} for {len(requests)} requests; expected as many strings")
        return answers
    except Exception as error:  # noqa: BLE001 - any model error becomes the sample's recorded failure
        if len(requests) == 1:
            return [error]
        log.warning("a batch of %d failed (%s: %s); asking one at a time", len(requests), type(error).__name__, error)
        return [outcome for request in requests for outcome in _predict(predictor, [request])]


def _answer_batch(predictor: Predictor, items: Sequence[tuple[Sample, list[tuple[str, str]]]],
                  options: Mapping[str, Any]) -> list[dict]:
    """Records (success or failure) for (sample, history) items, in order."""
    records: dict[str, dict] = {}
    asked, requests = [], []
    for sample, history in items:
        try:
            images = [image.load() for image in sample.images]
        except ImageError as error:
            records[sample.id] = failure_record(sample.id, sample.prompt, f"{sample.source}: {error}")
            continue
        asked.append(sample)
        requests.append(Request(id=sample.id, images=images, question=sample.prompt, history=history,
                                max_new_tokens=options["max_new_tokens"], min_new_tokens=options["min_new_tokens"],
                                max_tiles=options["max_tiles"]))
    for sample, outcome in zip(asked, _predict(predictor, requests)):
        if isinstance(outcome, Exception):
            records[sample.id] = failure_record(sample.id, sample.prompt,
                                                f"{sample.source}: {type(outcome).__name__}: {outcome}")
        else:
            records[sample.id] = success_record(sample.id, sample.prompt, outcome)
    for record in records.values():
        if record["failed"]:
            log.warning("sample %s failed: %s", record["id"], record["error"])
    return [records[sample.id] for sample, _ in items]


def _history(earlier: Sequence[Sample], answered: Mapping[str, str]) -> list[tuple[str, str]]:
    """The answered earlier turns as (question, answer) pairs (a failed turn is left out)."""
    return [(sample.prompt, answered[sample.id]) for sample in earlier if sample.id in answered]


def predict_conversations(talks: Sequence[Sequence[Sample]], predictor: Predictor, store: PredictionStore,
                          options: Mapping[str, Any], config: RunConfig, description: str = "") -> None:
    """Asks every sample of `talks` without a successful prediction in `store`, turn by turn."""
    answered = {sample_id: record["prediction"] for sample_id, record in store.records().items()
                if not record["failed"]}
    total = sum(len(talk) for talk in talks)
    done = sum(sample.id in answered for talk in talks for sample in talk)
    with tqdm(total=total, initial=done, desc=description, unit="sample", disable=not config.progress,
              dynamic_ncols=True) as progress:
        # Turn t of every conversation is asked once turns < t are answered, so batches can mix
        # conversations while each turn still sees its history.
        for turn in range(max((len(talk) for talk in talks), default=0)):
            todo = [(talk[turn], _history(talk[:turn], answered)) for talk in talks
                    if len(talk) > turn and talk[turn].id not in answered]
            for start in range(0, len(todo), config.batch_size):
                batch = todo[start:start + config.batch_size]
                records = _answer_batch(predictor, batch, options)
                store.append(records)
                answered.update((record["id"], record["prediction"]) for record in records if not record["failed"])
                progress.update(len(batch))


# ---------------------------------------------------------------------------------------------
# One benchmark, end to end


def settings_key(options: Mapping[str, Any], run_info: Mapping[str, Any], multi_turn: bool) -> str:
    """Fingerprint of everything that changes the answers; predictions made under another one are
    not resumed from. (Package version, batch size and shard count are left out.)"""
    material = {"options": options, "checkpoint": run_info.get("checkpoint"),
                "generation": run_info.get("generation", {}), "multi_turn": multi_turn}
    return hashlib.sha1(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:16]


def evaluate_benchmark(benchmark: Benchmark, samples: Sequence[Sample], options: Mapping[str, Any],
                       predictor: Predictor, out_dir: pathlib.Path, config: RunConfig = RunConfig(),
                       run_info: Mapping[str, Any] | None = None) -> dict | None:
    """Predicts this shard's samples, then, once all shards are done, scores and writes results.

    run_info: recorded in the results (preset, checkpoint, version, generation options).
    Returns the results document, or None while other shards are still running.
    """
    run_info = dict(run_info or {})
    samples = list(samples[:config.limit] if config.limit else samples)
    key = settings_key(options, run_info, config.multi_turn)
    store = PredictionStore(out_dir, key, config.shard)
    mine = config.shard.take(conversations(samples, config.multi_turn))
    predict_conversations(mine, predictor, store, options, config, description=benchmark.name)
    store.mark_done()
    if not store.all_shards_done():
        log.info("%s: shard %d/%d done; the last shard to finish writes the results", benchmark.name,
                 config.shard.index, config.shard.count)
        return None
    records = store.records()
    predictions = {sample_id: record["prediction"] for sample_id, record in records.items() if not record["failed"]}
    score = benchmark.score(samples, predictions, options)
    settings = {**run_info, "options": dict(options), "multi_turn": config.multi_turn,
                "limit": config.limit, "shards": config.shard.count, "batch_size": config.batch_size,
                "settings_key": key}
    document = results_document(benchmark, samples, records, score, settings, [path.name for path in store.files()])
    write_export(out_dir / EXPORT, benchmark, samples, records)
    write_json(out_dir / RESULTS, document)
    return document
