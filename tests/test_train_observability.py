"""What a training run reports and how it stops: in-training evaluation, profiler trace, TensorBoard
events, SIGTERM (save, then stop), time-based checkpoints, and the host running a step ahead."""
import json
import os
import pathlib
import signal
import struct

from data_fixtures import synthetic_meta, tokenizer_dir  # noqa: F401  (session fixtures)
from internvl_jax.config import MeshConfig
from internvl_jax.sharding import make_mesh
from internvl_jax.train import __main__ as train_cli
from internvl_jax.train.checkpoint import Checkpointer
from internvl_jax.train.loop import train
from internvl_jax.train.state import abstract_train_state
from test_train_step import ContractBatches, small_config


def tensorboard_tags(directory: pathlib.Path) -> set[str]:
    """Scalar tags in the TFRecord event files under `directory` (length, crc, event, crc)."""
    from tensorboardX.proto import event_pb2
    tags = set()
    for path in directory.glob("events.out.tfevents.*"):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            tags.update(value.tag for value in event.summary.value)
            offset += 12 + length + 4
    return tags


def test_in_training_eval_profile_and_tensorboard(tmp_path, synthetic_meta, tokenizer_dir):  # noqa: F811
    questions = synthetic_meta.parent / "test_qa.jsonl"
    train_cli.main(["--config", "tiny", "--workdir", str(tmp_path), f"data.meta_path={synthetic_meta}",
                    f"data.tokenizer_path={tokenizer_dir}", "data.num_workers=0", "data.max_tiles_per_row=8",
                    "train.max_seq_length=256", "train.global_batch_size=2", "train.total_steps=3",
                    "train.save_every_steps=0", "train.eval_every_steps=2", f"train.eval_benchmarks=jsonl:{questions}",
                    "train.eval_limit=3", "train.eval_settings=max_new_tokens=3", "train.profile_start_step=2",
                    "train.profile_num_steps=1"])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert "eval_test_qa" not in records[0]
    for record in records[1:]:  # every eval_every_steps steps and at the last step
        assert 0.0 <= record["eval_test_qa"] <= 100.0 and record["eval_test_qa_failed"] == 0
    results = json.loads((tmp_path / "eval" / "step_2" / "test_qa" / "results.json").read_text())
    assert results["num_samples"] == 3 and results["metric"] == "exact_match"
    assert list((tmp_path / "profile").rglob("*.xplane.pb")), "no profiler trace written"
    tags = tensorboard_tags(tmp_path / "tensorboard")
    assert {"train/loss", "train/grad_norm", "train/lr", "train/tokens_per_second", "eval/test_qa"} <= tags


def test_sigterm_saves_and_stops_and_minutes_trigger_saves(tmp_path):
    config = small_config("train.total_steps=6", "train.save_every_steps=0", "train.save_every_minutes=1e-9",
                          "train.keep_last=10")
    terminate_at, previous_handler = 3, signal.getsignal(signal.SIGTERM)
    on_step_end = lambda step: os.kill(os.getpid(), signal.SIGTERM) if step == terminate_at else None
    train(config, tmp_path, ContractBatches(config, 4), mesh=make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)),
          on_step_end=on_step_end)
    checkpointer = Checkpointer(tmp_path / "checkpoints", config)
    try:
        # Saved at every step (the minutes clock is always late). The signal came after step 3's
        # stop check, so step 4 is the one that saves and stops.
        assert checkpointer.all_steps() == [1, 2, 3, 4]
    finally:
        checkpointer.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert signal.getsignal(signal.SIGTERM) is previous_handler  # the run's handler is gone again


def test_the_host_reads_the_next_batch_while_a_step_runs(tmp_path):
    """Batch N+1 is read before step N's metrics (so the host's work overlaps the devices'); the
    loop waits for a step only at the first (compile time), a checkpoint and the last."""
    config = small_config("train.total_steps=6", "train.save_every_steps=3", "train.keep_last=10")
    ended: list[int] = []

    class Recorded(ContractBatches):
        seen: list[int] = []  # steps ended when each batch was read

        def __next__(self):
            self.seen.append(len(ended))
            return super().__next__()

    data, mesh = Recorded(config, 4), make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    train(config, tmp_path, data, mesh=mesh, on_step_end=ended.append)
    # Batch 1 before anything; batch 2 while step 1 runs; step 2's metrics are read only after
    # batch 4 is read; step 3 (checkpoint) waits; batches 5 and 6 are read before step 4 ends.
    assert data.seen == [0, 0, 1, 1, 3, 3]
    assert ended == [1, 2, 3, 4, 5, 6]
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    checkpointer = Checkpointer(tmp_path / "checkpoints", config)
    try:
        assert checkpointer.all_steps() == [3, 6]
        # The data position saved with step 3 is after step 3's batch, not the one read ahead.
        _, target = abstract_train_state(config, 6, mesh)
        assert checkpointer.restore(3, target)[1] == {"position": 12}
    finally:
        checkpointer.close()
