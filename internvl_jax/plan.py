"""Ahead-of-time memory plan of a recipe on a TPU topology, compiled here without a TPU.

    python -m internvl_jax.plan --config mini_internvl_chat_2b_v1_5_pretrain --topology v5e:1x1 \\
        train.global_batch_size=16 train.grad_accum_steps=16 [--mode serve] [--json plan.json]

libtpu's XLA:TPU compiler (toolchain.md §10) compiles the real programs for the target: in
`--mode train` the jitted train step of `internvl_jax.train.step` on the batch the train loop
feeds it ([GA, rows, T] tokens and rows × tiles-per-row tiles per micro-batch, global shapes,
state donated); in `--mode serve` the prefill and decode programs of
`internvl_jax.models.generate` for one bucketed request shape. Per device (one per chip; a v4
chip shows two) it reports

    params, optimizer   the abstract sharded state: shard shape × itemsize of every variable
                        (optimizer = moments, counters and the RNG key)
    batch, kv_cache     the inputs and, serving, the decode state, likewise
    temps, code         `compiled.memory_analysis()`
    total               arguments + outputs not aliased to donated arguments + temps + code
                        (the donated state counts once: its outputs reuse its buffers). An upper
                        bound: these temps are the heap before the backend's final placement
    total (XLA:TPU)     what the compiler finally allocates (reserved + program + arguments), from
                        libtpu's log of this process; on the 26B step 76 GiB where the above says 96

against the HBM the compiler lets one device use. The verdict is the compiler's: XLA:TPU refuses
(RESOURCE_EXHAUSTED) a program whose arguments, outputs and temporaries exceed that HBM, so a
program it compiles fits. When it does not, the plan lists the settings to change. Serving
reports the larger of its two programs.

Compile-only executables cannot go through JAX's persistent cache (there is no client to
deserialize them into), so compile results are cached as JSON in
`<jax_compilation_cache_dir>/plans`, keyed by the lowered programs' text (StableHLO with its
shardings), the topology, the compiler's versions and the XLA/libtpu flags.
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import pathlib
import re
import sys
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

from internvl_jax.config import Config, ConfigError, LoraConfig, load_config
from internvl_jax.sharding import MESH_AXES, logical_to_spec, make_mesh, sharded_abstract_state, variable_sharding

GIB = 2 ** 30
# HBM the XLA:TPU compiler of libtpu 0.0.42.1 lets one device use, read from its out-of-memory
# message for an oversized program ("exceeds available HBM (15.75G)"). Published per chip:
# v5e 16 GB, v6e 32 GB, v5p 95 GB, v4 32 GiB (two devices per v4 chip).
USABLE_HBM_GIB = {"TPU v5 lite": 15.75, "TPU v6 lite": 31.25, "TPU v5": 95.74, "TPU v4": 15.25}
VERSIONED = ("jax", "jaxlib", "libtpu", "flax", "optax")
# libtpu's log (glog) holds INFO lines back until a later line comes; this writes them at once.
UNBUFFERED_LOG = "--logbuflevel=-1"
# The train step's schedule length does not change the program.
PLANNING_STEPS = 1000
# A Pallas kernel (splash attention) is serialized into its custom call with its source file's
# absolute path as a location; `_portable_text` keeps locations out of the cache key, so that
# another checkout or venv finds the recorded plans.
KERNEL_BODY = re.compile(r"(\\22body\\22: \\22)([A-Za-z0-9+/=]+)")


class PlanError(ValueError):
    """The topology, shapes or mesh cannot be planned; the message names the setting."""


# --------------------------------------------------------------------------------------------
# Target.


@dataclasses.dataclass(frozen=True)
class Target:
    """A TPU topology's compile-only devices and the HBM (bytes) each may use."""
    name: str
    devices: list
    hbm_bytes: int

    @property
    def device_kind(self) -> str:
        return self.devices[0].device_kind

    @property
    def hosts(self) -> int:
        return len({d.process_index for d in self.devices})


