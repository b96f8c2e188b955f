"""Checkpoints saved with PEFT LoRA wrappers (spec §7.3): merged on import, or kept as our adapters."""
import json

import numpy as np
import pytest
from flax import nnx

from internvl_jax import load_pretrained
from internvl_jax.convert.checkpoint import CheckpointReader
from internvl_jax.convert.export import export_model
from internvl_jax.models.lora import merge_lora

safetensors_numpy = pytest.importorskip("safetensors.numpy")
RANK = 2
# Official wrap_llm_lora / wrap_backbone_lora targets for an InternLM2 model.
LLM_TARGETS = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
VIT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def is_target(key: str) -> bool:
    return key.endswith(".weight") and any(f".{t}." in key for t in LLM_TARGETS + VIT_TARGETS)


def peft_name(key: str, wrapped_weight: bool, base_layer: bool) -> str:
    """The name PEFT gives `key` once vision_model / language_model are PEFT models."""
    top, rest = key.split(".", 1)
    if top == "mlp1":
        return key
    name = f"{top}.base_model.model.{rest}"
    if wrapped_weight and base_layer:
        module, param = name.rsplit(".", 1)
        name = f"{module}.base_layer.{param}"
    return name


@pytest.fixture(scope="module", params=["base_layer", "legacy"])
def checkpoints(request, fixtures_dir, tmp_path_factory):
    """(PEFT-wrapped folder, the same model with the adapters merged by hand) from the official fixture."""
    source = fixtures_dir / "official_tiny_internlm2"
    with CheckpointReader(source) as reader:
        tensors = {k: reader.read_rows(k, 0, 1, int(np.prod(reader.info(k).shape))).reshape(reader.info(k).shape)
                   for k in reader.keys()}
    config = json.loads((source / "config.json").read_text())
    rng = np.random.default_rng(5)
    wrapped, merged = {}, {}
    for key, value in tensors.items():
        merged[key] = value
        module_is_wrapped = is_target(key) or (key.endswith(".bias") and is_target(key[:-5] + ".weight"))
        wrapped[peft_name(key, module_is_wrapped, request.param == "base_layer")] = value
        if is_target(key):
            a = rng.standard_normal((RANK, value.shape[1])).astype(np.float32) * 0.1
            b = rng.standard_normal((value.shape[0], RANK)).astype(np.float32) * 0.1
            module = peft_name(key, False, False).removesuffix(".weight")
            wrapped[f"{module}.lora_A.default.weight"], wrapped[f"{module}.lora_B.default.weight"] = a, b
            merged[key] = value + 2.0 * (b @ a)  # lora_alpha = 2r in the official wrappers
    folders = []
    for name, tensor_set, lora in (("peft", wrapped, RANK), ("merged", merged, 0)):
        folder = tmp_path_factory.mktemp(f"{name}_{request.param}")
        safetensors_numpy.save_file(tensor_set, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(dict(config, use_llm_lora=lora, use_backbone_lora=lora)))
        folders.append(folder)
    return folders


def flat_params(model):
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_adapters_merged_on_import(checkpoints):
    peft_dir, merged_dir = checkpoints
    model, _, config = load_pretrained(peft_dir, img_context_token_id=599)
    assert config.lora.rank == 0
    expected = flat_params(load_pretrained(merged_dir, img_context_token_id=599)[0])
    got = flat_params(model)
    assert got.keys() == expected.keys()
    for path in got:
        np.testing.assert_allclose(got[path], expected[path], atol=1e-6, err_msg=str(path))


def test_adapters_kept_exactly_and_merged_on_export(checkpoints, tmp_path):
    peft_dir, merged_dir = checkpoints
    model, _, config = load_pretrained(peft_dir, img_context_token_id=599, lora="keep")
    assert (config.lora.rank, config.lora.alpha, config.lora.vision_rank) == (RANK, 2.0 * RANK, RANK)
    assert set(config.lora.targets) == {"qkv", "o", "gate", "up", "down"}
    assert set(config.lora.vision_targets) == {"qkv", "proj", "fc1", "fc2"}
    # Our adapters are the checkpoint's: wqkv's B rows are already in our grouped [KV, G+2, hd] order.
    with CheckpointReader(peft_dir) as reader:
        key = "language_model.base_model.model.model.layers.1.attention.wqkv.lora_B.default.weight"
        b = reader.read_rows(key, 0, reader.info(key).shape[0], RANK)
    np.testing.assert_array_equal(np.asarray(model.language_model.layers.qkv.lora_b.get_value()[1]).reshape(RANK, -1),
                                  b.T)
    expected = flat_params(load_pretrained(merged_dir, img_context_token_id=599)[0])
    folded = flat_params(merge_lora(model))
    for path in expected:
        np.testing.assert_allclose(folded[path], expected[path], atol=1e-6, err_msg=str(path))
    export_model(model, tmp_path / "out", source_dir=peft_dir)
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["use_llm_lora"] == 0 and exported["use_backbone_lora"] == 0
    with CheckpointReader(tmp_path / "out") as out, CheckpointReader(merged_dir) as ref:
        assert out.keys() == ref.keys()
        for key in ref.keys():
            n = int(np.prod(ref.info(key).shape))
            np.testing.assert_allclose(out.read_rows(key, 0, 1, n), ref.read_rows(key, 0, 1, n), atol=1e-6, err_msg=key)
