"""Numerical parity with the PyTorch references (fp32, CPU): the official fixture, transformers' InternVL.

torch + transformers are test-only references (`pytest.importorskip`). Every figure asserted here
is printed (`pytest -s`) for the closing notes.
"""
import copy
import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx

from internvl_jax import load_pretrained
from internvl_jax.config import LoraConfig
from internvl_jax.convert.checkpoint import CheckpointReader
from internvl_jax.convert.export import export_model
from internvl_jax.models.layers import LoRAParam
from internvl_jax.models.params import abstract_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IMAGE_TOKEN = 255
HEAD_DIM = 16
VARIANTS = {
    # InternViT-6B style (RMSNorm, q/k-norm, no qkv bias) + Llama text, untied head.
    "rms_qknorm_llama": (dict(norm_type="rms_norm", use_qk_norm=True, attention_bias=False), "llama", False),
    # InternViT-300M style (LayerNorm, qkv bias) + Qwen2 text (qkv bias), tied embeddings.
    "layernorm_qwen2_tied": (dict(norm_type="layer_norm", use_qk_norm=False, attention_bias=True), "qwen2", True),
    # The 4B model's pairing: InternViT-300M + Phi-3 (fused qkv_proj and gate_up_proj, LongRoPE).
    "layernorm_phi3_longrope": (dict(norm_type="layer_norm", use_qk_norm=False, attention_bias=True), "phi3", False),
}
TEXT_CONFIGS = {
    "llama": lambda **kw: transformers.LlamaConfig(**kw),
    "qwen2": lambda **kw: transformers.Qwen2Config(**kw),
    "phi3": lambda **kw: transformers.Phi3Config(
        **kw, pad_token_id=0, eos_token_id=2, original_max_position_embeddings=128,
        rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                      "long_factor": [2.0 + 0.1 * i for i in range(8)]}),
}


forward = nnx.jit(lambda model, ids, pixels, flags: model(ids, pixels, flags))


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def reference_model(name: str):
    vision, text_type, tie = VARIANTS[name]
    text = TEXT_CONFIGS[text_type](vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=tie)
    config = transformers.InternVLConfig(
        vision_config=transformers.InternVLVisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                        intermediate_size=128, image_size=112, patch_size=14, **vision),
        text_config=text, image_token_id=IMAGE_TOKEN, image_seq_length=16, downsample_ratio=0.5,
        projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="default",
        tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = transformers.InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():  # every tensor random (biases, norms and layer scales included) and peaky logits
        for _, p in model.named_parameters():
            p.normal_(0, 0.15) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(1)
    pixels = rng.standard_normal((2, 3, 112, 112)).astype(np.float32)
    ids = np.array([[1, 2, 3] + [IMAGE_TOKEN] * 32 + rng.integers(4, 250, 20).tolist()])
    return ids, pixels, np.ones(2, np.int32)


@pytest.fixture(scope="module")
def saved_references(tmp_path_factory):
    """name -> (torch model, its save_pretrained folder), built once per variant."""
    cache = {}

    def get(name):
        if name not in cache:
            model = reference_model(name)
            directory = tmp_path_factory.mktemp(name)
            model.save_pretrained(directory)
            cache[name] = model, directory
        return cache[name]
    return get


@pytest.fixture(scope="module", params=list(VARIANTS))
def reference(request, saved_references, inputs):
    """(name, torch model, its save_pretrained folder, torch logits) per variant."""
    model, directory = saved_references(request.param)
    ids, pixels, _ = inputs
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()
    return request.param, model, directory, logits


@pytest.fixture(scope="module")
def llama_reference(saved_references):
    return saved_references("rms_qknorm_llama")


# --------------------------------------------------------------------------------------------
# The official fixture.


@pytest.fixture(scope="module")
def official(fixtures_dir):
    directory = fixtures_dir / "official_tiny_internlm2"
    return directory, dict(np.load(directory / "reference_io.npz"))


