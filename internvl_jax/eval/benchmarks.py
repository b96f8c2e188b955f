"""Benchmark readers and scorers for the official evaluation formats (spec §12.2-§12.3).

Each benchmark reads its files from a data directory laid out as InternVL's `internvl_chat/data/`
(`textvqa/textvqa_val.jsonl`, `mmbench/mmbench_dev_20230712.tsv`, ...; MME's question lists under
`mme/Your_Results/`), builds every prompt the way the official script does, and scores predictions
with `internvl_jax.eval.metrics`. File locations are options (`file`, `annotation`, `images`, ...),
so any of them can be pointed elsewhere; the generation settings (prompt suffix, max new tokens,
tiles) come from a preset (`internvl_jax.eval.presets`).

`get_benchmark(name)` knows the built-in names (`BENCHMARKS`) and two generic kinds for users'
files: `jsonl:PATH` (one question per line: image, question, answers) and `tsv:PATH` (a
VLMEvalKit multiple choice TSV such as MMStar, SEEDBench_IMG or MMT-Bench, base64 images).

Scores use the scale of the published tables: percent, except MME (points, max 2800).
"""
from __future__ import annotations

import dataclasses
import pathlib
import string
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from internvl_jax.eval import metrics
from internvl_jax.eval.samples import (
    BenchmarkError, ImageRef, Sample, answer_list, check_unique_ids, field, join_prompt,
    multiple_choice_prompt, read_json, read_jsonl, read_tsv, require_file, resolve_image, where)

# VLMEvalKit TSVs store a repeated image once; other rows hold that row's index (a short string)
# in their image field instead of base64 data.
_MAX_IMAGE_REFERENCE = 64
# ScienceQA's official script labels choices with these letters only.
_SCIENCEQA_LETTERS = "ABCDE"


@dataclasses.dataclass(frozen=True)
class Score:
    """A benchmark's headline number, its metric's name and the breakdown behind it."""
    value: float
    metric: str
    details: dict = dataclasses.field(default_factory=dict)


def _percent(values: Iterable[float]) -> float:
    return 100.0 * metrics.mean_score(values)


class Benchmark:
    """A benchmark: its files (options), how to read them into samples, and how to score them.

    Subclasses set `name`, `kind` (a family that `kind.option=value` overrides address, e.g.
    `mmbench` for all MMBench splits) and `options` (defaults of its file options), and implement
    `_load` and `_score`.
    """
    name: str
    kind: str
    options: Mapping[str, Any]
    # Whether every row must carry ground truth (validation splits); otherwise rows may carry
    # none at all (a test split, exported for a server) but not some.
    requires_answers: bool = True

    def load(self, data_dir: pathlib.Path, options: Mapping[str, Any]) -> list[Sample]:
        """All samples, prompts built with `options`; raises BenchmarkError naming file and line."""
        samples = self._load(data_dir, options)
        if not samples:
            files = [str(data_dir / options[key]) for key in self.options if key.endswith("file") or key == "lists"]
            raise BenchmarkError(", ".join(files), f"no samples for {self.name}")
        needed = self.requires_answers or any(sample.answers is not None for sample in samples)
        for sample in samples:
            if needed and sample.answers is None:
                raise BenchmarkError(sample.source, "missing field 'answer' (ground truth)")
        check_unique_ids(samples)
        return samples

    def _load(self, data_dir: pathlib.Path, options: Mapping[str, Any]) -> list[Sample]:
        raise NotImplementedError

    def score(self, samples: Sequence[Sample], predictions: Mapping[str, str],
              options: Mapping[str, Any]) -> Score | None:
        """The official score over the samples that have a prediction (id -> raw model output).

        None when the split has no ground truth or nothing was predicted.
        """
        predicted = [sample for sample in samples if sample.id in predictions]
        if not predicted or any(sample.answers is None for sample in samples):
            return None
        return self._score(predicted, predictions, options)

    def _score(self, samples: Sequence[Sample], predictions: Mapping[str, str], options: Mapping[str, Any]) -> Score:
        raise NotImplementedError

    def export_prediction(self, sample: Sample, prediction: str) -> str:
        """The prediction as the export carries it (multiple choice: the extracted letter)."""
        return prediction


