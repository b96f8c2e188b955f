# internvl-jax: every target creates the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt
# One persistent XLA compilation cache shared by every process of a run.
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.cache/jax
# Two workers: XLA compiles on one core each; a file's tests share a worker (and its module fixtures).
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: venv venv-test test demo lint validate-data train-tpu plan clean

$(VENV)/.runtime: setup.cfg constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(PIP) -e '.[test,tpu]'
	touch $@

venv: $(VENV)/.runtime
venv-test: $(VENV)/.test

test: venv-test
	$(PY) -m pytest $(PYTEST_ARGS)

demo: venv
	$(PY) -m internvl_jax.demo

# Data report: make validate-data META=path/meta.json TOKENIZER=path/to/tokenizer_dir [VALIDATE_ARGS=...]
validate-data: venv
	$(PY) -m internvl_jax.data.validate $(META) --tokenizer $(TOKENIZER) $(VALIDATE_ARGS)

# Memory plan, compiled here for a TPU topology with libtpu (the tpu extra):
# make plan CONFIG=mini_internvl_chat_2b_v1_5_finetune_lora TOPOLOGY=v5e:1x1 PLAN_ARGS="train.grad_accum_steps=16 [--mode serve] [--json plan.json]"
plan: venv-test
	$(PY) -m internvl_jax.plan --config $(CONFIG) --topology $(TOPOLOGY) $(PLAN_ARGS)

lint: venv-test
	$(PY) -m compileall -q internvl_jax tests benchmarks configs

train-tpu:
	bash launch/train_tpu.sh

clean:
	rm -rf $(VENV) .cache .pytest_cache