def test_official_fixture_logits_and_vit_embeds(official):
    directory, ref = official
    model, tokenizer, config = load_pretrained(directory, img_context_token_id=int(ref["img_context_token_id"]))
    assert tokenizer is None and config.img_context_token_id == 599 and config.llm.family == "internlm2"
    both = nnx.jit(lambda m, ids, pixels, flags: (m(ids, pixels, flags), m.extract_feature(pixels)))
    logits, embeds = both(model, ref["input_ids"], ref["pixel_values"], ref["image_flags"].reshape(-1))
    d_logits, d_embeds = max_diff(logits, ref["logits"]), max_diff(embeds, ref["vit_embeds"])
    print(f"\nofficial fixture fp32: max|Δ logits| = {d_logits:.2e}, max|Δ vit_embeds| = {d_embeds:.2e}")
    assert d_logits <= 1e-4 and d_embeds <= 1e-4


def test_bf16_stays_bf16_official_fixture(official, tmp_path):
    """A bf16 checkpoint loads as bf16 (params and compute) and exports bit-identical BF16 tensors.

    Against the fp32 official logits: top-1 agreement ≥ 99%. max|Δ| is 3.5e-2 × std here: the
    issue's 2e-2 × std is below this fixture's floor (rounding the weights alone to bf16, with
    fp32 compute, moves the logits by 2.04e-2 × std), so 4e-2 is asserted and the comparison with
    the reference's own bf16 error is made on transformers' model below.
    """
    directory, ref = official
    model, _, _ = load_pretrained(directory, img_context_token_id=599)
    export_model(model, tmp_path / "bf16", dtype=ml_dtypes.bfloat16, source_dir=directory)
    model, _, config = load_pretrained(tmp_path / "bf16", img_context_token_id=599)  # dtype=None: keep
    dtypes = {v.get_value().dtype for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)} and config.dtype == "bfloat16"
    export_model(model, tmp_path / "again", source_dir=tmp_path / "bf16")
    assert_same_tensors(tmp_path / "bf16", tmp_path / "again", dtype="BF16")
    logits = np.asarray(forward(model, ref["input_ids"], ref["pixel_values"], ref["image_flags"].reshape(-1)))
    assert logits.dtype == np.float32
    d, std = max_diff(logits, ref["logits"]), float(ref["logits"].std())
    top1 = float(np.mean(logits.argmax(-1) == ref["logits"].argmax(-1)))
    print(f"\nbf16 model vs fp32 official logits: max|Δ| = {d:.3e} = {d / std:.2e} × std ({std:.3f}); "
          f"top-1 agreement {top1:.2%}")
    assert top1 >= 0.99 and d <= 4e-2 * std


def test_bf16_error_is_no_larger_than_the_references_own(llama_reference, inputs, tmp_path):
    """Ours in bf16 vs transformers in fp32, beside transformers in bf16 vs itself in fp32."""
    torch_model, _ = llama_reference
    ids, pixels, flags = inputs
    bf16_model = copy.deepcopy(torch_model).to(torch.bfloat16)
    bf16_model.save_pretrained(tmp_path / "bf16")
    with torch.no_grad():
        fp32 = torch_model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()
        theirs = bf16_model(input_ids=torch.tensor(ids),
                            pixel_values=torch.tensor(pixels).to(torch.bfloat16)).logits.float().numpy()
    model, _, config = load_pretrained(tmp_path / "bf16")
    assert config.dtype == "bfloat16"
    ours = np.asarray(forward(model, ids, pixels, flags))
    std = float(fp32.std())
    ours_error, their_error = max_diff(ours, fp32) / std, max_diff(theirs, fp32) / std
    agreement = [float(np.mean(x.argmax(-1) == fp32.argmax(-1))) for x in (ours, theirs)]
    print(f"\nbf16 vs fp32 (transformers rms_qknorm_llama): ours {ours_error:.2e} × std, top-1 {agreement[0]:.1%}; "
          f"transformers' own bf16 {their_error:.2e} × std, top-1 {agreement[1]:.1%}")
    assert ours_error <= 1.25 * their_error and agreement[0] >= agreement[1] - 0.02


# --------------------------------------------------------------------------------------------
# transformers' InternVLForConditionalGeneration.


def test_transformers_checkpoint_logits(reference, inputs):
    name, _, directory, torch_logits = reference
    model, _, config = load_pretrained(directory)
    assert config.img_context_token_id == IMAGE_TOKEN
    logits = forward(model, *inputs)
    d = max_diff(logits, torch_logits)
    print(f"\ntransformers {name}: max|Δ logits| = {d:.2e}")
    assert d <= 1e-4


