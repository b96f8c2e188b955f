"""Talking to an InternVL model: `chat` and `batch_chat` with the official semantics (spec §11), and
`python -m internvl_jax.chat`, a multi-turn command-line chat that streams the answer.

Images are given either as tiles (an array [N, H, W, 3] uint8 or normalised [N, 3, H, W] float, with
`num_patches_list` = tiles per image, as in the official API) or as images (PIL images, paths or
encoded bytes), which are tiled here with the configured budget: `max_tiles` tiles per image
(default `config.max_dynamic_patch`, as the official examples load every image with `max_num`),
plus a thumbnail when `config.use_thumbnail`.

Prompts follow the official `chat`: on the first turn `<image>\\n` is put in front of a question
that has no `<image>`; the i-th `<image>` of the conversation becomes image i's tokens; history is
kept as (question with its `<image>`, answer) pairs and re-expanded on every turn. Generation stops
on the template's separator (`<|im_end|>` / `<|end|>`) only; the answer is the decoded text before
the first separator, stripped.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TextIO

import numpy as np
from PIL import Image

from internvl_jax.config import MeshConfig, ModelConfig
from internvl_jax.data.conversation import (
    GPT, HUMAN, IMAGE_PLACEHOLDER, SampleError, SampleErrorReason, Template, build_prompt, get_template, parse_response)
from internvl_jax.data.images import ImageError, load_image
from internvl_jax.data.tiling import tile_image, tiles_to_array
from internvl_jax.data.tokenizer import Tokenizer
from internvl_jax.models.generate import GenerationConfig, stream_generate
from internvl_jax.pretrained import load_pretrained
from internvl_jax.sharding import make_mesh

ImageSource = Image.Image | str | os.PathLike | bytes
History = list[tuple[str, str]]
STREAM_CHUNK = 8


def tile_images(images: Sequence[ImageSource], config: ModelConfig, max_tiles: int | None = None
                ) -> tuple[np.ndarray, list[int]]:
    """Tiles each image (§9) with up to `max_tiles` tiles (+ thumbnail).

    Returns uint8 tiles [N, size, size, 3] of all images in order, and the tiles per image.
    Raises ImageError (naming the file) for an image that cannot be read.
    """
    budget = config.max_dynamic_patch if max_tiles is None else max_tiles
    arrays = []
    for image in images:
        if not isinstance(image, Image.Image):
            image, _ = load_image(image)
        tiles = tile_image(image, config.min_dynamic_patch, budget, config.use_thumbnail, config.vision.image_size)
        arrays.append(tiles_to_array(tiles))
    return np.concatenate(arrays), [len(a) for a in arrays]


def _as_tiles(pixel_values_or_images: Any, config: ModelConfig, num_patches_list: Sequence[int] | None,
              max_tiles: int | None) -> tuple[np.ndarray | None, list[int]]:
    """(tiles or None, tiles per image) from any accepted image argument."""
    if pixel_values_or_images is None:
        return None, []
    if hasattr(pixel_values_or_images, "ndim"):
        tiles = np.asarray(pixel_values_or_images)
        if tiles.ndim != 4:
            raise ValueError(f"pixel values must be [N, 3, H, W] or [N, H, W, 3], got shape {tiles.shape}")
        patches = [len(tiles)] if num_patches_list is None else [int(n) for n in num_patches_list]
        if sum(patches) != len(tiles):
            raise ValueError(f"num_patches_list {patches} sums to {sum(patches)}, but there are {len(tiles)} tiles")
        return tiles, patches
    if num_patches_list is not None:
        raise ValueError("num_patches_list goes with pixel values (tiles), not with images")
    images = pixel_values_or_images
    if isinstance(images, (Image.Image, str, os.PathLike, bytes)):
        images = [images]
    return tile_images(images, config, max_tiles) if images else (None, [])


def _separator_id(template: Template, tokenizer: Tokenizer) -> int:
    token_id = tokenizer.token_to_id(template.sep_token)
    if token_id is None:
        raise ValueError(f"the tokenizer in {tokenizer.directory} has no {template.sep_token!r} token, "
                         f"which template {template.name!r} stops on")
    return token_id


def _prompt_ids(tokenizer: Tokenizer, config: ModelConfig, template: Template, history: History,
                question: str, num_patches_list: Sequence[int], system_message: str | None) -> list[int]:
    """Token ids (BOS first) of the conversation so far with an open assistant turn."""
    messages = []
    for old_question, old_answer in history:
        messages += [{"from": HUMAN, "value": old_question}, {"from": GPT, "value": old_answer}]
    messages.append({"from": HUMAN, "value": question})
    try:
        prompt = build_prompt(template, messages, system_message,
                              [config.num_image_token * n for n in num_patches_list])
    except SampleError as error:
        if error.reason is not SampleErrorReason.PLACEHOLDER_MISMATCH:
            raise
        raise ValueError(f"{error}; put one {IMAGE_PLACEHOLDER} per image in the questions (e.g. "
                         f"'Image-1: {IMAGE_PLACEHOLDER}\\nImage-2: {IMAGE_PLACEHOLDER}\\n...'), and pass the "
                         "conversation's images again on every turn") from error
    return tokenizer.encode(prompt)


def _generate_answers(model, tokenizer: Tokenizer, template: Template, prompts: list[list[int]],
                      tiles: list[np.ndarray | None], generation_config: Any, mesh,
                      streamer: Callable[[str], None] | None) -> list[str]:
    """Answers of a batch; with `streamer`, row 0's text is passed on as it is produced."""
    ids = [[] for _ in prompts]
    shown = ""
    pieces = stream_generate(model, prompts, tiles, stop_ids=[_separator_id(template, tokenizer)],
                             config=GenerationConfig.from_any(generation_config), mesh=mesh,
                             chunk=STREAM_CHUNK if streamer else None)
    for new_tokens in pieces:
        for row, new in enumerate(new_tokens):
            # Ids past the tokenizer (a model vocabulary padded beyond it, as Phi-3's 32064 over
            # 32011) have no text; they decode to nothing instead of failing the whole batch.
            ids[row].extend(token for token in new if token < tokenizer.vocab_size)
        if streamer is not None:
            shown = _stream_text(tokenizer.decode(ids[0]), shown, streamer)
    answers = [parse_response(template, tokenizer.decode(row)) for row in ids]
    if streamer is not None and len(answers[0]) > len(shown) and answers[0].startswith(shown):
        streamer(answers[0][len(shown):])  # what was held back: a character left incomplete
    return answers