def tpu_target(name: str, hbm_gib: float | None = None) -> Target:
    """libtpu's description of topology `name` (v5e:1x1, v5e:2x2, v5p:2x2x2, ...); no TPU needed."""
    from jax.experimental import topologies
    if UNBUFFERED_LOG not in os.environ.get("LIBTPU_INIT_ARGS", ""):
        # Only read when libtpu starts: its log then holds each compile's accounting on return.
        os.environ["LIBTPU_INIT_ARGS"] = f"{os.environ.get('LIBTPU_INIT_ARGS', '')} {UNBUFFERED_LOG}".strip()
    try:
        try:
            devices = topologies.get_topology_desc(platform="tpu", topology_name=name).devices
        except jax.errors.JaxRuntimeError as error:
            if "chips_per_host_bounds" not in str(error):
                raise
            # A slice smaller than one host (v5e:1x1) is its own host.
            dims = [int(d) for d in name.split(":")[-1].split("x")]
            devices = topologies.get_topology_desc(platform="tpu", topology_name=name,
                                                   chips_per_host_bounds=(dims + [1, 1])[:3]).devices
    except (jax.errors.JaxRuntimeError, RuntimeError, ValueError) as error:
        raise PlanError(f"--topology {name!r}: libtpu cannot describe it ({_first_line(error)}); "
                        "names look like v5e:1x1, v5e:2x2, v6e:4x4, v5p:2x2x2, v4:2x2x1") from error
    kind = devices[0].device_kind
    if hbm_gib is None and kind not in USABLE_HBM_GIB:
        raise PlanError(f"--topology {name!r}: no HBM size known for {kind!r}; pass --hbm-gib")
    return Target(name, list(devices), int((hbm_gib or USABLE_HBM_GIB[kind]) * GIB))


def for_tpu(config: Config) -> Config:
    """The config as it runs on TPU: `attention=auto` resolves to the splash kernels there."""
    if config.model.attention != "auto":
        return config
    return dataclasses.replace(config, model=dataclasses.replace(config.model, attention="splash"))


def target_mesh(config: Config, target: Target) -> Mesh:
    try:
        return make_mesh(config.mesh, devices=target.devices)
    except ValueError as error:
        raise PlanError(f"mesh.data/mesh.fsdp/mesh.tensor on {target.name}: {error}") from error


# --------------------------------------------------------------------------------------------
# Bytes per device.


def device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs carrying NamedShardings."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def state_bytes(state: nnx.State, sizes: dict[str, int]) -> int:
    """Bytes per device of an abstract state on a (data, fsdp, tensor) mesh of `sizes`; no devices needed."""
    mesh = AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES)
    is_variable = lambda x: isinstance(x, nnx.Variable)

    def one(variable: nnx.Variable) -> int:
        value = variable.get_value()
        return math.prod(variable_sharding(variable, mesh).shard_shape(value.shape)) * np.dtype(value.dtype).itemsize

    return sum(one(v) for v in jax.tree.leaves(state, is_leaf=is_variable) if is_variable(v))


def program_memory(compiled: jax.stages.Compiled, compiler_total: int | None) -> dict[str, int | None]:
    """Per-device bytes of one compiled program; `total` is what `memory_analysis()` says it keeps
    resident, `compiler_total` what XLA:TPU itself allocated (None when its log is not readable)."""
    m = compiled.memory_analysis()
    record = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
              "aliased": m.alias_size_in_bytes, "temps": m.temp_size_in_bytes,
              "code": m.generated_code_size_in_bytes}
    record["total"] = record["arguments"] + record["outputs"] - record["aliased"] + record["temps"] + record["code"]
    record["compiler_total"] = compiler_total
    return record


def compile_program(compile_: Callable[[], jax.stages.Compiled]
                    ) -> tuple[jax.stages.Compiled | None, dict | None, str | None]:
    """(compiled, memory record, None), or (None, None, the compiler's message) when it ran out of HBM."""
    log = _compiler_log()
    offset = log.stat().st_size if log else 0
    try:
        compiled = compile_()
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        return None, None, _first_line(error)
    return compiled, program_memory(compiled, _logged_total(log, offset) if log else None), None


