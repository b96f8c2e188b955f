"""The attention backends agree with the XLA reference (splash in Pallas interpret mode on CPU)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internvl_jax.models.attention import attention, resolve_backend


def make_inputs(seed=0, batch=2, length=150, kv=2, group=2, head_dim=64):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, length, kv, group, head_dim)).astype(np.float32)
    k = rng.normal(size=(batch, length, kv, head_dim)).astype(np.float32)
    v = rng.normal(size=(batch, length, kv, head_dim)).astype(np.float32)
    # Row 0: two packed segments then padding; row 1: one segment.
    segments = np.ones((batch, length), np.int32)
    segments[0, 60:130] = 2
    segments[0, 130:] = 0
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(segments)


def naive(q, k, v, segments, causal):
    """Per-head loop with explicit repeat-interleave GQA, for cross-checking."""
    b, t, kv, g, hd = q.shape
    out = np.zeros(q.shape, np.float32)
    q, k, v, segments = map(np.asarray, (q, k, v, segments))
    for bi in range(b):
        mask = (segments[bi][:, None] == segments[bi][None]) & (segments[bi][None] != 0)
        if causal:
            mask &= np.tril(np.ones((t, t), bool))
        for h in range(kv * g):
            kvh, gh = divmod(h, g)
            scores = q[bi, :, kvh, gh] @ k[bi, :, kvh].T / np.sqrt(hd)
            scores = np.where(mask, scores, -1e30)  # padded rows see nothing; they are not compared
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores = scores / scores.sum(-1, keepdims=True)
            out[bi, :, kvh, gh] = scores @ v[bi, :, kvh]
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_xla_and_cudnn_paths_match_naive(causal):
    q, k, v, segments = make_inputs()
    expected = naive(q, k, v, segments, causal)
    real = (np.asarray(segments) != 0)[..., None, None, None]
    for backend in ("xla", "cudnn"):  # cudnn falls back to XLA's implementation on CPU
        out = np.asarray(jax.jit(lambda *a: attention(*a[:3], q_segment_ids=a[3], kv_segment_ids=a[3],
                                                      causal=causal, backend=backend))(q, k, v, segments))
        np.testing.assert_allclose(np.where(real, out, 0), np.where(real, expected, 0), atol=2e-5, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_splash_interpret_matches_xla(causal):
    q, k, v, segments = make_inputs(batch=1, length=150, kv=1, group=2, head_dim=128)
    splash = attention(q, k, v, q_segment_ids=segments, kv_segment_ids=segments, causal=causal,
                       backend="splash", interpret=True)
    reference = attention(q, k, v, q_segment_ids=segments, kv_segment_ids=segments, causal=causal, backend="xla")
    real = (np.asarray(segments) != 0)[..., None, None, None]
    np.testing.assert_allclose(np.where(real, splash, 0), np.where(real, reference, 0), atol=2e-5, rtol=0)


def test_cached_queries_see_only_earlier_slots():
    q, k, v, segments = make_inputs(batch=1, length=8, kv=1, group=1, head_dim=8)
    full = attention(q, k, v, q_segment_ids=segments, kv_segment_ids=segments, causal=True, backend="xla")
    step = attention(q[:, 5:6], k, v, q_segment_ids=segments[:, 5:6], kv_segment_ids=segments, causal=True,
                     q_offset=5, backend="xla")
    np.testing.assert_allclose(step[:, 0], full[:, 5], atol=1e-6, rtol=0)


def test_backend_resolution():
    assert resolve_backend("auto") == "xla"  # this suite runs on CPU
    with pytest.raises(ValueError, match="flash"):
        resolve_backend("flash")
