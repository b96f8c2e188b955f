"""Parameter counts and checkpoint keys of the three real models, without allocating them.

Expected totals and splits are the official figures (spec §1.4); expected keys and shapes are
written out from the spec's key tables (§7), independently of `convert.layouts`.
"""
import numpy as np
import pytest
from flax import nnx

from internvl_jax.config import load_config
from internvl_jax.convert.layouts import tensor_maps
from internvl_jax.models.params import abstract_model, count_params, logical_shape

OFFICIAL = {
    "internvl_chat_v1_5": (25_514_186_112, 5_536_496_000, 116_429_824, 19_861_260_288, 934),
    "mini_internvl_chat_2b_v1_5": (2_205_754_368, 304_012_288, 12_595_200, 1_889_146_880, 517),
    "mini_internvl_chat_4b_v1_5": (4_146_855_936, 304_012_288, 22_034_432, 3_820_809_216, 541),
}


def official_keys(name):
    """{key: shape} of the official checkpoint, from spec §7.2/§7.3."""
    if name == "internvl_chat_v1_5":
        c, vit_layers, inter, rms = 3200, 45, 12800, True
    else:
        c, vit_layers, inter, rms = 1024, 24, 4096, False
    keys = {
        "vision_model.embeddings.class_embedding": (1, 1, c),
        "vision_model.embeddings.position_embedding": (1, 1025, c),
        "vision_model.embeddings.patch_embedding.weight": (c, 3, 14, 14),
        "vision_model.embeddings.patch_embedding.bias": (c,),
    }
    for i in range(vit_layers):
        p = f"vision_model.encoder.layers.{i}."
        keys.update({p + "ls1": (c,), p + "ls2": (c,), p + "attn.qkv.weight": (3 * c, c),
                     p + "attn.proj.weight": (c, c), p + "attn.proj.bias": (c,),
                     p + "mlp.fc1.weight": (inter, c), p + "mlp.fc1.bias": (inter,),
                     p + "mlp.fc2.weight": (c, inter), p + "mlp.fc2.bias": (c,),
                     p + "norm1.weight": (c,), p + "norm2.weight": (c,)})
        if rms:
            keys.update({p + "attn.q_norm.weight": (c,), p + "attn.k_norm.weight": (c,)})
        else:
            keys.update({p + "attn.qkv.bias": (3 * c,), p + "norm1.bias": (c,), p + "norm2.bias": (c,)})
    if name == "mini_internvl_chat_4b_v1_5":
        d, layers, vocab, i_llm = 3072, 32, 32020, 8192
        keys["language_model.model.embed_tokens.weight"] = (vocab, d)
        for i in range(layers):
            p = f"language_model.model.layers.{i}."
            keys.update({p + "self_attn.qkv_proj.weight": (3 * d, d), p + "self_attn.o_proj.weight": (d, d),
                         p + "mlp.gate_up_proj.weight": (2 * i_llm, d), p + "mlp.down_proj.weight": (d, i_llm),
                         p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)})
        keys["language_model.lm_head.weight"] = (vocab, d)
    else:
        d, layers, i_llm, qkv_rows = ((6144, 48, 16384, 8192) if name == "internvl_chat_v1_5"
                                      else (2048, 24, 8192, 4096))
        vocab = 92553
        keys["language_model.model.tok_embeddings.weight"] = (vocab, d)
        for i in range(layers):
            p = f"language_model.model.layers.{i}."
            keys.update({p + "attention.wqkv.weight": (qkv_rows, d), p + "attention.wo.weight": (d, d),
                         p + "feed_forward.w1.weight": (i_llm, d), p + "feed_forward.w3.weight": (i_llm, d),
                         p + "feed_forward.w2.weight": (d, i_llm), p + "attention_norm.weight": (d,),
                         p + "ffn_norm.weight": (d,)})
        keys["language_model.output.weight"] = (vocab, d)
    keys["language_model.model.norm.weight"] = (d,)
    c4 = 4 * c
    keys.update({"mlp1.0.weight": (c4,), "mlp1.0.bias": (c4,), "mlp1.1.weight": (d, c4), "mlp1.1.bias": (d,),
                 "mlp1.3.weight": (d, d), "mlp1.3.bias": (d,)})
    return keys


@pytest.fixture(scope="module", params=sorted(OFFICIAL))
def real_model(request):
    config = load_config(request.param).model
    return request.param, config, abstract_model(config)


def test_parameter_counts_equal_official_totals(real_model):
    name, _, model = real_model
    total, vit, mlp1, llm, _ = OFFICIAL[name]
    assert count_params(model) == total
    assert count_params(model.vision_model) == vit
    assert count_params(model.mlp1) == mlp1
    assert count_params(model.language_model) == llm


def test_every_official_key_maps_to_one_parameter(real_model):
    name, config, model = real_model
    expected = official_keys(name)
    assert len(expected) == OFFICIAL[name][4]
    params = {path: v for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    mapped_keys, mapped_paths = [], []
    for tensor_map in tensor_maps(config, "official"):
        layers = range(tensor_map.num_layers) if tensor_map.num_layers else [None]
        for layer in layers:
            mapped_keys.extend(tensor_map.layer_keys(layer))
        mapped_paths.extend(tensor_map.paths)
        # Converting zero tensors of the official shapes gives our logical shapes (one layer).
        inputs = [np.zeros(expected[k], np.int8) for k in tensor_map.layer_keys(0 if tensor_map.num_layers else None)]
        outputs = tensor_map.to_ours(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        for path, out in zip(tensor_map.paths, outputs):
            want = logical_shape(params[path])[1 if tensor_map.num_layers else 0:]
            assert out.shape == want, (path, out.shape, want)
    assert sorted(mapped_keys) == sorted(expected), set(mapped_keys) ^ set(expected)
    assert len(mapped_keys) == len(set(mapped_keys))
    assert sorted(mapped_paths) == sorted(params), set(mapped_paths) ^ set(params)