def _logged_total(log: pathlib.Path, offset: int) -> int | None:
    """The compiler's "Total hbm usage >= X" written to `log` after `offset`."""
    totals = re.findall(r"Total hbm usage >= ([\d.]+)([KMGT]?)", _read_from(log, offset))
    return _size(*totals[-1]) if totals else None


def _compiler_log() -> pathlib.Path | None:
    """This process's libtpu INFO log, where XLA:TPU writes its own HBM accounting after a compile;
    None when libtpu started without UNBUFFERED_LOG (a line read then may be an earlier compile's).

    `memory_analysis()` temps count the heap before the backend's final placement (on the 26B
    step, 59 GiB against the 39 GiB the compiler finally allocates).
    """
    logs = sorted(pathlib.Path(os.environ.get("TPU_LOG_DIR", "/tmp/tpu_logs")).glob(f"*.INFO.*.{os.getpid()}"))
    if not logs or f"'{UNBUFFERED_LOG}'" not in _read_from(logs[-1], 0, 20000):
        return None
    return logs[-1]


def _read_from(path: pathlib.Path, offset: int, size: int = -1) -> str:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(size).decode(errors="replace")


def _size(number: str, unit: str) -> int:
    return int(float(number) * 1024 ** "BKMGT".index(unit or "B"))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --------------------------------------------------------------------------------------------
# The programs of each mode.


@dataclasses.dataclass
class Setup:
    """A mode's abstract inputs, its lowered programs (`lower()`, also the cache key) and
    `compile(lowered)` -> {"programs": {name: memory record}, "compiler_error": message or None}."""
    state: nnx.State  # train: the TrainState (`model`, `optimizer`, `rng`); serve: the model
    mesh: Mesh
    inputs: dict[str, int]  # per-device bytes of the inputs besides the state
    shapes: dict[str, int]  # what the plan is for
    lower: Callable[[], dict[str, jax.stages.Lowered]]
    compile: Callable[[dict[str, jax.stages.Lowered]], dict[str, Any]]
    pixel_bytes: int = 0  # train: per-device bytes of the batch's tiles