def _image_roots(data_dir: pathlib.Path, options: Mapping[str, Any], data_file: pathlib.Path) -> list[pathlib.Path]:
    """Where relative image paths are looked up: the `images` option, the data file's folder, the data dir."""
    roots = [data_dir / options["images"]] if options.get("images") else []
    return roots + [data_file.parent, data_dir]


def _images(value: Any, location: str, roots: Sequence[pathlib.Path], required: bool) -> tuple[ImageRef, ...]:
    """The row's 'image' field (a path or a list of paths) as image references."""
    if value is None and not required:
        return ()
    paths = value if isinstance(value, list) else [value]
    if not paths or not all(isinstance(path, str) and path for path in paths):
        raise BenchmarkError(location, f"field 'image' should be a path or a list of paths, got {value!r}")
    return tuple(resolve_image(path, roots) for path in paths)


# ---------------------------------------------------------------------------------------------
# Open-ended VQA from JSONL: TextVQA, DocVQA, InfoVQA, ChartQA, AI2D, users' sets


def _read_annotations(path: pathlib.Path) -> dict[str, tuple[str, ...]]:
    """question id -> answers, from a VQA-format ({'annotations': [{'question_id', 'answers':
    [{'answer'}]}]}, TextVQA) or DocVQA-format ({'data': [{'questionId', 'answers'}]}) file."""
    data = read_json(path, "annotation file")
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        container, id_key = "annotations", "question_id"
    elif isinstance(data, dict) and isinstance(data.get("data"), list):
        container, id_key = "data", "questionId"
    else:
        raise BenchmarkError(str(path), "expected {'annotations': [...]} (VQA format) or {'data': [...]} "
                                        "(DocVQA format)")
    answers = {}
    for position, item in enumerate(data[container]):
        location = f"{path}, {container}[{position}]"
        if not isinstance(item, dict):
            raise BenchmarkError(location, f"expected an object, got {item!r}")
        truth = field(item, "answers", location, list)
        if id_key == "question_id":  # VQA format: one {'answer': ...} per annotator
            truth = [field(entry, "answer", location) if isinstance(entry, dict) else entry for entry in truth]
        answers[str(field(item, id_key, location, (int, str)))] = answer_list(truth, location, "answers")
    return answers


