"""Checking a checkpoint against a model from its headers alone, before anything is read.

Every tensor must be present with its shape and a supported dtype, none may be unexpected, and
PEFT adapters must be complete. Adapters are kept as our LoRA adapters where the model has
matching ones (rank, scale) and ours hold them exactly (`layouts.adapter_maps`); the others
are merged into their base weights while reading.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from etils import epath
from flax import nnx

from internvl_jax.config import LoraConfig, ModelConfig
from internvl_jax.convert import peft
from internvl_jax.convert.checkpoint import CheckpointError, CheckpointReader
from internvl_jax.convert.layouts import TIED_HEAD_KEY, Path, TensorMap, adapter_maps, tensor_maps


@dataclasses.dataclass
class Plan:
    """What load_state reads."""
    maps: list[TensorMap]  # base maps, then the maps of adapters kept as adapters
    merged: set[str]  # canonical weight names whose adapter is merged while reading
    consumed: set[str]  # stored tensor names the plan reads (or knowingly skips)


def plan_load(reader: CheckpointReader, names: peft.StoredNames, config: ModelConfig, layout: str,
              params: dict[Path, nnx.Variable]) -> Plan:
    """Checks every tensor's presence, shape and dtype from the headers; decides LoRA handling."""
    plan = Plan([], set(), set())
    for tensor_map in tensor_maps(config, layout):
        for part in tensor_map.parts:
            _check_param(part, tensor_map, params)
        _check_map(reader, names, tensor_map, plan)
        plan.maps.append(tensor_map)
        adapters = _check_adapters(reader, names, tensor_map)
        if not adapters:
            continue
        for pair in adapters.values():
            plan.consumed.update(pair)
        kept = _kept_adapter_maps(reader, tensor_map, adapters, config, params)
        if kept:
            for adapter_map in kept:
                _check_map(reader, names, adapter_map, plan)
            plan.maps.extend(kept)
        else:
            plan.merged.update(adapters)
    if config.llm.tie_word_embeddings and names.stored(TIED_HEAD_KEY) in reader.keys():
        plan.consumed.add(names.stored(TIED_HEAD_KEY))  # a copy of the tied embedding
    unexpected = sorted(reader.keys() - plan.consumed)
    if unexpected:
        shown = ", ".join(f"'{k}' ({reader.file_of(k).name})" for k in unexpected[:5])
        raise CheckpointError(f"{reader.directory}: {len(unexpected)} unexpected tensor(s) that the model "
                              f"({layout} layout, {config.llm.family}) has no parameter for: {shown}"
                              + (" ..." if len(unexpected) > 5 else ""))
    return plan


def _check_param(part, tensor_map: TensorMap, params: dict[Path, nnx.Variable]) -> None:
    if part.path not in params:
        raise CheckpointError(f"the model has no parameter {'.'.join(part.path)} for {', '.join(tensor_map.keys)}")
    variable = params[part.path]
    logical = tuple(getattr(variable, "unpadded_shape", None) or variable.get_value().shape)
    expected = ((tensor_map.num_layers,) if tensor_map.num_layers else ()) + part.shape
    if logical != expected:
        raise CheckpointError(f"parameter {'.'.join(part.path)} has logical shape {logical}, but "
                              f"{', '.join(tensor_map.keys)} give {expected}: the config does not match the model")


def _check_map(reader: CheckpointReader, names: peft.StoredNames, tensor_map: TensorMap, plan: Plan) -> None:
    target = " / ".join(".".join(p.path) for p in tensor_map.parts)
    for layer in tensor_map.layers():
        for key, shape in zip(tensor_map.layer_keys(layer), tensor_map.shapes):
            stored = names.stored(key)
            if stored not in reader.keys():
                also = f" (stored as '{stored}')" if stored != key else ""
                raise CheckpointError(f"{reader.directory}: missing tensor '{key}'{also} for parameter {target}")
            _check_tensor(reader, stored, shape, target)
            plan.consumed.add(stored)


def _check_tensor(reader: CheckpointReader, stored: str, shape: tuple[int, ...], target: str) -> None:
    info = reader.info(stored)
    if info.dtype is None:
        raise CheckpointError(f"{reader.file_of(stored)}: tensor '{stored}' has unsupported dtype "
                              f"{info.dtype_name} (floating point F32, BF16, F16 are read)")
    if info.shape != tuple(shape):
        raise CheckpointError(f"{reader.file_of(stored)}: tensor '{stored}' has shape {list(info.shape)}, "
                              f"expected {list(shape)} for {target}")