def train_setup(config: Config, mesh: Mesh, hosts: int) -> Setup:
    """The train step exactly as `train.loop.train` builds it, on the batch the loop stacks for it."""
    from internvl_jax.data.batch import batch_shapes
    from internvl_jax.sharding import state_shardings
    from internvl_jax.train.optimizer import learning_rate_schedule
    from internvl_jax.train.state import abstract_train_state
    from internvl_jax.train.step import batch_shardings, train_step

    train = config.train
    if train.grad_accum_steps < 1 or train.global_batch_size % train.grad_accum_steps:
        raise PlanError(f"train.global_batch_size {train.global_batch_size} is not a multiple of "
                        f"train.grad_accum_steps {train.grad_accum_steps}")
    rows = train.global_batch_size // train.grad_accum_steps  # global rows per micro-batch, as train/__main__
    if rows % hosts:
        raise PlanError(f"{rows} rows per micro-batch (train.global_batch_size / train.grad_accum_steps) "
                        f"do not split over the topology's {hosts} hosts")
    tiles = rows * config.data.tiles_per_row(train.max_seq_length, config.model.num_image_token)
    graphdef, state = abstract_train_state(config, PLANNING_STEPS, mesh)
    micro = batch_shapes(config, rows, tiles)
    stacked = {name: (train.grad_accum_steps,) + struct.shape for name, struct in micro.items()}
    shardings = batch_shardings(stacked, mesh)
    batch = {name: jax.ShapeDtypeStruct(stacked[name], micro[name].dtype, sharding=shardings[name]) for name in micro}
    schedule = learning_rate_schedule(train, PLANNING_STEPS)
    step = functools.partial(train_step, graphdef, train, schedule)
    state_sharding = state_shardings(state, mesh)

    def lower() -> dict[str, jax.stages.Lowered]:
        # The jit of `TrainStep.compile`: explicit shardings, replicated metrics, state donated.
        jitted = jax.jit(step, in_shardings=(state_sharding, shardings),
                         out_shardings=(state_sharding, NamedSharding(mesh, P())), donate_argnums=0)
        with jax.set_mesh(mesh):
            return {"train_step": jitted.lower(state, batch)}

    def compile_(lowered: dict[str, jax.stages.Lowered]) -> dict[str, Any]:
        _, memory, error = compile_program(lowered["train_step"].compile)
        return {"programs": {"train_step": memory} if memory else {}, "compiler_error": error}

    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    shapes = {"grad_accum_steps": train.grad_accum_steps, "rows_per_micro_batch": rows,
              "rows_per_device": -(-rows // batch_devices), "seq_len": train.max_seq_length,
              "tiles_per_micro_batch": tiles}
    return Setup(state, mesh, {"batch": device_bytes(batch)}, shapes, lower, compile_,
                 device_bytes(batch["pixel_values"]))


@dataclasses.dataclass(frozen=True)
class ServeRequest:
    """A generation request shape before bucketing (`internvl_jax.models.generate`)."""
    batch: int = 8
    tiles: int = 0  # per prompt; 0 = max_dynamic_patch (+ 1 thumbnail)
    prompt_tokens: int = 0  # 0 = tiles × tokens per tile + 128 text tokens
    new_tokens: int = 1024  # GenerationConfig's default max_new_tokens


def serve_setup(config: Config, mesh: Mesh, request: ServeRequest) -> Setup:
    """`generate`'s prefill and decode programs, weights in the compute dtype with LoRA merged (as
    `load_pretrained` serves checkpoints)."""
    from internvl_jax.models import generate
    from internvl_jax.models.llm import KVCache
    from internvl_jax.models.params import create_model

    m = config.model
    serving = dataclasses.replace(m, param_dtype=m.dtype, frozen_param_dtype=m.dtype, lora=LoraConfig())
    graphdef, params = nnx.split(nnx.eval_shape(lambda: create_model(serving)))
    params = sharded_abstract_state(params, mesh)
    per_prompt = request.tiles or m.max_dynamic_patch + int(m.use_thumbnail and m.max_dynamic_patch > 1)
    rows = generate.bucket(request.batch)
    length = generate.bucket(request.prompt_tokens or per_prompt * m.num_image_token + 128, generate.MIN_PROMPT_BUCKET)
    tiles = generate.bucket(rows * per_prompt)
    new = generate.bucket(request.new_tokens, generate.MIN_NEW_BUCKET)

    def placed(shape, dtype, axes):
        spec = logical_to_spec(axes + (None,) * (len(shape) - len(axes)), shape, mesh)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    # Split over the batch axes as `generate._place` puts the host arrays.
    size = m.vision.image_size
    tokens = [placed((rows, length), np.int32, ("act_batch",)) for _ in range(3)]
    batch = generate.PromptBatch(*tokens, placed((tiles, size, size, 3), np.uint8, ("act_tiles",)),
                                 placed((tiles,), np.int32, ("act_tiles",)))
    replicated = NamedSharding(mesh, P())
    abstract = lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=replicated)
    knobs = jax.tree.map(abstract, generate.make_knobs(generate.GenerationConfig(), ()))
    limit = abstract(np.int32(0))

    def lower() -> dict[str, jax.stages.Lowered]:
        with jax.set_mesh(mesh):
            prefill = generate._prefill_jit.lower(graphdef, params, batch, knobs, new_bucket=new)
            # Unsharded decode state: this lowering only keys the cache; `compile_` lowers decode
            # again with the shardings the compiled prefill gives its output.
            state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), prefill.out_info)
            return {"prefill": prefill, "decode": generate._decode_jit.lower(graphdef, params, state, knobs, limit)}

    def compile_(lowered: dict[str, jax.stages.Lowered]) -> dict[str, Any]:
        programs = {}
        with jax.set_mesh(mesh):
            prefill, programs["prefill"], error = compile_program(lowered["prefill"].compile)
            if prefill is not None:
                _, programs["decode"], error = compile_program(
                    lambda: generate._decode_jit.lower(graphdef, params, prefill.out_info, knobs, limit).compile())
        return {"programs": {k: v for k, v in programs.items() if v}, "compiler_error": error}

    cache = jax.eval_shape(lambda: KVCache.empty(m.llm, rows, length + new, np.dtype(m.dtype)))
    # Keys and values sharded as `generate._constrain_cache` constrains them.
    layers = [placed(x.shape, x.dtype, generate.KV_AXES) for x in jax.tree.leaves((cache.k, cache.v))]
    inputs = {"batch": device_bytes(batch), "kv_cache": device_bytes(layers)}
    shapes = {"batch": rows, "prompt_tokens": length, "tiles": tiles, "new_tokens": new}
    return Setup(params, mesh, inputs, shapes, lower, compile_)


