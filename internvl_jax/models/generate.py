"""Batched KV-cache generation: greedy or sampled, left-padded prompts, bucketed static shapes.

A batch of prompts (token ids, each with its own image tiles) is packed on the host into one
left-padded batch: padded slots get segment id 0 (the cache never attends to them) and the real
tokens of every row take positions 0..L-1, so a row decodes exactly as it would alone. Left
padding puts every row's last prompt token in the last slot, where the first new token is read.

Two jitted programs do the work and nothing syncs with the host per token:

* `prefill`: ViT on the tiles, the prompt into a fresh cache, the first new token.
* `decode`: one `lax.while_loop` over the remaining steps (the decode state, cache included, is
  donated), stopping when every row has produced a stop id or at a step limit. Streaming calls it
  again with a later limit; the limit is a traced value, so that compiles nothing new. Its layers
  run unrolled whatever `scan_layers` says, each updating its own cache array in place.

Shapes are bucketed so a long evaluation compiles few programs; every bucket is the smallest
power of two that fits, with a floor:

    batch       B = bucket(rows)                         (floor 1)
    prompt      T = bucket(longest prompt)               (floor MIN_PROMPT_BUCKET = 16)
    tiles       N = bucket(tiles of the batch)           (floor 1; 0 = text only)
    new tokens  M = bucket(max_new_tokens)               (floor MIN_NEW_BUCKET = 16)

`prefill` compiles once per (B, T, N, M) and `decode` once per (B, T + M). Decoding settings
(greedy or sampling, temperature, top-p, top-k, seed, min/max new tokens, stop ids) are traced
values and never recompile. With InternVL's 256 tokens per tile and questions under ~250 tokens,
a one-image prompt with n tiles falls in (T, N) = (512, 1), (1024, 2), (1024, 4), (2048, 4),
(2048, 8), (4096, 8), (4096, 16), (8192, 16) or (8192, 32) for n = 1, 2, 3, 4, 5–7, 8, 9–15,
16, 17–31. So an evaluation with a fixed max_new_tokens compiles, per batch bucket it uses, at
most 8 programs with the 6-tile budget (5 prefill + 3 decode, n ≤ 7), 11 with 12 tiles and 14
with up to 31 tiles; a run with one batch size uses two batch buckets at most (full batches and
the last one). `compiled_programs()` reports the running total.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from internvl_jax.models.internvl import InternVLChatModel
from internvl_jax.models.llm import KVCache
from internvl_jax.sharding import constrain, logical_to_spec

MIN_PROMPT_BUCKET = 16
MIN_NEW_BUCKET = 16
# Stop ids travel as a fixed-size array (padded with NO_TOKEN) so their number never recompiles.
MAX_STOP_IDS = 8
NO_TOKEN = -1
KV_AXES = ("act_batch", "act_kv_heads", "act_length", None)  # one layer's keys or values


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings; the defaults of `do_sample`, `top_k`, `top_p`, `temperature` are HF's.

    With `do_sample` the logits are divided by `temperature`, cut to the `top_k` best (0 = off),
    then to the smallest set whose probability reaches `top_p`, and sampled with `seed`.
    `min_new_tokens` forbids stop ids for that many steps (the official VQA scripts use 1).
    """
    max_new_tokens: int = 1024
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @classmethod
    def from_any(cls, value: "GenerationConfig | Mapping[str, Any] | None") -> "GenerationConfig":
        """Accepts a config, None (defaults) or the official dict form (`num_beams` must be 1)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        options = dict(value)
        num_beams = options.pop("num_beams", 1)
        if num_beams != 1:
            raise ValueError(f"beam search is not supported (num_beams={num_beams}); the official "
                             "evaluation forces num_beams=1 with dynamic tiling")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown generation options {unknown}; known: {sorted(known)}")
        return cls(**options)


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return 1 << (max(n, minimum) - 1).bit_length()


class PromptBatch(NamedTuple):
    """One left-padded, bucketed batch (host or device arrays).

    input_ids, segment_ids, positions [B, T] int32; pixel_values [N, ...] (uint8 NHWC or float
    NCHW, padded tiles zero) and image_flags [N] int32, both None for text only.
    """
    input_ids: Any
    segment_ids: Any
    positions: Any
    pixel_values: Any
    image_flags: Any


class Knobs(NamedTuple):
    """Traced decoding settings: scalars, and stop ids [MAX_STOP_IDS] padded with NO_TOKEN."""
    do_sample: Any
    temperature: Any
    top_p: Any
    top_k: Any
    min_new_tokens: Any
    stop_ids: Any
    seed: Any


class DecodeState(NamedTuple):
    """Loop state. tokens [B, M] (NO_TOKEN after a row stops); last, position, done [B]."""
    cache: KVCache
    tokens: jax.Array
    last: jax.Array
    position: jax.Array
    done: jax.Array
    step: jax.Array
    key: jax.Array


# --------------------------------------------------------------------------------------------
# Host side: packing.


def pack_prompts(prompts: Sequence[Sequence[int]], tiles: Sequence[np.ndarray | None] | None,
                 num_image_token: int, img_context_token_id: int, pad_id: int = 0) -> PromptBatch:
    """Left-pads prompts (and concatenates their tiles in row order) into bucketed numpy arrays.

    Args:
        prompts: token ids per row.
        tiles: per row None or its tiles [n, ...]; the row must hold n × num_image_token
            IMG_CONTEXT ids (checked here, so a mismatch names the row instead of silently
            mis-assigning features).
        pad_id: id put on padded slots (never attended to; must not be the IMG_CONTEXT id).
    """
    if not prompts:
        raise ValueError("no prompts to generate from")
    tiles = list(tiles) if tiles is not None else [None] * len(prompts)
    if len(tiles) != len(prompts):
        raise ValueError(f"{len(tiles)} tile entries for {len(prompts)} prompts")
    if pad_id == img_context_token_id:
        raise ValueError(f"pad id {pad_id} is the IMG_CONTEXT id")
    rows, length = bucket(len(prompts)), bucket(max(len(p) for p in prompts), MIN_PROMPT_BUCKET)
    input_ids = np.full((rows, length), pad_id, np.int32)
    segment_ids = np.zeros((rows, length), np.int32)
    positions = np.zeros((rows, length), np.int32)
    for row, (prompt, row_tiles) in enumerate(zip(prompts, tiles)):
        ids = np.asarray(prompt, np.int32).reshape(-1)
        if ids.size == 0:
            raise ValueError(f"prompt {row} is empty")
        expected = 0 if row_tiles is None else len(row_tiles) * num_image_token
        found = int(np.sum(ids == img_context_token_id))
        if found != expected:
            raise ValueError(f"prompt {row} has {found} IMG_CONTEXT tokens but its "
                             f"{0 if row_tiles is None else len(row_tiles)} tiles need {expected}")
        input_ids[row, length - ids.size:] = ids
        segment_ids[row, length - ids.size:] = 1
        positions[row, length - ids.size:] = np.arange(ids.size)
    pixel_values, image_flags = _pack_tiles([t for t in tiles if t is not None])
    return PromptBatch(input_ids, segment_ids, positions, pixel_values, image_flags)


def _pack_tiles(tiles: list[np.ndarray]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Concatenates tiles, pads them to a bucket with zero tiles flagged 0."""
    if not tiles:
        return None, None
    try:
        stacked = np.concatenate([np.asarray(t) for t in tiles])
    except ValueError as error:
        raise ValueError("all rows' tiles must share one layout (uint8 [n, H, W, 3] or float [n, 3, H, W]) "
                         f"and size: {error}") from error
    count = len(stacked)
    padded = np.zeros((bucket(count),) + stacked.shape[1:], stacked.dtype)
    padded[:count] = stacked
    flags = (np.arange(len(padded)) < count).astype(np.int32)
    return padded, flags