@dataclasses.dataclass(frozen=True)
class VQABenchmark(Benchmark):
    """Questions from JSONL lines {image, question, question_id, answer}, scored per sample.

    Users' sets (`jsonl:PATH`) use the same reader: {"id"?, "image"?: path or [paths],
    "question", "answers": [...] or "answer", "conversation"?: key for multi-turn mode}, scored
    with the `metric` option (exact_match by default; any name in metrics.METRICS).

    files: subset name -> default path; ChartQA's two subsets are scored apart and averaged.
    id_field: the sample id comes from this field when present, else from the line number.
    annotation: default ground-truth file (e.g. TextVQA's ten answers per question); "" takes
        the answers from each line's 'answers' or 'answer' field.
    """
    name: str
    kind: str
    files: Mapping[str, str]
    metric: str
    id_field: str | None = None
    annotation: str = ""
    requires_answers: bool = True
    image_required: bool = True

    @property
    def options(self) -> dict[str, Any]:
        options = {_file_option(subset): path for subset, path in self.files.items()}
        options.update(annotation=self.annotation, images="")
        if self.kind == "jsonl":  # a user's set picks its metric; built-ins keep the official one
            options["metric"] = self.metric
        return options

    def _load(self, data_dir: pathlib.Path, options: Mapping[str, Any]) -> list[Sample]:
        if options.get("metric", self.metric) not in metrics.METRICS:
            raise BenchmarkError(f"option {self.name}.metric", f"unknown metric {options['metric']!r}; known: "
                                                               f"{sorted(metrics.METRICS)}")
        annotation = data_dir / options["annotation"] if options["annotation"] else None
        truth = _read_annotations(annotation) if annotation is not None else None
        samples = []
        for subset in self.files:
            path = data_dir / options[_file_option(subset)]
            roots = _image_roots(data_dir, options, path)
            for line, row in read_jsonl(path):
                samples.append(self._sample(row, where(path, line), line, subset, roots, options, truth, annotation))
        return samples

    def _sample(self, row: dict, location: str, line: int, subset: str, roots: Sequence[pathlib.Path],
                options: Mapping[str, Any], truth: Mapping[str, tuple[str, ...]] | None,
                annotation: pathlib.Path | None) -> Sample:
        question = field(row, "question", location)
        images = _images(row.get("image"), location, roots, self.image_required)
        has_id = self.id_field is not None and row.get(self.id_field) not in (None, "")
        identifier = str(row[self.id_field]) if has_id else str(line)
        if truth is not None:
            question_id = str(field(row, self.id_field, location, (int, str)))
            if question_id not in truth:
                raise BenchmarkError(location, f"{self.id_field} {question_id} has no answers in {annotation}")
            answers = truth[question_id]
        else:
            answers = _row_answers(row, location)
        sample_id = f"{subset}/{identifier}" if len(self.files) > 1 else identifier
        # An explicit conversation key, else the images asked about, else (text only) none shared.
        conversation = str(row.get("conversation") or "") or "|".join(image.key for image in images) or sample_id
        return Sample(
            id=sample_id, prompt=join_prompt(question, options["prompt_sep"], options["prompt"]), images=images,
            answers=answers, source=location, subset=subset, conversation=conversation,
            export={"index": sample_id, "question": question, "answer": "" if answers is None else list(answers)})

    def _score(self, samples: Sequence[Sample], predictions: Mapping[str, str], options: Mapping[str, Any]) -> Score:
        metric = options.get("metric", self.metric)
        by_subset: dict[str, list[float]] = defaultdict(list)
        for sample in samples:
            by_subset[sample.subset].append(metrics.METRICS[metric](predictions[sample.id], list(sample.answers)))
        subsets = {subset: _percent(scores) for subset, scores in by_subset.items()}
        details = {"subsets": subsets} if len(self.files) > 1 else {}
        # ChartQA's final number is the plain mean of its subsets' accuracies, not a pooled one.
        return Score(sum(subsets.values()) / len(subsets), metric, details)


def _file_option(subset: str) -> str:
    return f"{subset}_file" if subset else "file"


def _row_answers(row: Mapping[str, Any], location: str) -> tuple[str, ...] | None:
    """The line's 'answers' (or else 'answer') field; None when it has neither."""
    for name in ("answers", "answer"):
        if row.get(name) not in (None, ""):
            return answer_list(row[name], location, name)
    return None


# ---------------------------------------------------------------------------------------------
# Multiple choice: MMBench / CCBench / VLMEvalKit TSVs, ScienceQA


class MultipleChoiceBenchmark(Benchmark):
    """Scoring and export shared by the multiple choice benchmarks.

    The score is circular accuracy over question groups (plain accuracy when every group has one
    row), overall and per category; the export carries the extracted letter, as the official
    MMBench script writes its submission (the raw output when no letter can be found).
    """

    def _score(self, samples: Sequence[Sample], predictions: Mapping[str, str], options: Mapping[str, Any]) -> Score:
        def accuracy(members: Iterable[Sample]) -> float:
            return 100.0 * metrics.mmbench_circular_accuracy(
                {"group": sample.group, "prediction": predictions[sample.id], "options": sample.options,
                 "answer": sample.answers[0]} for sample in members)

        by_category: dict[str, list[Sample]] = defaultdict(list)
        for sample in samples:
            if sample.subset:
                by_category[sample.subset].append(sample)
        details = {"groups": len({sample.group for sample in samples}),
                   "categories": {name: accuracy(members) for name, members in sorted(by_category.items())}}
        return Score(accuracy(samples), "circular_accuracy", details)

    def export_prediction(self, sample: Sample, prediction: str) -> str:
        choice = metrics.extract_choice(prediction, sample.options)
        return prediction if choice is None else choice