# --------------------------------------------------------------------------------------------
# The plan.


def plan(config: Config, topology: str, mode: str = "train", request: ServeRequest = ServeRequest(),
         hbm_gib: float | None = None, cache_dir: str | pathlib.Path | None = None,
         use_cache: bool = True) -> dict[str, Any]:
    """Compiles `config`'s programs for `topology`; returns the plan (what `--json` writes)."""
    if mode not in ("train", "serve"):
        raise PlanError(f"--mode {mode!r}: one of train, serve")
    config = for_tpu(config)
    target = tpu_target(topology, hbm_gib)
    mesh = target_mesh(config, target)
    setup = train_setup(config, mesh, target.hosts) if mode == "train" else serve_setup(config, mesh, request)
    lowered = setup.lower()
    cache = _cache_path(cache_dir, _cache_key(lowered, target)) if use_cache else None
    compiled = _compile_cached(setup, lowered, cache)
    sizes = dict(mesh.shape)
    weights = setup.state["model"] if mode == "train" else setup.state
    per_device = {"params": state_bytes(weights, sizes)}
    per_device["optimizer"] = state_bytes(setup.state, sizes) - per_device["params"]
    per_device.update(setup.inputs)
    programs, error = compiled["programs"], compiled["compiler_error"]
    if programs:
        largest = max(programs.values(), key=_resident)
        per_device.update(temps=largest["temps"], code=largest["code"], total=largest["total"],
                          compiler_total=largest["compiler_total"])
    if error:
        per_device["compiler_total"] = _oom_total(error)
    # XLA:TPU refuses a program whose arguments, outputs and temporaries exceed the HBM.
    fits = error is None and len(programs) == (1 if mode == "train" else 2)
    result = {
        "config": config.name, "mode": mode, "topology": topology, "device_kind": target.device_kind,
        "devices": len(target.devices), "hosts": target.hosts, "mesh": sizes, "shapes": setup.shapes,
        "per_device_bytes": per_device, "programs": programs, "hbm_bytes": target.hbm_bytes, "fits": fits,
        "compiler_error": compiled["compiler_error"], "compile_seconds": compiled["compile_seconds"],
        "compile_cpu_seconds": compiled.get("compile_cpu_seconds"), "cached": compiled["cached"],
    }
    result["suggestions"] = [] if fits else suggestions(config, mode, setup, result)
    return result


def _compile_cached(setup: Setup, lowered: dict[str, jax.stages.Lowered], cache: pathlib.Path | None) -> dict:
    """{"programs", "compiler_error", "compile_seconds", "compile_cpu_seconds", "cached"}: from the
    plan cache, else compiled (and stored)."""
    if cache is not None and cache.is_file():
        return dict(json.loads(cache.read_text()), cached=True)
    start, cpu = time.perf_counter(), time.process_time()
    compiled = setup.compile(lowered)
    # CPU seconds (all threads) too: wall time on a shared machine says little.
    compiled.update(compile_seconds=round(time.perf_counter() - start, 1),
                    compile_cpu_seconds=round(time.process_time() - cpu, 1))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(compiled))
    return dict(compiled, cached=False)


