#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: create (or reuse) it, copy this checkout to every worker,
# install the pinned environment there, start the same train command on all workers, stream logs.
#
#   make train-tpu PROJECT=my-proj ZONE=us-west4-a ACCELERATOR=v5litepod-8 \
#       CONFIG=mini_internvl_chat_2b_v1_5_finetune_lora WORKDIR=gs://bucket/runs/lora \
#       OVERRIDES="data.meta_path=gs://bucket/meta.json data.tokenizer_path=gs://bucket/ckpt"
#
# DRY_RUN=1 prints every command instead of running it. STOP=1 deletes the TPU VM afterwards.
set -euo pipefail

PROJECT=${PROJECT:?set PROJECT (gcloud project id)}
ZONE=${ZONE:-us-west4-a}
TPU_NAME=${TPU_NAME:-internvl-jax}
ACCELERATOR=${ACCELERATOR:-v5litepod-8}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5-lite}
CONFIG=${CONFIG:-mini_internvl_chat_2b_v1_5_finetune}
WORKDIR=${WORKDIR:?set WORKDIR (a gs:// path every worker can write)}
OVERRIDES=${OVERRIDES:-}
REMOTE_DIR=${REMOTE_DIR:-internvl-jax}
DRY_RUN=${DRY_RUN:-0}
STOP=${STOP:-0}

run() {
  if [[ $DRY_RUN == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

tpu=(gcloud compute tpus tpu-vm --project="$PROJECT" --zone="$ZONE")

if [[ $DRY_RUN == 1 ]] || ! "${tpu[@]}" describe "$TPU_NAME" >/dev/null 2>&1; then
  run "${tpu[@]}" create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
fi

archive=$(mktemp --suffix=.tar.gz)
trap 'rm -f "$archive"' EXIT
run git archive --format=tar.gz -o "$archive" HEAD
run "${tpu[@]}" scp "$archive" "$TPU_NAME:internvl-jax.tar.gz" --worker=all
run "${tpu[@]}" ssh "$TPU_NAME" --worker=all --command="mkdir -p $REMOTE_DIR && tar -xzf internvl-jax.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e '.[tpu,gcs]'"
# Start-up self-test on every worker (rendezvous, jax.distributed, an all-gather over every chip):
# a worker that does not come up is named within the timeout instead of the others hanging.
run "${tpu[@]}" ssh "$TPU_NAME" --worker=all --command="cd $REMOTE_DIR && .venv/bin/python -m internvl_jax.distributed --distributed"
# Every worker runs the same command; jax.distributed finds its peers from the TPU metadata.
run "${tpu[@]}" ssh "$TPU_NAME" --worker=all --command="cd $REMOTE_DIR && .venv/bin/python -m internvl_jax.train --distributed --config $CONFIG --workdir $WORKDIR $OVERRIDES"

if [[ $STOP == 1 ]]; then
  run "${tpu[@]}" delete "$TPU_NAME" --quiet
fi