def assert_same_tensors(a_dir, b_dir, dtype=None):
    with CheckpointReader(a_dir) as a, CheckpointReader(b_dir) as b:
        assert a.keys() == b.keys()
        for key in a.keys():
            n = int(np.prod(a.info(key).shape))
            assert a.info(key).shape == b.info(key).shape and a.info(key).dtype == b.info(key).dtype, key
            assert dtype is None or a.info(key).dtype_name == dtype
            np.testing.assert_array_equal(a.read_rows(key, 0, 1, n), b.read_rows(key, 0, 1, n), err_msg=key)


def test_import_export_import_is_identical_per_tensor_hf_layout(reference, tmp_path):
    _, _, directory, _ = reference
    model, _, _ = load_pretrained(directory)
    export_model(model, tmp_path / "out", "hf", source_dir=directory)
    assert_same_tensors(directory, tmp_path / "out")
    again, _, _ = load_pretrained(tmp_path / "out")
    for (path, v), (_, w) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(again))):
        np.testing.assert_array_equal(np.asarray(v.get_value()), np.asarray(w.get_value()), err_msg=str(path))


def with_random_adapters(model, rank: int = 4):
    """The model with LoRA (rank 4, alpha 8) on every LLM and ViT target, A and B random (not zero)."""
    config = dataclasses.replace(model.config, lora=LoraConfig(rank=rank, alpha=2.0 * rank, vision_rank=rank,
                                                               vision_alpha=2.0 * rank))
    abstract = abstract_model(config)
    base = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    rng = np.random.default_rng(4)
    flat = {path: v.replace(base[path].get_value() if path in base else
                            jnp.asarray(0.05 * rng.standard_normal(v.get_value().shape), jnp.float32))
            for path, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    return nnx.merge(nnx.graphdef(abstract), nnx.from_flat_state(flat))


def test_trained_lora_model_exported_in_transformers_layout_loads_in_transformers(llama_reference, inputs, tmp_path):
    """Random LoRA adapters everywhere, the LLM's then trained by gradient steps; export merges them."""
    _, directory = llama_reference
    plain, _, _ = load_pretrained(directory, scan_layers=False)  # unrolled: its backward compiles faster on CPU
    model = with_random_adapters(plain)
    ids, pixels, flags = inputs
    text, labels = ids[:, 35:], np.roll(ids, -1, axis=1)[:, 35:]  # the text after the image: a small program

    @nnx.jit
    def train_step(model):
        def loss_fn(adapters, rest):
            logits = nnx.merge(graphdef, adapters, rest)(text)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        graphdef, adapters, rest = nnx.split(model, LoRAParam, ...)
        loss, grads = jax.value_and_grad(loss_fn)(adapters, rest)
        nnx.update(model, jax.tree.map(lambda p, g: p - 0.5 * g, adapters, grads))
        return loss
    before = np.asarray(model.language_model.layers.qkv.lora_b.get_value())
    losses = [float(train_step(model)) for _ in range(3)]
    assert losses[-1] < losses[0]
    assert not np.allclose(before, np.asarray(model.language_model.layers.qkv.lora_b.get_value()))
    ours = forward(model, ids, pixels, flags)
    export_model(model, tmp_path / "hf", "hf")
    exported = transformers.InternVLForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        theirs = exported(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()
    d = max_diff(ours, theirs)
    print(f"\ntrained LoRA model -> transformers layout -> transformers: max|Δ logits| = {d:.2e} "
          f"(loss {losses[0]:.3f} -> {losses[-1]:.3f})")
    assert d <= 1e-4


def test_internlm2_packing_from_a_llama_reference(llama_reference, inputs, tmp_path):
    """wqkv rows in head_dim units [q0, q1, k0, v0, q2, q3, k1, v1] (H = 4, KV = 2), packed here by hand."""
    torch_model, directory = llama_reference
    model, _, _ = load_pretrained(directory)
    export_model(model, tmp_path / "llama_official", "official")  # vision and mlp1 in official names
    with CheckpointReader(tmp_path / "llama_official") as reader:
        tensors = {k: reader.read_rows(k, 0, 1, int(np.prod(reader.info(k).shape))).reshape(reader.info(k).shape)
                   for k in reader.keys()}
    renames = {"embed_tokens": "tok_embeddings", "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1",
               "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2",
               "post_attention_layernorm": "ffn_norm", "input_layernorm": "attention_norm"}
    packed = {}
    for key, value in tensors.items():
        if "self_attn.q_proj" in key:
            base = key.removesuffix("self_attn.q_proj.weight")
            q = value.reshape(4, HEAD_DIM, -1)
            k = tensors[base + "self_attn.k_proj.weight"].reshape(2, HEAD_DIM, -1)
            v = tensors[base + "self_attn.v_proj.weight"].reshape(2, HEAD_DIM, -1)
            packed[base + "attention.wqkv.weight"] = np.concatenate([q[0], q[1], k[0], v[0], q[2], q[3], k[1], v[1]])
        elif "self_attn.k_proj" in key or "self_attn.v_proj" in key:
            continue
        elif key == "language_model.lm_head.weight":
            packed["language_model.output.weight"] = value
        else:
            for old, new in renames.items():
                key = key.replace(old, new)
            packed[key] = value
    config = json.loads((tmp_path / "llama_official" / "config.json").read_text())
    config["llm_config"].update(architectures=["InternLM2ForCausalLM"], model_type="internlm2", bias=False)
    internlm2 = tmp_path / "internlm2"
    internlm2.mkdir()
    pytest.importorskip("safetensors.numpy").save_file(packed, str(internlm2 / "model.safetensors"))
    (internlm2 / "config.json").write_text(json.dumps(config))

    packed_model, _, packed_config = load_pretrained(internlm2, img_context_token_id=IMAGE_TOKEN)
    assert packed_config.llm.family == "internlm2"
    ours, reference = forward(packed_model, *inputs), forward(model, *inputs)
    ids, pixels, _ = inputs
    with torch.no_grad():
        theirs = torch_model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()
    print(f"\nInternLM2 packing (H=4, KV=2): max|Δ| vs the Llama-layout load {max_diff(ours, reference):.1e}, "
          f"vs transformers {max_diff(ours, theirs):.2e}")
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(reference))
    assert max_diff(ours, theirs) <= 1e-4


def greedy(model, ids, pixels, flags, steps: int) -> tuple[list[int], list[float]]:
    """Greedy decoding with the KV cache: tokens and the top-2 logit margin of each step."""
    prefill = nnx.jit(lambda m, x, c: m.forward_cached(x, c, pixel_values=pixels, image_flags=flags))
    decode = nnx.jit(lambda m, x, c: m.forward_cached(x, c))
    logits, cache = prefill(model, ids, model.init_cache(1, ids.shape[1] + steps))
    tokens, margins = [], []
    for _ in range(steps):
        last = np.asarray(logits[0, -1])
        top2 = np.sort(last)[-2:]
        tokens.append(int(last.argmax()))
        margins.append(float(top2[1] - top2[0]))
        logits, cache = decode(model, np.array([[tokens[-1]]]), cache)
    return tokens, margins


def test_greedy_generation_equals_transformers_generate(llama_reference, inputs):
    torch_model, directory = llama_reference
    model, _, _ = load_pretrained(directory)
    ids, pixels, flags = inputs
    tokens, margins = greedy(model, ids, pixels, flags, 32)
    with torch.no_grad():
        out = torch_model.generate(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels), max_new_tokens=32,
                                   do_sample=False, eos_token_id=None, pad_token_id=0, output_scores=True,
                                   return_dict_in_generate=True)
    theirs = out.sequences[0, ids.shape[1]:].tolist()
    scores = np.sort(torch.stack(out.scores)[:, 0].numpy(), axis=-1)
    reference_margins = scores[:, -1] - scores[:, -2]
    print(f"\ngreedy 32 tokens: identical={tokens == theirs}; top-2 margins: min {min(margins):.4f} (ours), "
          f"{reference_margins.min():.4f} (transformers)")
    assert reference_margins.min() > 1e-3
    assert tokens == theirs
