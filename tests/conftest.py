"""Suite-wide set-up: 8 fake CPU devices, one persistent compilation cache, shared fixtures."""
import os

# Must happen before jax is imported anywhere in the test process.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# libtpu (ahead-of-time TPU compiles) takes a machine-wide lock unless told other processes may load it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pathlib

import jax
import pytest
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures"

jax.config.update("jax_compilation_cache_dir",
                    os.environ.get("JAX_COMPILATION_CACHE_DIR", str(REPO / ".cache" / "jax")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# grain's worker processes read absl flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"shared fixtures not found at {FIXTURES}")
    return FIXTURES


IMG_CONTEXT_ID = 1000


@pytest.fixture(scope="session")
def tiny_config():
    """The tiny model config with its image-context id set (tokenizer-free tests)."""
    from internvl_jax.config import load_config
    return load_config("tiny", [f"model.img_context_token_id={IMG_CONTEXT_ID}"]).model


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    """One randomly initialised tiny model (float32), shared by the whole session."""
    from internvl_jax.models.params import create_model
    return create_model(tiny_config, seed=0)