@dataclasses.dataclass(frozen=True)
class MultipleChoiceTSV(MultipleChoiceBenchmark):
    """MMBench / CCBench TSVs and VLMEvalKit multiple choice TSVs.

    Columns: index, question, optional hint, one column per option letter (A, B, ...; empty when
    unused), answer (absent in test splits), category, and image: base64 file bytes, or the index
    of the row that holds them (VLMEvalKit stores a repeated image once). An `image_path` column
    (paths relative to the file, or to `images`) may replace `image`.

    Circular evaluation: MMBench files carry each question's option rotations as extra rows with
    index + k * 1,000,000; a question counts as correct only if all its rows are. Files without
    rotations score plain accuracy.
    """
    name: str
    kind: str
    file: str
    requires_answers: bool = True

    @property
    def options(self) -> dict[str, Any]:
        return {"file": self.file, "images": ""}

    def _load(self, data_dir: pathlib.Path, options: Mapping[str, Any]) -> list[Sample]:
        path = data_dir / options["file"]
        header, rows = read_tsv(path, required=("index", "question"))
        letters = [letter for letter in string.ascii_uppercase if letter in header]
        if not letters:
            raise BenchmarkError(where(path, 1), "no option columns (A, B, ...) in the header")
        if "image" not in header and "image_path" not in header:
            raise BenchmarkError(where(path, 1), "header has neither an 'image' nor an 'image_path' column")
        roots = _image_roots(data_dir, options, path)
        stored = {row["index"]: row.get("image", "") for _, row in rows}
        return [self._sample(row, where(path, line), letters, stored, roots, options) for line, row in rows]

    def _sample(self, row: dict, location: str, letters: Sequence[str], stored: Mapping[str, str],
                roots: Sequence[pathlib.Path], options: Mapping[str, Any]) -> Sample:
        index = field(row, "index", location)
        if not index.lstrip("-").isdigit():
            raise BenchmarkError(location, f"index should be an integer, got {index!r}")
        choices = {letter: row[letter] for letter in letters if row[letter]}
        if not choices:
            raise BenchmarkError(location, "no options: every option column is empty")
        answer = row.get("answer") or None
        if answer is not None and answer not in choices:
            raise BenchmarkError(location, f"answer {answer!r} is not one of the options {list(choices)}")
        image = self._image(row, location, stored, roots)
        prompt = multiple_choice_prompt(field(row, "question", location), row.get("hint") or None, choices,
                                        options["prompt_sep"], options["prompt"])
        return Sample(
            id=index, prompt=prompt, images=(image,), answers=None if answer is None else (answer,), source=location,
            subset=row.get("category", ""), options=choices,
            group=str(metrics.mmbench_circular_group(int(index))), conversation=image.key,
            export={name: value for name, value in row.items() if name != "image"})

    @staticmethod
    def _image(row: dict, location: str, stored: Mapping[str, str], roots: Sequence[pathlib.Path]) -> ImageRef:
        if "image" not in row:
            return resolve_image(field(row, "image_path", location), roots)
        data = field(row, "image", location)
        if len(data) > _MAX_IMAGE_REFERENCE:
            return ImageRef(data=data)
        if len(stored.get(data, "")) <= _MAX_IMAGE_REFERENCE:
            raise BenchmarkError(location, f"image refers to row index {data!r}, which holds no image data")
        return ImageRef(data=stored[data])