def _stream_text(text: str, shown: str, streamer: Callable[[str], None]) -> str:
    """Passes on the part of `text` not shown yet; returns what has been shown.

    Leading whitespace is dropped (the answer is stripped) and a trailing U+FFFD is held back: it
    is an incomplete multi-byte character whose remaining bytes are still to come.
    """
    stable = text.lstrip().rstrip("\ufffd")
    if len(stable) > len(shown) and stable.startswith(shown):
        streamer(stable[len(shown):])
        return stable
    return shown


def chat(model, tokenizer: Tokenizer, config: ModelConfig, pixel_values_or_images: Any, question: str,
         history: History | None = None, generation_config: GenerationConfig | Mapping[str, Any] | None = None, *,
         num_patches_list: Sequence[int] | None = None, max_tiles: int | None = None,
         system_message: str | None = None, mesh=None, streamer: Callable[[str], None] | None = None
         ) -> tuple[str, History]:
    """One turn of a conversation, as the official `model.chat`.

    Args:
        pixel_values_or_images: None, tiles (with `num_patches_list`) or one or more images.
        question: may hold one `<image>` per image; on the first turn (`history` None) with
            images and none, `<image>\\n` is put in front.
        history: (question, answer) pairs returned by the previous turn; pass the same images
            again, since the first question's `<image>` is expanded anew on every turn.
        generation_config: a GenerationConfig or the official dict (`max_new_tokens`,
            `do_sample`, ...); default greedy with up to 1024 new tokens.
        system_message: overrides the template's (the 1.5 models' training message).
        mesh: generate under this device mesh.
        streamer: called with each new piece of the answer's text as it is produced.

    Returns:
        (answer, history with this turn appended).
    """
    template = get_template(config.template)
    tiles, patches = _as_tiles(pixel_values_or_images, config, num_patches_list, max_tiles)
    if history is None and patches and IMAGE_PLACEHOLDER not in question:
        question = IMAGE_PLACEHOLDER + "\n" + question
    history = list(history or [])
    prompt = _prompt_ids(tokenizer, config, template, history, question, patches, system_message)
    [answer] = _generate_answers(model, tokenizer, template, [prompt], [tiles], generation_config, mesh, streamer)
    return answer, history + [(question, answer)]