def _oom_total(message: str) -> int | None:
    """Per-device bytes an out-of-HBM message says the program needs. Its "HLO temporaries" count
    the arguments and outputs too (a 15 GiB argument with a 1 GiB output reads "(16.00G)")."""
    found = re.search(r"Used ([\d.]+)([KMGT]?)|temporaries \(([\d.]+)([KMGT]?)\)", message)
    return _size(*(g for g in found.groups() if g is not None)) if found else None


def _resident(program: dict) -> int:
    """The compiler's own total when known, else memory_analysis's (an upper bound)."""
    return program["compiler_total"] or program["total"]


def _cache_key(lowered: dict[str, jax.stages.Lowered], target: Target) -> str:
    """The programs (StableHLO with shardings and donations), the target, compiler versions and flags."""
    key = hashlib.sha256()
    for name, program in sorted(lowered.items()):
        key.update(name.encode() + _portable_text(program.as_text()).encode())
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    # The fake CPU device count of the test suite does not change a TPU program.
    xla_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    libtpu_flags = [f for f in os.environ.get("LIBTPU_INIT_ARGS", "").split() if f != UNBUFFERED_LOG]
    context = {"topology": target.name, "devices": len(target.devices), "device_kind": target.device_kind,
               "versions": versions, "XLA_FLAGS": xla_flags, "LIBTPU_INIT_ARGS": libtpu_flags}
    key.update(json.dumps(context, sort_keys=True).encode())
    return key.hexdigest()


def _portable_text(text: str) -> str:
    """`text` with each serialized kernel body replaced by its module's text without locations."""
    # jax's private MLIR bindings: the ones `jax._src.tpu_custom_call` serializes the body with.
    from jax._src.interpreters import mlir
    from jax._src.lib import tpu
    from jax._src.lib.mlir import ir
    with mlir.make_ir_context() as context:
        tpu.register_dialect(context)
        context.allow_unregistered_dialects = True  # the `stable_mosaic` version marker
        return KERNEL_BODY.sub(lambda match: match.group(1) + ir.Module.parse(base64.b64decode(match.group(2)))
                               .operation.get_asm(enable_debug_info=False), text)


def _cache_path(cache_dir: str | pathlib.Path | None, key: str) -> pathlib.Path | None:
    """`cache_dir`, else `plans/` in JAX's persistent compilation cache directory, else no cache."""
    if cache_dir is None:
        jax_cache = jax.config.jax_compilation_cache_dir
        if not jax_cache:
            return None
        cache_dir = pathlib.Path(jax_cache) / "plans"
    return pathlib.Path(cache_dir) / f"{key}.json"


# --------------------------------------------------------------------------------------------
# What to change when it does not fit.


def suggestions(config: Config, mode: str, setup: Setup, result: dict) -> list[dict[str, Any]]:
    """Settings that lower the per-device total: overrides, effect, and `total_estimate` (bytes)
    where the change is computed: weights, optimizer state and inputs exactly, gradients (two
    float32 copies of the trained weights, the accumulator and one micro-batch's: the size of the
    AdamW moments) with them; the other temporaries are held at their compiled value (activations
    follow rows, tokens and tiles per device)."""
    per_device, sizes, limit = result["per_device_bytes"], result["mesh"], result["hbm_bytes"]
    total = per_device.get("compiler_total") or per_device.get("total")
    out: list[dict[str, Any]] = []

    def add(knob: str, overrides: list[str], effect: str, saved: float | None = None) -> None:
        entry = {"knob": knob, "overrides": overrides, "effect": effect}
        if saved is not None and total is not None:
            entry["total_estimate"] = int(total - saved)
        out.append(entry)

    def reshard(knob: str, new_sizes: dict[str, int], overrides: list[str]) -> float:
        saved = _state_saving(setup.state, mode, per_device, new_sizes)
        add(knob, overrides, f"weights+optimizer+gradients shrink by {_gib(saved)} GiB per device", saved)
        return saved

    if sizes["data"] > 1:
        fsdp = sizes["data"] * sizes["fsdp"]
        reshard("FSDP over the data axis (same devices)", dict(sizes, data=1, fsdp=fsdp),
                ["mesh.data=1", f"mesh.fsdp={fsdp}"])
    for factor in (2, 4, 8, 16):
        wider = dict(sizes, fsdp=sizes["fsdp"] * factor)
        saved = reshard(f"FSDP width ×{factor} (a slice of {math.prod(wider.values())} devices)", wider,
                        [f"mesh.fsdp={wider['fsdp']}"])
        if total is None or total - saved <= limit:
            break
    (_train_suggestions if mode == "train" else _serve_suggestions)(config, setup, per_device, add)
    return out