def _check_adapters(reader: CheckpointReader, names: peft.StoredNames, tensor_map: TensorMap
                    ) -> dict[str, tuple[str, str]]:
    """{canonical weight name: stored (A, B)} of the map's adapters, shapes checked."""
    adapters = {}
    for layer in tensor_map.layers():
        for key, shape in zip(tensor_map.layer_keys(layer), tensor_map.shapes):
            pair = names.adapter_of(key)
            if pair is None:
                continue
            a_shape = reader.info(pair[0]).shape
            rank = a_shape[0] if a_shape else 0
            where = f"the LoRA adapter of '{key}'"
            _check_tensor(reader, pair[0], (rank, tensor_map.width), where)
            _check_tensor(reader, pair[1], (int(np.prod(shape)) // tensor_map.width, rank), where)
            adapters[key] = pair
    return adapters


def _keepable(reader: CheckpointReader, tensor_map: TensorMap, adapters: dict) -> tuple[int, list[TensorMap]] | None:
    """(rank, adapter maps) when every layer has an adapter of one rank and ours can hold it exactly."""
    if len(adapters) != len(tensor_map.keys) * len(tensor_map.layers()):
        return None
    ranks = {reader.info(a).shape[0] for a, _ in adapters.values()}
    maps = adapter_maps(tensor_map, next(iter(ranks))) if len(ranks) == 1 else None
    return (ranks.pop(), maps) if maps else None


def _kept_adapter_maps(reader: CheckpointReader, tensor_map: TensorMap, adapters: dict, config: ModelConfig,
                       params: dict[Path, nnx.Variable]) -> list[TensorMap] | None:
    """Adapter maps when the adapter is keepable and the model has adapters of the same rank and
    scale there; otherwise None (the adapter gets merged)."""
    keepable = _keepable(reader, tensor_map, adapters)
    if keepable is None:
        return None
    rank, maps = keepable
    is_vision = tensor_map.parts[0].path[0] == "vision_model"
    alpha = config.lora.vision_alpha if is_vision else config.lora.alpha
    if alpha != peft.OFFICIAL_ALPHA_PER_RANK * rank:
        return None
    for adapter_map in maps:
        for part in adapter_map.parts:
            variable = params.get(part.path)
            expected = ((adapter_map.num_layers,) if adapter_map.num_layers else ()) + part.shape
            if variable is None or tuple(variable.get_value().shape) != expected:
                return None
    return maps


@dataclasses.dataclass(frozen=True)
class CheckpointSummary:
    """What a checkpoint holds beyond its config.json: its dtype and its keepable LoRA adapters."""
    dtype: np.dtype  # the widest stored dtype
    lora: LoraConfig  # adapters that can be kept as ours (rank 0 = none), scale of the official wrappers


def inspect_checkpoint(directory: str | epath.PathLike, config: ModelConfig, layout: str) -> CheckpointSummary:
    """Reads the headers only. LoRA targets are those whose adapters sit on every layer."""
    with CheckpointReader(directory) as reader:
        names = peft.StoredNames(reader.keys(), str(reader.directory))
        dtypes = {reader.info(k).dtype for k in reader.keys()} - {None}
        found = {"language_model": {}, "vision_model": {}}
        for tensor_map in tensor_maps(config, layout):
            adapters = _check_adapters(reader, names, tensor_map)
            keepable = _keepable(reader, tensor_map, adapters) if adapters else None
            if keepable:
                for part in tensor_map.parts:
                    found[part.path[0]][part.path[-2]] = keepable[0]
    llm, vision = found["language_model"], found["vision_model"]
    lora = LoraConfig()
    if len(set(llm.values())) == 1:
        rank = next(iter(llm.values()))
        lora = dataclasses.replace(lora, rank=rank, alpha=peft.OFFICIAL_ALPHA_PER_RANK * rank,
                                   targets=tuple(sorted(llm)))
    if len(set(vision.values())) == 1:
        rank = next(iter(vision.values()))
        lora = dataclasses.replace(lora, vision_rank=rank, vision_alpha=peft.OFFICIAL_ALPHA_PER_RANK * rank,
                                   vision_targets=tuple(sorted(vision)))
    widest = max(dtypes, key=lambda d: d.itemsize) if dtypes else np.dtype(np.float32)
    return CheckpointSummary(widest, lora)
