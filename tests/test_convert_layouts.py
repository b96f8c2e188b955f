"""Checkpoint layouts, sliced streaming reads, safetensors I/O and config.json round trips (no torch)."""
import dataclasses
import json

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from internvl_jax.config import LLMConfig, MeshConfig, ModelConfig, RopeConfig, VisionConfig
from internvl_jax.convert import placement
from internvl_jax.convert.hf_config import hf_config_from_model, model_config_from_hf
from internvl_jax.convert.layouts import grouped_qkv_rows, tensor_maps
from internvl_jax.convert.safetensors_io import SafetensorsFile, TensorSpec, shard_specs, write_safetensors
from internvl_jax.models.params import abstract_model
from internvl_jax.sharding import make_mesh, state_shardings


def tiny(family="internlm2", norm="layer_norm", tie=False, rope=RopeConfig(theta=1e6), **changes) -> ModelConfig:
    vision = VisionConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, image_size=56,
                          norm_type=norm, qkv_bias=norm == "layer_norm", qk_normalization=norm == "rms_norm")
    llm = LLMConfig(family=family, vocab_size=100, hidden_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2 if family != "phi3" else 4, intermediate_size=96, rope=rope,
                    qkv_bias=family == "qwen2", tie_word_embeddings=tie)
    return dataclasses.replace(ModelConfig(vision=vision, llm=llm, img_context_token_id=99), **changes)


CASES = {
    "official-internlm2": (tiny(), "official"),
    "official-phi3": (tiny("phi3", "rms_norm", rope=RopeConfig(scaling="su", short_factor=(1.0,) * 8,
                                                                 long_factor=(2.0,) * 8,
                                                                 original_max_position_embeddings=64)), "official"),
    "official-qwen2": (tiny("qwen2", tie=True), "official"),
    "hf-llama": (tiny("llama", "rms_norm", rope=RopeConfig(theta=5e5, scaling="dynamic", factor=2.0)), "hf"),
    "hf-qwen2-tied": (tiny("qwen2", tie=True), "hf"),
}


@pytest.mark.parametrize("name", CASES)
def test_maps_partition_checkpoint_rows_and_round_trip(name):
    config, layout = CASES[name]
    rng = np.random.default_rng(0)
    for tensor_map in tensor_maps(config, layout):
        rows = np.sort(np.concatenate([part.rows for part in tensor_map.parts]))
        np.testing.assert_array_equal(rows, np.arange(tensor_map.key_rows()[-1]), err_msg=str(tensor_map.keys))
        tensors = [rng.standard_normal(shape).astype(np.float32) for shape in tensor_map.shapes]
        ours = tensor_map.to_ours(*tensors)
        assert [a.shape for a in ours] == [part.shape for part in tensor_map.parts]
        for back, tensor in zip(tensor_map.to_checkpoint(*ours), tensors):
            np.testing.assert_array_equal(back, tensor)