def _state_saving(state: nnx.State, mode: str, per_device: dict, sizes: dict[str, int]) -> int:
    """Per-device bytes saved by holding `state` on a mesh of `sizes`, gradients (= optimizer size) included."""
    weights = state_bytes(state["model"] if mode == "train" else state, sizes)
    optimizer = state_bytes(state, sizes) - weights
    return per_device["params"] - weights + 2 * (per_device["optimizer"] - optimizer)


def _train_suggestions(config: Config, setup: Setup, per_device: dict, add) -> None:
    model, train, shapes = config.model, config.train, setup.shapes
    if model.remat_policy != "full":
        add("rematerialisation", ["model.remat_policy=full"],
            f"keeps only each layer's input for the backward pass (now {model.remat_policy!r})")
    if shapes["rows_per_device"] > 1:
        add("per-device micro-batch 1 + gradient accumulation",
            [f"train.grad_accum_steps={train.grad_accum_steps * shapes['rows_per_device']}"],
            f"activations ∝ rows per device (now {shapes['rows_per_device']}); same global batch")
    if train.global_batch_size > 1:
        batch = per_device["batch"]
        add("global batch", [f"train.global_batch_size={train.global_batch_size // 2}"],
            f"the step's stacked input batch {_gib(batch)} → {_gib(batch / 2)} GiB per device", batch / 2)
    tiles = config.data.tiles_per_row(train.max_seq_length, model.num_image_token)
    if tiles > 1:
        fewer, pixels = tiles // 2, setup.pixel_bytes
        add("tiles per row", [f"data.max_tiles_per_row={fewer}"],
            f"ViT activations ∝ tiles (now {tiles} per row); input pixels {_gib(pixels)} → "
            f"{_gib(pixels * fewer / tiles)} GiB", pixels * (1 - fewer / tiles))
    if train.max_seq_length > 1024:
        add("sequence length", [f"train.max_seq_length={train.max_seq_length // 2}"],
            f"LLM activations ∝ tokens per row (now {train.max_seq_length})")
    if model.lora.rank == 0 and "language_model" in train.trainable:
        from internvl_jax.train.state import abstract_train_state
        lora = dataclasses.replace(config, model=dataclasses.replace(model, lora=LoraConfig(rank=16, alpha=32.0)),
                                   train=dataclasses.replace(train, trainable=("language_model",)))
        _, state = abstract_train_state(lora, PLANNING_STEPS, setup.mesh)
        saved = _state_saving(state, "train", per_device, dict(setup.mesh.shape))
        add("LoRA (as the *_finetune_lora recipes)", ["model.lora.rank=16", "model.lora.alpha=32",
                                                       "train.trainable=language_model"],
            f"bf16 frozen base, adapters trained: weights+optimizer+gradients shrink by {_gib(saved)} GiB per device",
            saved)


def _serve_suggestions(config: Config, setup: Setup, per_device: dict, add) -> None:
    shapes, cache = setup.shapes, per_device["kv_cache"]
    if shapes["batch"] > 1:
        add("batch", [f"--batch {shapes['batch'] // 2}"],
            f"KV cache {_gib(cache)} → {_gib(cache / 2)} GiB per device; activations halve too", cache / 2)
    if shapes["new_tokens"] > 16:
        span = shapes["prompt_tokens"] + shapes["new_tokens"]
        saved = cache * shapes["new_tokens"] / 2 / span
        add("new tokens", [f"--new-tokens {shapes['new_tokens'] // 2}"],
            f"KV cache {_gib(cache)} → {_gib(cache - saved)} GiB per device", saved)
    if config.mesh.tensor == 1 and config.model.llm.num_kv_heads % 2 == 0:
        add("tensor parallelism", ["mesh.tensor=2"], "splits weights, KV cache and activations by kv heads")