def batch_chat(model, tokenizer: Tokenizer, config: ModelConfig, pixel_values_or_images: Any,
               questions: Sequence[str], generation_config: GenerationConfig | Mapping[str, Any] | None = None, *,
               num_patches_list: Sequence[int] | None = None, image_counts: Sequence[int] | None = None,
               max_tiles: int | None = None, system_message: str | None = None, mesh=None) -> list[str]:
    """Single-turn answers to several questions in one left-padded batch (official `batch_chat`).

    Args:
        pixel_values_or_images: either tiles of all questions concatenated, with
            `num_patches_list` = tiles per image and `image_counts` = images per question (default
            one each), as the official API; or a sequence with one entry per question, each None,
            an image, a list of images, or that question's tiles; or None (text only).
        questions: one per sample; a question with images and no `<image>` gets `<image>\\n` in
            front.
    """
    template = get_template(config.template)
    prompts, row_tiles = [], []
    for question, (tiles, patches) in zip(questions, _per_question(pixel_values_or_images, len(questions), config,
                                                                    num_patches_list, image_counts, max_tiles)):
        if patches and IMAGE_PLACEHOLDER not in question:
            question = IMAGE_PLACEHOLDER + "\n" + question
        prompts.append(_prompt_ids(tokenizer, config, template, [], question, patches, system_message))
        row_tiles.append(tiles)
    return _generate_answers(model, tokenizer, template, prompts, row_tiles, generation_config, mesh, None)


def _per_question(pixel_values_or_images: Any, count: int, config: ModelConfig, num_patches_list,
                  image_counts, max_tiles) -> list[tuple[np.ndarray | None, list[int]]]:
    """(tiles, tiles per image) of each question."""
    if pixel_values_or_images is None:
        return [(None, [])] * count
    if not hasattr(pixel_values_or_images, "ndim"):
        if len(pixel_values_or_images) != count:
            raise ValueError(f"{len(pixel_values_or_images)} image entries for {count} questions")
        return [_as_tiles(entry, config, None, max_tiles) for entry in pixel_values_or_images]
    tiles, patches = _as_tiles(pixel_values_or_images, config, num_patches_list, None)
    counts = [1] * count if image_counts is None else list(image_counts)
    if len(counts) != count or sum(counts) != len(patches):
        raise ValueError(f"image_counts {counts} must give {count} questions the {len(patches)} images "
                         "of num_patches_list")
    rows, image, tile = [], 0, 0
    for n_images in counts:
        row_patches = patches[image:image + n_images]
        row_tiles = tiles[tile:tile + sum(row_patches)] if row_patches else None
        rows.append((row_tiles, row_patches))
        image, tile = image + n_images, tile + sum(row_patches)
    return rows


# --------------------------------------------------------------------------------------------
# Command line.


def run_repl(model, tokenizer: Tokenizer, config: ModelConfig, tiles: np.ndarray | None,
             num_patches_list: Sequence[int], generation_config: GenerationConfig, lines: Iterable[str],
             output: TextIO, *, system_message: str | None = None, mesh=None, prompt: str = "") -> None:
    """Multi-turn chat over `lines` (one question each), streaming answers to `output`.

    `/reset` starts a new conversation, `/exit` (or the end of input) ends it.
    """
    def write(text: str) -> None:
        output.write(text)
        output.flush()

    history = None
    write(prompt)
    for line in lines:
        question = line.strip()
        if question in ("/exit", "/quit"):
            break
        if question == "/reset":
            history = None
            write("[new conversation]\n" + prompt)
            continue
        if question:
            write("Assistant: ")
            _, history = chat(model, tokenizer, config, tiles, question, history, generation_config,
                              num_patches_list=num_patches_list or None, system_message=system_message,
                              mesh=mesh, streamer=write)
            write("\n")
        write(prompt)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m internvl_jax.chat",
        description="Chat with an InternVL checkpoint about images. Type a question per line; /reset starts "
                    "over, /exit (or end of input) quits.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (weights, config, tokenizer)")
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="an image to talk about (repeatable; refer to several with Image-1: <image> ...)")
    parser.add_argument("--max-tiles", type=int, default=None,
                        help="tiles per image (default: the config's max_dynamic_patch)")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=50, help="0 = no top-k cut")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--system-message", default=None, help="override the template's system message")
    parser.add_argument("--mesh", default=None, metavar="DATA,FSDP,TENSOR",
                        help="shard over a device mesh, e.g. 1,-1,1 (default: one device)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        generation_config = GenerationConfig(
            max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
            top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:  # read the images before the (slow) checkpoint load, so a bad path fails at once
        images = [load_image(path)[0] for path in args.image]
    except ImageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    mesh = None
    if args.mesh:
        mesh = make_mesh(MeshConfig(*[int(size) for size in args.mesh.split(",")]))
    model, tokenizer, config = load_pretrained(args.checkpoint, mesh=mesh)
    if tokenizer is None:
        print(f"error: no tokenizer files in {args.checkpoint}", file=sys.stderr)
        return 2
    tiles, patches = tile_images(images, config, args.max_tiles) if images else (None, [])
    print(f"{args.checkpoint}: {len(args.image)} image(s), tiles per image {patches}", file=sys.stderr)
    run_repl(model, tokenizer, config, tiles, patches, generation_config, sys.stdin, sys.stdout,
             system_message=args.system_message, mesh=mesh, prompt="User: " if sys.stdin.isatty() else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