def test_internlm2_wqkv_rows_in_head_dim_units():
    """Spec §5.2, H = 4, KV = 2: wqkv rows are [q0, q1, k0, v0, q2, q3, k1, v1] in head_dim units."""
    hd = 3
    contiguous = {"q0": 0, "q1": 1, "q2": 2, "q3": 3, "k0": 4, "k1": 5, "v0": 6, "v1": 7}  # [q | k | v]
    expected = [contiguous[h] for h in ("q0", "q1", "k0", "v0", "q2", "q3", "k1", "v1")]
    rows = grouped_qkv_rows(num_heads=4, num_kv_heads=2, head_dim=hd)
    assert list(rows[::hd] // hd) == expected
    np.testing.assert_array_equal(rows.reshape(8, hd) % hd, np.tile(np.arange(hd), (8, 1)))


def _reader_of(tensors):
    """An in-memory row reader that records every row it hands out."""
    log = []

    def for_layer(tensor_map, layer):
        def read(index, start, stop, width):
            log.append((tensor_map.layer_keys(layer)[index], start, stop))
            return tensors[tensor_map.layer_keys(layer)[index]].reshape(-1, width)[start:stop]
        return read
    return for_layer, log


@pytest.mark.parametrize("host_bytes, chunk_bytes", [(0, 2 ** 40), (0, 3000), (2 ** 40, 0)],
                         ids=["on_devices", "on_devices_in_slabs", "on_host"])
def test_streamed_placement_equals_conversion_on_a_mesh(host_bytes, chunk_bytes):
    """Every parameter, sharded on a 2x2x2 mesh with padded vocab and ViT heads, equals to_ours + padding."""
    config = tiny(norm="rms_norm", vision=dataclasses.replace(tiny().vision, num_heads=2, pad_heads_to_multiple_of=4,
                                                              norm_type="rms_norm", qk_normalization=True,
                                                              qkv_bias=False),
                  llm=dataclasses.replace(tiny().llm, pad_vocab_to_multiple_of=8, vocab_size=98))
    abstract = abstract_model(config)
    params = dict(nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    shardings = dict(nnx.to_flat_state(state_shardings(nnx.state(abstract, nnx.Param), mesh)))
    rng = np.random.default_rng(1)
    for tensor_map in tensor_maps(config, "official"):
        tensors = {key: rng.standard_normal(shape).astype(ml_dtypes.bfloat16)
                   for layer in tensor_map.layers() for key, shape in zip(tensor_map.layer_keys(layer), tensor_map.shapes)}
        reader, _ = _reader_of(tensors)
        for index, part in enumerate(tensor_map.parts):
            stored = params[part.path].get_value().shape
            value = placement.place_part(tensor_map, part, lambda layer: reader(tensor_map, layer), stored,
                                         np.float32, shardings[part.path], host_bytes, chunk_bytes)
            assert value.sharding.is_equivalent_to(shardings[part.path], len(stored)), part.path
            expected = np.stack([tensor_map.to_ours(*[tensors[k] for k in tensor_map.layer_keys(layer)])[index]
                                 for layer in tensor_map.layers()])
            expected = expected if tensor_map.num_layers else expected[0]
            padded = np.zeros(stored, np.float32)
            padded[tuple(slice(0, n) for n in expected.shape)] = expected.astype(np.float32)
            np.testing.assert_array_equal(np.asarray(value), padded, err_msg=str(part.path))


def test_a_device_reads_only_the_rows_of_its_shard():
    config = tiny("llama")
    (head,) = [m for m in tensor_maps(config, "official") if m.paths == (("language_model", "lm_head", "kernel"),)]
    (qkv,) = [m for m in tensor_maps(config, "official") if m.paths == (("language_model", "layers", "qkv", "kernel"),)]
    rng = np.random.default_rng(2)
    for tensor_map, box, want in [
        # lm_head kernel [D=64, V=100]: vocab 50..100 are rows 50..100 of lm_head.weight [V, D]
        (head, ((0, 64), (50, 100)), [("language_model.lm_head.weight", 50, 100)]),
        # qkv kernel [D, KV=2, G+2=4, hd=16]: kv group 1 = q heads 2, 3 (q rows 32..64), k1, v1
        (qkv, ((0, 64), (1, 2), (0, 4), (0, 16)), [("language_model.model.layers.0.self_attn.q_proj.weight", 32, 64),
                                                    ("language_model.model.layers.0.self_attn.k_proj.weight", 16, 32),
                                                    ("language_model.model.layers.0.self_attn.v_proj.weight", 16, 32)]),
    ]:
        layer = 0 if tensor_map.num_layers else None
        tensors = {k: rng.standard_normal(s).astype(np.float32)
                   for k, s in zip(tensor_map.layer_keys(layer), tensor_map.shapes)}
        reader, log = _reader_of(tensors)
        part = tensor_map.parts[0]
        order = placement._device_order(part)
        (block,) = placement._read_blocks(tensor_map, part, reader(tensor_map, layer), [box], order).values()
        assert log == want
        full = tensor_map.to_ours(*tensors.values())[0]
        np.testing.assert_array_equal(np.transpose(block, np.argsort(order)),
                                      full[tuple(slice(a, b) for a, b in box)])


def test_safetensors_write_read_and_shards(tmp_path):
    rng = np.random.default_rng(3)
    arrays = {"a": rng.standard_normal((5, 4)).astype(ml_dtypes.bfloat16), "b": rng.standard_normal(7).astype(np.float32),
              "c": rng.standard_normal((2, 3, 2)).astype(np.float16)}
    specs = [TensorSpec(name, a.dtype, a.shape) for name, a in arrays.items()]
    write_safetensors(tmp_path / "x.safetensors", specs, iter(arrays.items()), {"format": "pt"})
    header_length = int.from_bytes((tmp_path / "x.safetensors").read_bytes()[:8], "little")
    assert (8 + header_length) % 8 == 0
    f = SafetensorsFile(tmp_path / "x.safetensors")
    assert f.metadata == {"format": "pt"}
    np.testing.assert_array_equal(f.read_rows("a", 1, 4, 4), arrays["a"][1:4])
    np.testing.assert_array_equal(f.read_rows("c", 0, 2, 6).reshape(2, 3, 2), arrays["c"])
    safetensors = pytest.importorskip("safetensors.numpy")  # the reference reader agrees
    loaded = safetensors.load_file(str(tmp_path / "x.safetensors"))
    np.testing.assert_array_equal(loaded["b"], arrays["b"])
    assert [[s.name for s in shard] for shard in shard_specs(specs, 60)] == [["a"], ["b", "c"]]
    with pytest.raises(ValueError, match="expected tensor 'a'"):
        write_safetensors(tmp_path / "y.safetensors", specs, iter([("b", arrays["b"])]))


@pytest.mark.parametrize("name", CASES)
def test_config_json_round_trip(name):
    config, layout = CASES[name]
    data = json.loads(json.dumps(hf_config_from_model(config, layout, dtype="bfloat16")))
    back, back_layout = model_config_from_hf(data)
    assert back_layout == layout
    assert back.vision == config.vision
    want_llm = config.llm if layout == "official" or config.llm.family != "internlm2" else \
        dataclasses.replace(config.llm, family="llama")
    assert back.llm == want_llm
    fields = ("downsample_ratio", "ps_version", "select_layer") + (
        ("template", "use_thumbnail", "min_dynamic_patch", "max_dynamic_patch") if layout == "official"
        else ("img_context_token_id",))
    assert {f: getattr(back, f) for f in fields} == {f: getattr(config, f) for f in fields}


def test_config_json_keeps_base_fields_and_replaces_rope():
    base = {"model_type": "internvl_chat", "auto_map": {"AutoModel": "modeling_internvl_chat.InternVLChatModel"},
            "llm_config": {"rope_parameters": {"rope_type": "default"}, "auto_map": {"x": "y"}, "use_llm_lora": 8},
            "use_llm_lora": 8}
    data = hf_config_from_model(tiny(), "official", dtype="float32", base=base)
    assert data["auto_map"] == base["auto_map"] and data["llm_config"]["auto_map"] == {"x": "y"}
    assert "rope_parameters" not in data["llm_config"] and data["llm_config"]["rope_theta"] == 1e6
    assert data["use_llm_lora"] == 0  # adapters are merged on export
    assert jax.tree.leaves(data)  # JSON-able values only