def _gib(value: float) -> str:
    return f"{value / GIB:.2f}"


# --------------------------------------------------------------------------------------------
# Report and command line.


def format_plan(result: dict[str, Any]) -> str:
    """The human-readable report of a plan."""
    per_device, mesh = result["per_device_bytes"], result["mesh"]
    lines = [f"{result['config']} ({result['mode']}) on {result['topology']}: {result['devices']} × "
             f"{result['device_kind']}, {result['hosts']} host(s), mesh "
             + " ".join(f"{a}={mesh[a]}" for a in MESH_AXES),
             "shapes: " + ", ".join(f"{k}={v}" for k, v in result["shapes"].items()),
             "per device                  GiB"]
    for name in ("params", "optimizer", "batch", "kv_cache", "temps", "code"):
        if name in per_device:
            lines.append(f"  {name:<24}{per_device[name] / GIB:7.2f}")
    hbm = result["hbm_bytes"] / GIB
    if "total" in per_device:
        lines.append(f"  {'total (memory_analysis)':<24}{per_device['total'] / GIB:7.2f}  upper bound")
    if per_device.get("compiler_total"):
        lines.append(f"  {'total (XLA:TPU)':<24}{per_device['compiler_total'] / GIB:7.2f}  "
                     f"{'asked for' if result['compiler_error'] else 'allocated'} by the compiler")
    lines.append(f"  {'usable HBM':<24}{hbm:7.2f}")
    verdict = "FITS" if result["fits"] else "DOES NOT FIT"
    if result["compiler_error"]:
        verdict += f" (compiler: {result['compiler_error']})"
    lines.append(f"verdict: {verdict}")
    cpu = f", {result['compile_cpu_seconds']:.1f} s CPU" if result["compile_cpu_seconds"] is not None else ""
    lines.append(f"compile: {result['compile_seconds']:.1f} s{cpu}" + (" (cached result)" if result["cached"] else ""))
    if result["suggestions"]:
        lines.append("to make it fit (temporaries held at the compiled value in the estimates):")
        for s in result["suggestions"]:
            estimate = f"; total ≈ {s['total_estimate'] / GIB:.2f} GiB" if "total_estimate" in s else ""
            lines.append(f"  - {s['knob']}: {' '.join(s['overrides'])} — {s['effect']}{estimate}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m internvl_jax.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="recipe name in configs/ or a path to a recipe file")
    parser.add_argument("--topology", required=True, help="TPU topology, e.g. v5e:1x1, v5e:2x2, v5p:2x2x2")
    parser.add_argument("--mode", default="train", choices=("train", "serve"))
    parser.add_argument("--json", default=None, help="also write the plan as JSON to this file")
    parser.add_argument("--hbm-gib", type=float, default=None, help="usable HBM per device (default: per TPU kind)")
    parser.add_argument("--cache-dir", default=None, help="plan cache (default: <jax cache dir>/plans)")
    parser.add_argument("--no-cache", action="store_true", help="always compile")
    serve = parser.add_argument_group("--mode serve request shape")
    for field in dataclasses.fields(ServeRequest):
        serve.add_argument(f"--{field.name.replace('_', '-')}", type=int, default=field.default)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.grad_accum_steps=16")
    return parser.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Prints the plan; 0 when it fits, 1 when it does not, 2 on a bad argument."""
    args = parse_args(argv)
    request = ServeRequest(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeRequest)})
    try:
        config = load_config(args.config, args.overrides)
        result = plan(config, args.topology, args.mode, request, args.hbm_gib, args.cache_dir, not args.no_cache)
    except (ConfigError, PlanError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_plan(result))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