@dataclasses.dataclass(frozen=True)
class ScienceQA(MultipleChoiceBenchmark):
    """ScienceQA-IMG: JSONL lines {image, question, hint, choices: [...], answer: index}.

    The prompt is [hint + '\\n'] + question + '\\nA. choice' per choice + '\\n' + instruction;
    the score is the accuracy of the extracted letter.
    """
    name: str = "scienceqa"
    kind: str = "scienceqa"
    file: str = "scienceqa/scienceqa_test_img.jsonl"

    @property
    def options(self) -> dict[str, Any]:
        return {"file": self.file, "images": ""}

    def _load(self, data_dir: pathlib.Path, options: Mapping[str, Any]) -> list[Sample]:
        path = data_dir / options["file"]
        roots = _image_roots(data_dir, options, path)
        return [self._sample(row, where(path, line), str(line), roots, options) for line, row in read_jsonl(path)]

    @staticmethod
    def _sample(row: dict, location: str, sample_id: str, roots: Sequence[pathlib.Path],
                options: Mapping[str, Any]) -> Sample:
        choices = field(row, "choices", location, list)
        if not 1 <= len(choices) <= len(_SCIENCEQA_LETTERS) or not all(isinstance(c, str) for c in choices):
            raise BenchmarkError(location, f"'choices' should be 1 to {len(_SCIENCEQA_LETTERS)} strings, "
                                           f"got {choices!r}")
        if "answer" not in row:
            raise BenchmarkError(location, "missing field 'answer' (ground truth)")
        answer = row["answer"]
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise BenchmarkError(location, f"'answer' should be a choice index 0..{len(choices) - 1}, got {answer!r}")
        options_by_letter = dict(zip(_SCIENCEQA_LETTERS, choices))
        images = _images(row.get("image"), location, roots, required=True)
        question = field(row, "question", location)
        prompt = multiple_choice_prompt(question, row.get("hint") or None, options_by_letter,
                                        options["prompt_sep"], options["prompt"])
        letter = _SCIENCEQA_LETTERS[answer]
        return Sample(id=sample_id, prompt=prompt, images=images, answers=(letter,), source=location,
                      options=options_by_letter, group=sample_id, conversation=images[0].key,
                      export={"index": sample_id, "question": question, **options_by_letter, "answer": letter})


# ---------------------------------------------------------------------------------------------
# MME and POPE (yes/no)


@dataclasses.dataclass(frozen=True)
class MME(Benchmark):
    """MME from the official question lists: `<subtask>.txt`, lines `image<TAB>question<TAB>Yes|No`.

    Images are `<images>/<subtask>/<image>` or, as the release nests some subtasks,
    `<images>/<subtask>/images/<image>`.
    """
    name: str = "mme"
    kind: str = "mme"

    @property
    def options(self) -> dict[str, Any]:
        return {"lists": "mme/Your_Results", "images": "mme/MME_Benchmark_release_version"}

    def _load(self, data_dir: pathlib.Path, options: Mapping[str, Any]) -> list[Sample]:
        lists = data_dir / options["lists"]
        files = sorted(lists.glob("*.txt")) if lists.is_dir() else []
        if not files:
            raise BenchmarkError(str(lists), "no MME question lists (<subtask>.txt) found")
        samples = []
        for path in files:
            subtask = path.stem
            if subtask not in metrics.MME_PERCEPTION + metrics.MME_COGNITION:
                raise BenchmarkError(str(path), f"unknown MME subtask {subtask!r}; the lists are named after "
                                                f"{metrics.MME_PERCEPTION + metrics.MME_COGNITION}")
            roots = [data_dir / options["images"] / subtask, data_dir / options["images"] / subtask / "images"]
            with open(path, encoding="utf-8") as stream:
                for line, text in enumerate(stream, start=1):
                    if text.strip():
                        samples.append(self._sample(text, path, line, subtask, roots, options))
        return samples

    @staticmethod
    def _sample(text: str, path: pathlib.Path, line: int, subtask: str, roots: Sequence[pathlib.Path],
                options: Mapping[str, Any]) -> Sample:
        location = where(path, line)
        parts = text.strip().split("\t")
        if len(parts) != 3:
            raise BenchmarkError(location, f"expected 'image<TAB>question<TAB>answer', got {len(parts)} field(s)")
        image, question, truth = parts
        if truth.strip().lower() not in ("yes", "no"):
            raise BenchmarkError(location, f"answer should be Yes or No, got {truth!r}")
        group = f"{subtask}/{image}"
        return Sample(id=f"{subtask}:{line}", prompt=join_prompt(question, options["prompt_sep"], options["prompt"]),
                      images=(resolve_image(image, roots),), answers=(truth,), source=location, subset=subtask,
                      group=group, conversation=group,
                      export={"index": f"{subtask}:{line}", "category": subtask, "image_path": image,
                              "question": question, "answer": truth})

    def _score(self, samples: Sequence[Sample], predictions: Mapping[str, str], options: Mapping[str, Any]) -> Score:
        scores = metrics.mme_scores((sample.subset, sample.group, sample.answers[0], predictions[sample.id])
                                    for sample in samples)
        details = {key: scores[key] for key in ("perception", "cognition", "subtasks")}
        return Score(scores["total"], "mme_score", details)


