"""`make train-tpu` drives gcloud correctly: checked with a fake gcloud that records its arguments."""
import os
import pathlib
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_launch(tmp_path, describe_exit: int, **env):
    log = tmp_path / "gcloud.log"
    fake = tmp_path / "bin" / "gcloud"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\ncase "$*" in *" describe "*) exit {describe_exit};; esac\n')
    fake.chmod(0o755)
    environment = dict(os.environ, PATH=f"{fake.parent}:{os.environ['PATH']}", PROJECT="proj",
                       WORKDIR="gs://bucket/run", CONFIG="tiny", OVERRIDES="train.total_steps=3", **env)
    result = subprocess.run(["bash", "launch/train_tpu.sh"], cwd=REPO, env=environment, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return log.read_text().splitlines() if log.exists() else [], result.stdout


def test_creates_syncs_installs_and_runs_on_all_workers(tmp_path):
    calls, _ = run_launch(tmp_path, describe_exit=1)
    assert any(" describe internvl-jax" in c for c in calls)
    assert any(" create internvl-jax --accelerator-type=v5litepod-8" in c for c in calls)
    scp = [c for c in calls if " scp " in c]
    ssh = [c for c in calls if " ssh " in c]
    assert scp and all("--worker=all" in c for c in scp + ssh)
    assert "pip install" in ssh[0] and "constraints.txt" in ssh[0]
    assert "-m internvl_jax.distributed --distributed" in ssh[1]  # the start-up self-test, before training
    assert "-m internvl_jax.train --distributed --config tiny --workdir gs://bucket/run train.total_steps=3" in ssh[2]


def test_reuses_an_existing_vm(tmp_path):
    calls, _ = run_launch(tmp_path, describe_exit=0)
    assert not any(" create " in c for c in calls)


def test_dry_run_prints_instead_of_running(tmp_path):
    calls, out = run_launch(tmp_path, describe_exit=1, DRY_RUN="1")
    assert calls == []
    assert "tpu-vm" in out and "create" in out and "--worker=all" in out