def make_knobs(config: GenerationConfig, stop_ids: Sequence[int]) -> Knobs:
    """The traced form of `config` and the stop ids (numpy values of fixed dtypes and shapes)."""
    if len(stop_ids) > MAX_STOP_IDS:
        raise ValueError(f"at most {MAX_STOP_IDS} stop ids, got {len(stop_ids)}")
    stops = np.full(MAX_STOP_IDS, NO_TOKEN, np.int32)
    stops[:len(stop_ids)] = stop_ids
    return Knobs(np.bool_(config.do_sample), np.float32(config.temperature), np.float32(config.top_p),
                 np.int32(config.top_k), np.int32(config.min_new_tokens), stops, np.uint32(config.seed % 2**32))


# --------------------------------------------------------------------------------------------
# Device side: token selection.


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Keeps the top_k largest (0 = all), then the smallest set reaching probability top_p.

    logits [B, V] float32 (already divided by the temperature); dropped entries become -inf.
    Entries tied with the last kept value are kept too.
    """
    vocab = logits.shape[-1]
    descending = -jnp.sort(-logits, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    in_top_k = jnp.arange(vocab) < k
    top = jnp.where(in_top_k, descending, -jnp.inf)
    probs = jax.nn.softmax(top, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # top_p = 1 keeps all of the top k, whatever the rounding of the cumulative sum.
    keep = in_top_k & ((mass_before < top_p) | (top_p >= 1.0))
    kept = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(descending, kept - 1, axis=-1)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def select_tokens(logits: jax.Array, knobs: Knobs, step: jax.Array, key: jax.Array) -> jax.Array:
    """Next token [B] from float32 logits [B, V] at generation step `step` (0-based).

    Greedy or sampling is a runtime branch (`lax.cond` runs one side), so one program serves both
    and greedy decoding never pays for the vocabulary sort.
    """
    vocab_ids = jnp.arange(logits.shape[-1])
    is_stop = jnp.any(vocab_ids[:, None] == knobs.stop_ids[None, :], axis=-1)
    logits = jnp.where(is_stop & (step < knobs.min_new_tokens), -jnp.inf, logits)

    def sample(logits):
        filtered = filter_logits(logits / knobs.temperature, knobs.top_k, knobs.top_p)
        return jax.random.categorical(jax.random.fold_in(key, step), filtered, axis=-1).astype(jnp.int32)

    def greedy(logits):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return jax.lax.cond(knobs.do_sample, sample, greedy, logits)


def _is_stop(tokens: jax.Array, stop_ids: jax.Array) -> jax.Array:
    return jnp.any(tokens[:, None] == stop_ids[None, :], axis=-1)


def _constrain_cache(cache: KVCache) -> KVCache:
    """Cache sharded like the activations: batch over data/fsdp, kv heads over tensor."""
    return cache._replace(k=tuple(constrain(k, KV_AXES) for k in cache.k),
                          v=tuple(constrain(v, KV_AXES) for v in cache.v),
                          segment_ids=constrain(cache.segment_ids, ("act_batch", "act_length")))


# --------------------------------------------------------------------------------------------
# Device side: the two programs.


def _prefill(graphdef: nnx.GraphDef, params: nnx.State, batch: PromptBatch, knobs: Knobs, *,
             new_bucket: int) -> DecodeState:
    model = nnx.merge(graphdef, params)
    rows, length = batch.input_ids.shape
    cache = _constrain_cache(model.init_cache(rows, length + new_bucket))
    embeds = model.embed_inputs(batch.input_ids, batch.pixel_values, batch.image_flags)
    hidden, cache = model.language_model(embeds, batch.positions, batch.segment_ids, cache=cache)
    # Only the last slot's logits are needed: [B, V] instead of the prompt's [B, T, V].
    logits = model.language_model.logits(hidden[:, -1])
    key = jax.random.key(knobs.seed)
    step = jnp.zeros((), jnp.int32)
    token = select_tokens(logits, knobs, step, key)
    # Rows added to fill the batch bucket have no real token and start finished.
    filler = batch.segment_ids[:, -1] == 0
    done = filler | _is_stop(token, knobs.stop_ids)
    tokens = jnp.full((rows, new_bucket), NO_TOKEN, jnp.int32).at[:, 0].set(jnp.where(filler, NO_TOKEN, token))
    position = jnp.max(batch.positions, axis=-1) + 1
    return DecodeState(_constrain_cache(cache), tokens, token, position, done, step + 1, key)


def _decode(graphdef: nnx.GraphDef, params: nnx.State, state: DecodeState, knobs: Knobs,
            limit: jax.Array) -> DecodeState:
    model = nnx.merge(graphdef, params)
    # The layers run unrolled so that each layer's cache is updated in place (a scan would stack
    # and copy the cache every token). XLA:CPU also copies the slice of a stacked weight that
    # feeds a matmul: in a memory-bound decode step, every weight read twice and written once per
    # token. So on CPU the layers are sliced once per call, outside the token loop, at the price
    # of one copy of the layer weights in host memory; elsewhere they are sliced in the loop, not
    # to double the weights' device memory.
    hoisted = model.language_model.layer_blocks() if jax.default_backend() == "cpu" else None

    def keep_going(s: DecodeState) -> jax.Array:
        return (s.step < limit) & ~jnp.all(s.done)

    def one_step(s: DecodeState) -> DecodeState:
        # A finished row keeps feeding a valid id so its (discarded) activations stay finite.
        feed = jnp.where(s.done, 0, s.last)[:, None]
        blocks = model.language_model.layer_blocks() if hoisted is None else hoisted
        logits, cache = model.forward_cached(feed, s.cache, segment_ids=jnp.ones_like(feed),
                                             positions=s.position[:, None], blocks=blocks)
        token = select_tokens(logits[:, 0], knobs, s.step, s.key)
        token = jnp.where(s.done, NO_TOKEN, token)
        tokens = jax.lax.dynamic_update_slice(s.tokens, token[:, None], (0, s.step))
        done = s.done | _is_stop(token, knobs.stop_ids)
        return DecodeState(_constrain_cache(cache), tokens, token, s.position + 1, done, s.step + 1, s.key)

    return jax.lax.while_loop(keep_going, one_step, state)


_prefill_jit = jax.jit(_prefill, static_argnames=("graphdef", "new_bucket"))
_decode_jit = jax.jit(_decode, static_argnames=("graphdef",), donate_argnames=("state",))


def compiled_programs() -> int:
    """Programs compiled so far by this module (in this process)."""
    return _prefill_jit._cache_size() + _decode_jit._cache_size()


@contextlib.contextmanager
def count_compilations() -> Iterator[list[str]]:
    """Within the block, collects the name of every function jax traces to compile (any module,
    eager operations included), e.g. to check that a warmed-up loop compiles nothing."""
    traced = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/jaxpr_trace_duration":
            traced.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield traced
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


# --------------------------------------------------------------------------------------------
# Public API.


def stream_generate(model: InternVLChatModel, prompts: Sequence[Sequence[int]],
                    tiles: Sequence[np.ndarray | None] | None = None, *, stop_ids: Sequence[int] = (),
                    config: GenerationConfig | Mapping[str, Any] | None = None, mesh: Mesh | None = None,
                    chunk: int | None = None, pad_id: int = 0) -> Iterator[list[list[int]]]:
    """Generates for a batch of prompts, yielding each row's new tokens as they are produced.

    Args:
        model: the chat model (weights may be sharded over `mesh`).
        prompts: token ids per row (BOS included), any lengths.
        tiles: per row None or its tiles, uint8 [n, H, W, 3] or normalised float [n, 3, H, W];
            row i's IMG_CONTEXT positions take row i's tiles.
        stop_ids: a row stops after producing one of these (at most MAX_STOP_IDS).
        mesh: run under this mesh (inputs placed batch-sharded); None = as the weights are.
        chunk: decode steps per yield; None = one yield after prefill, one at the end.

    Yields:
        per row, the tokens produced since the previous yield (stop id excluded); a row that has
        stopped yields empty lists from then on.
    """
    config = GenerationConfig.from_any(config)
    knobs = make_knobs(config, stop_ids)
    batch = pack_prompts(prompts, tiles, model.config.num_image_token, model.config.img_context_token_id, pad_id)
    graphdef, params = nnx.split(model)
    stops = set(stop_ids)
    emitted = [0] * len(prompts)
    new_bucket = bucket(config.max_new_tokens, MIN_NEW_BUCKET)
    # The mesh is entered per call, not across the yields, so the caller's code never runs in it.
    with _mesh_context(mesh):
        state = _prefill_jit(graphdef, params, _place(batch, mesh), knobs, new_bucket=new_bucket)
    while True:
        tokens, step, done = jax.device_get((state.tokens, state.step, state.done))
        yield [_new_tokens(tokens[row, :step], stops, emitted, row) for row in range(len(prompts))]
        if step >= config.max_new_tokens or done[:len(prompts)].all():
            return
        limit = config.max_new_tokens if chunk is None else min(step + chunk, config.max_new_tokens)
        with _mesh_context(mesh):
            state = _decode_jit(graphdef, params, state, knobs, np.int32(limit))


def generate(model: InternVLChatModel, prompts: Sequence[Sequence[int]],
             tiles: Sequence[np.ndarray | None] | None = None, *, stop_ids: Sequence[int] = (),
             config: GenerationConfig | Mapping[str, Any] | None = None, mesh: Mesh | None = None,
             pad_id: int = 0) -> list[list[int]]:
    """The new tokens of every row (stop id excluded); arguments as for `stream_generate`."""
    outputs = [[] for _ in prompts]
    for pieces in stream_generate(model, prompts, tiles, stop_ids=stop_ids, config=config, mesh=mesh,
                                  pad_id=pad_id):
        for row, piece in enumerate(pieces):
            outputs[row].extend(piece)
    return outputs


def _new_tokens(row_tokens: np.ndarray, stops: set[int], emitted: list[int], row: int) -> list[int]:
    """Tokens of `row_tokens` not yet emitted, up to the first stop id or NO_TOKEN."""
    end = len(row_tokens)
    for index, token in enumerate(row_tokens.tolist()):
        if token == NO_TOKEN or token in stops:
            end = index
            break
    start, emitted[row] = emitted[row], max(emitted[row], end)
    return row_tokens[start:end].tolist()


def _mesh_context(mesh: Mesh | None):
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def _place(batch: PromptBatch, mesh: Mesh | None) -> PromptBatch:
    """Under a mesh, rows and tiles are split over the batch axes (where they divide)."""
    if mesh is None:
        return batch

    def put(array, axes):
        if array is None:
            return None
        spec = logical_to_spec(axes + (None,) * (array.ndim - len(axes)), array.shape, mesh)
        return jax.device_put(array, NamedSharding(mesh, spec))

    return PromptBatch(put(batch.input_ids, ("act_batch",)), put(batch.segment_ids, ("act_batch",)),
                       put(batch.positions, ("act_batch",)), put(batch.pixel_values, ("act_tiles",)),
                       put(batch.image_flags, ("act_tiles",)))
