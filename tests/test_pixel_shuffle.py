"""Pixel shuffle v1/v2 against a literal transcription of the official view/permute steps."""
import numpy as np
import pytest

from internvl_jax.models.projector import pixel_shuffle


def official_pixel_shuffle(x: np.ndarray, scale: float, version: str) -> np.ndarray:
    """The official InternVL steps (spec §3), one numpy call per torch call."""
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale), int(c / scale))            # view
    x = x.transpose(0, 2, 1, 3)                                      # permute(0, 2, 1, 3)
    x = x.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))  # view
    if version == "v2":
        x = x.transpose(0, 2, 1, 3)                                  # permute(0, 2, 1, 3)
    return x.reshape(n, -1, x.shape[-1])                             # flatten the grid for mlp1


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("side", [4, 8, 32])
def test_matches_official_steps(version, side):
    x = np.random.default_rng(side).normal(size=(2, side, side, 6)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(pixel_shuffle(x, 0.5, version)), official_pixel_shuffle(x, 0.5, version))


def test_closed_form_channel_order():
    """Token (i, j) = concat(x[2i,2j], x[2i,2j+1], x[2i+1,2j], x[2i+1,2j+1]); v2 row-major, v1 column-major."""
    x = np.random.default_rng(0).normal(size=(1, 8, 8, 3)).astype(np.float32)
    v1, v2 = np.asarray(pixel_shuffle(x, 0.5, "v1")), np.asarray(pixel_shuffle(x, 0.5, "v2"))
    for i in range(4):
        for j in range(4):
            want = np.concatenate([x[0, 2 * i, 2 * j], x[0, 2 * i, 2 * j + 1], x[0, 2 * i + 1, 2 * j],
                                   x[0, 2 * i + 1, 2 * j + 1]])
            np.testing.assert_array_equal(v2[0, i * 4 + j], want)
            np.testing.assert_array_equal(v1[0, j * 4 + i], want)


def test_matches_transformers_pixel_shuffle():
    torch = pytest.importorskip("torch")
    modeling = pytest.importorskip("transformers.models.internvl.modeling_internvl")
    x = np.random.default_rng(1).normal(size=(3, 16, 16, 8)).astype(np.float32)
    # transformers implements only the v2 form; the method does not use `self`.
    reference = modeling.InternVLModel.pixel_shuffle(None, torch.from_numpy(x), scale_factor=0.5).numpy()
    ours = np.asarray(pixel_shuffle(x, 0.5, "v2"))
    np.testing.assert_array_equal(ours, reference.reshape(ours.shape))


def test_rejects_unknown_version():
    with pytest.raises(ValueError, match="v3"):
        pixel_shuffle(np.zeros((1, 4, 4, 2), np.float32), 0.5, "v3")
