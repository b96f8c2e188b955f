"""Bad checkpoints get errors that name the file and the tensor; failed exports leave nothing behind."""
import json
import logging
import shutil

import numpy as np
import pytest

from internvl_jax.convert import export as export_lib
from internvl_jax.convert.checkpoint import CheckpointError, CheckpointReader
from internvl_jax.convert.hf_config import ConfigFileError
from internvl_jax.convert.load import load_state, read_config
from internvl_jax.models.params import abstract_model

safetensors_numpy = pytest.importorskip("safetensors.numpy")


@pytest.fixture(scope="module")
def fixture_tensors(fixtures_dir):
    """The official tiny checkpoint's tensors and config.json."""
    source = fixtures_dir / "official_tiny_internlm2"
    with CheckpointReader(source) as reader:
        tensors = {key: reader.read_rows(key, 0, 1, int(np.prod(reader.info(key).shape))).reshape(reader.info(key).shape)
                   for key in sorted(reader.keys())}
    return tensors, json.loads((source / "config.json").read_text())


def write(directory, tensors, config):
    directory.mkdir(parents=True, exist_ok=True)
    safetensors_numpy.save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def load(directory):
    config, layout = read_config(directory)
    return load_state(directory, config, layout, abstract_model(config))


WQKV = "language_model.model.layers.1.attention.wqkv.weight"


def test_missing_tensor(tmp_path, fixture_tensors):
    tensors, config = fixture_tensors
    directory = write(tmp_path / "ckpt", {k: v for k, v in tensors.items() if k != WQKV}, config)
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'ckpt'}: missing tensor '{WQKV}'"):
        load(directory)


def test_unexpected_tensor(tmp_path, fixture_tensors):
    tensors, config = fixture_tensors
    directory = write(tmp_path / "ckpt", dict(tensors, **{"language_model.model.extra.weight": np.zeros(3, np.float32)}),
                      config)
    with pytest.raises(CheckpointError, match=r"1 unexpected tensor.*'language_model.model.extra.weight' "
                                              r"\(model.safetensors\)"):
        load(directory)


def test_shape_mismatch(tmp_path, fixture_tensors):
    tensors, config = fixture_tensors
    directory = write(tmp_path / "ckpt", dict(tensors, **{"mlp1.1.weight": np.zeros((128, 255), np.float32)}), config)
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'mlp1.1.weight' has shape \[128, 255\], "
                                              r"expected \[128, 256\] for mlp1.fc1.kernel"):
        load(directory)


def test_unsupported_dtype(tmp_path, fixture_tensors):
    tensors, config = fixture_tensors
    bad = dict(tensors, **{"mlp1.0.bias": tensors["mlp1.0.bias"].astype(np.int64)})
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'mlp1.0.bias' has unsupported dtype I64"):
        load(write(tmp_path / "ckpt", bad, config))


def test_truncated_and_corrupt_files(tmp_path, fixture_tensors):
    tensors, config = fixture_tensors
    directory = write(tmp_path / "ckpt", tensors, config)
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-1000])
    with pytest.raises(CheckpointError, match=rf"{path}: truncated safetensors file: tensor '[^']+' ends at byte"):
        load(directory)
    path.write_bytes(data[:8] + b"#" * 16 + data[24:])
    with pytest.raises(CheckpointError, match=rf"{path}: corrupt safetensors header"):
        load(directory)
    path.write_bytes(data[:4])
    with pytest.raises(CheckpointError, match=rf"{path}: truncated safetensors file"):
        load(directory)


def test_index_pointing_to_a_missing_shard(tmp_path, fixture_tensors):
    tensors, config = fixture_tensors
    directory = write(tmp_path / "ckpt", tensors, config)
    (directory / "model.safetensors").rename(directory / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {k: "model-00001-of-00002.safetensors" for k in tensors}}
    index["weight_map"][WQKV] = "model-00002-of-00002.safetensors"
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json points to missing shard "
                                              r".*model-00002-of-00002.safetensors"):
        load(directory)


def test_only_safetensors_are_read(tmp_path, fixture_tensors):
    _, config = fixture_tensors
    directory = tmp_path / "ckpt"
    directory.mkdir()
    (directory / "pytorch_model.bin").write_bytes(b"not read")
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="only safetensors checkpoints are read"):
        load(directory)


def test_config_missing_a_field(tmp_path, fixture_tensors):
    tensors, config = fixture_tensors
    broken = json.loads(json.dumps(config))
    del broken["llm_config"]["num_hidden_layers"]
    directory = write(tmp_path / "ckpt", tensors, broken)
    with pytest.raises(ConfigFileError, match=r"config.json llm_config: missing field 'num_hidden_layers'"):
        read_config(directory)


def test_missing_ps_version_warns(tmp_path, fixture_tensors, caplog):
    tensors, config = fixture_tensors
    directory = write(tmp_path / "ckpt", tensors, {k: v for k, v in config.items() if k != "ps_version"})
    with caplog.at_level(logging.WARNING):
        model_config, _ = read_config(directory)
    assert model_config.ps_version == "v1"
    assert "no 'ps_version'" in caplog.text and "would assume 'v1'" in caplog.text


def test_failed_export_leaves_no_partial_checkpoint(tmp_path, fixtures_dir, monkeypatch):
    from internvl_jax import load_pretrained
    model, _, _ = load_pretrained(fixtures_dir / "official_tiny_internlm2", img_context_token_id=599)
    written = []
    real_write = export_lib.write_safetensors

    def fail_on_second_shard(path, *args, **kwargs):
        if written:
            raise OSError("disk full")
        written.append(path)
        real_write(path, *args, **kwargs)
    monkeypatch.setattr(export_lib, "write_safetensors", fail_on_second_shard)
    with pytest.raises(OSError, match="disk full"):
        export_lib.export_model(model, tmp_path / "out", max_shard_bytes=500_000)
    assert written and list(tmp_path.iterdir()) == []
    # An existing export is only replaced by a complete one.
    shutil.copytree(fixtures_dir / "official_tiny_internlm2", tmp_path / "out")
    with pytest.raises(OSError, match="disk full"):
        written.clear()
        export_lib.export_model(model, tmp_path / "out", max_shard_bytes=500_000, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "reference_io.npz").exists()
    with pytest.raises(FileExistsError):
        export_lib.export_model(model, tmp_path / "out")


def test_missing_lora_adapters_of_an_abstract_model(fixtures_dir):
    from internvl_jax import load_pretrained
    with pytest.raises(CheckpointError, match=r"no checkpoint tensor for parameter\(s\) "
                                              r"language_model.layers.down.lora_a, .*fresh LoRA adapters"):
        load_pretrained(fixtures_dir / "official_tiny_internlm2", img_context_token_id=599, lora__rank=2,
                        lora__alpha=4.0)