@dataclasses.dataclass(frozen=True)
class POPE(Benchmark):
    """POPE: questions {question_id, image, text, category} (the prompt is inside `text`) and
    labels `<labels>/coco_pope_<category>.json` (JSONL, {image, label: yes|no}).

    As the official eval_pope.py, labels pair with the category's questions by position; the
    image names of each pair are checked to agree. Score: mean F1 over the categories.
    """
    name: str = "pope"
    kind: str = "pope"

    @property
    def options(self) -> dict[str, Any]:
        return {"file": "pope/llava_pope_test.jsonl", "labels": "pope/coco", "images": "pope/val2014"}

    def _load(self, data_dir: pathlib.Path, options: Mapping[str, Any]) -> list[Sample]:
        path = data_dir / options["file"]
        roots = _image_roots(data_dir, options, path)
        rows = list(read_jsonl(path))
        by_category: dict[str, list[tuple[int, dict]]] = defaultdict(list)
        for line, row in rows:
            by_category[field(row, "category", where(path, line))].append((line, row))
        labels = {}
        for category, questions in by_category.items():
            labels.update(self._labels(data_dir / options["labels"] / f"coco_pope_{category}.json", path, questions))
        samples = []
        for line, row in rows:
            location = where(path, line)
            image = field(row, "image", location)
            # The official script always appends ' ' + prompt, even an empty one.
            prompt = field(row, "text", location) + options["prompt_sep"] + options["prompt"]
            image_ref = resolve_image(image, roots)
            sample_id = str(field(row, "question_id", location, (int, str)))
            samples.append(Sample(id=sample_id, prompt=prompt, images=(image_ref,), answers=(labels[line],),
                                  source=location, subset=row["category"], conversation=image_ref.key,
                                  export={"index": sample_id, "question": row["text"], "category": row["category"],
                                          "answer": labels[line]}))
        return samples

    @staticmethod
    def _labels(label_path: pathlib.Path, question_path: pathlib.Path,
                questions: Sequence[tuple[int, dict]]) -> dict[int, str]:
        """Question line -> label, pairing the category's questions and labels in order."""
        category = questions[0][1]["category"]
        labels = list(read_jsonl(require_file(label_path, f"POPE label file for category {category!r}")))
        if len(labels) != len(questions):
            raise BenchmarkError(str(label_path), f"{len(labels)} labels, but {question_path} has {len(questions)} "
                                                  f"'{category}' questions (they pair by position)")
        paired = {}
        for (label_line, label_row), (line, row) in zip(labels, questions):
            location = where(label_path, label_line)
            label = field(label_row, "label", location)
            if label not in ("yes", "no"):
                raise BenchmarkError(location, f"label should be 'yes' or 'no', got {label!r}")
            question_image = pathlib.PurePath(field(row, "image", where(question_path, line))).name
            if pathlib.PurePath(field(label_row, "image", location)).name != question_image:
                raise BenchmarkError(location, f"image {label_row['image']!r} does not match {question_image!r} of "
                                               f"{where(question_path, line)} (labels pair with questions by position)")
            paired[line] = label
        return paired

    def _score(self, samples: Sequence[Sample], predictions: Mapping[str, str], options: Mapping[str, Any]) -> Score:
        scores = metrics.pope_scores((sample.subset, sample.answers[0], predictions[sample.id]) for sample in samples)
        return Score(100.0 * scores["mean_f1"], "pope_f1", {"categories": scores["categories"]})


# ---------------------------------------------------------------------------------------------
# Registry


def _vqa(name: str, path: str, metric: str, **kwargs: Any) -> VQABenchmark:
    return VQABenchmark(name=name, kind=name.split("_")[0], files={"": path}, metric=metric, **kwargs)


def _mmbench(name: str, path: str, requires_answers: bool) -> MultipleChoiceTSV:
    return MultipleChoiceTSV(name=name, kind="mmbench", file=path, requires_answers=requires_answers)


BENCHMARKS: dict[str, Benchmark] = {benchmark.name: benchmark for benchmark in (
    _vqa("textvqa", "textvqa/textvqa_val.jsonl", "vqa_accuracy", id_field="question_id",
         annotation="textvqa/textvqa_val_annotations.json"),
    _vqa("docvqa", "docvqa/val.jsonl", "anls", id_field="question_id"),
    _vqa("docvqa_test", "docvqa/test.jsonl", "anls", id_field="question_id", requires_answers=False),
    _vqa("infovqa", "infographicsvqa/val.jsonl", "anls", id_field="question_id"),
    _vqa("infovqa_test", "infographicsvqa/test.jsonl", "anls", id_field="question_id", requires_answers=False),
    VQABenchmark(name="chartqa", kind="chartqa", metric="relaxed_accuracy",
                 files={"human": "chartqa/test_human.jsonl", "augmented": "chartqa/test_augmented.jsonl"}),
    _vqa("ai2d", "ai2diagram/test_vlmevalkit.jsonl", "exact_match"),
    _mmbench("mmbench_dev_en", "mmbench/mmbench_dev_20230712.tsv", True),
    _mmbench("mmbench_dev_cn", "mmbench/mmbench_dev_cn_20231003.tsv", True),
    _mmbench("mmbench_test_en", "mmbench/mmbench_test_en_20231003.tsv", False),
    _mmbench("mmbench_test_cn", "mmbench/mmbench_test_cn_20231003.tsv", False),
    _mmbench("ccbench", "mmbench/CCBench_legacy.tsv", True),
    MME(),
    POPE(),
    ScienceQA(),
)}

def get_benchmark(name: str) -> Benchmark:
    """A built-in benchmark, or `jsonl:PATH` / `tsv:PATH` for a user's file (PATH relative to the
    data directory unless absolute; the benchmark is named after the file)."""
    kind, _, path = name.partition(":")
    if path and kind == "jsonl":
        return VQABenchmark(name=pathlib.PurePath(path).stem, kind="jsonl", files={"": path}, metric="exact_match",
                            id_field="id", requires_answers=False, image_required=False)
    if path and kind == "tsv":
        return MultipleChoiceTSV(name=pathlib.PurePath(path).stem, kind="tsv", file=path, requires_answers=False)
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}, or jsonl:PATH / tsv:PATH "
                         "for your own files")
    return BENCHMARKS[name]
