"""The memory planner (`python -m internvl_jax.plan`) on the shipped recipes' documented targets.

libtpu's XLA:TPU compiler compiles the real train step for TPU topologies on this CPU-only
machine. Each test lowers the real program here and reads the compiler's verdict for exactly that
program from `benchmarks/plans/` (recorded by `benchmarks/plan_recipes.py`, keyed by the lowered
StableHLO with its shardings, the topology and the compiler versions). A program that changed has
no record yet: it is compiled now (3-7 CPU minutes for a 2B step) and recorded, so the verdict is
never read for a program other than the one lowered (README, "Memory plans").
"""
import json
import pathlib
import sys

import pytest

pytest.importorskip("libtpu", reason="libtpu is not installed (pip install -e '.[tpu]')")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import plan_recipes  # noqa: E402

from internvl_jax import plan as planner  # noqa: E402
from internvl_jax.config import apply_overrides, load_config  # noqa: E402

TARGETS = {(t[0], t[2]): t for t in plan_recipes.TARGETS}


def plan_target(recipe: str, topology: str) -> dict:
    _, mode, _, overrides, _ = TARGETS[(recipe, topology)]
    return planner.plan(load_config(recipe, overrides), topology, mode, cache_dir=plan_recipes.RECORDED)


@pytest.fixture(scope="module")
def tiny_plan():
    return plan_target("tiny", "v5e:2x2")


def assert_fits(result: dict) -> None:
    per_device = result["per_device_bytes"]
    assert result["fits"], planner.format_plan(result)
    assert result["compiler_error"] is None and result["suggestions"] == []
    assert per_device["temps"] > 0 and per_device["params"] > 0 and per_device["optimizer"] > 0
    assert (per_device["compiler_total"] or per_device["total"]) <= result["hbm_bytes"]


def test_tiny_fits_v5e_2x2(tiny_plan):
    assert_fits(tiny_plan)
    assert tiny_plan["devices"] == 4 and tiny_plan["device_kind"] == "TPU v5 lite"
    assert tiny_plan["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    # The train loop's batch: 8 rows of 512 tokens, 512 // 16 tiles per row, over 4 devices.
    assert tiny_plan["shapes"] == {"grad_accum_steps": 1, "rows_per_micro_batch": 8, "rows_per_device": 2,
                                   "seq_len": 512, "tiles_per_micro_batch": 256}
    step = tiny_plan["programs"]["train_step"]
    # The donated state's outputs reuse its buffers: only the metrics are new outputs.
    assert step["arguments"] >= tiny_plan["per_device_bytes"]["params"] + tiny_plan["per_device_bytes"]["batch"]
    assert step["outputs"] - step["aliased"] < 2 ** 16


def test_json_output_and_exit_status(tiny_plan, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert planner.main(["--config", "tiny", "--topology", "v5e:2x2", "--json", str(out),
                         "--cache-dir", str(plan_recipes.RECORDED)]) == 0
    assert "verdict: FITS" in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert written["per_device_bytes"] == tiny_plan["per_device_bytes"]
    assert written["hbm_bytes"] == int(15.75 * 2 ** 30) and written["fits"] is True


@pytest.mark.timeout(1800)  # without a record of this program: a 2B compile, 3-7 CPU minutes
@pytest.mark.parametrize("recipe", ["mini_internvl_chat_2b_v1_5_pretrain", "mini_internvl_chat_2b_v1_5_finetune_lora"])
def test_2b_stage1_and_lora_fit_one_v5e_chip(recipe):
    result = plan_target(recipe, "v5e:1x1")
    assert_fits(result)
    assert result["devices"] == 1 and result["shapes"]["rows_per_device"] == 1


def test_2b_full_finetune_does_not_fit_one_v5e_chip():
    recipe = "mini_internvl_chat_2b_v1_5_finetune"
    result = plan_target(recipe, "v5e:1x1")
    assert not result["fits"]
    assert "RESOURCE_EXHAUSTED" in result["compiler_error"]
    # 2.2B trained float32 weights + two AdamW moments: 24.6 GiB before any activation.
    per_device = result["per_device_bytes"]
    assert per_device["params"] + per_device["optimizer"] > 24 * 2 ** 30
    assert per_device["compiler_total"] > result["hbm_bytes"]
    knobs = {s["knob"].split(" (")[0] for s in result["suggestions"]}
    assert {"FSDP width ×2", "LoRA", "global batch", "sequence length", "tiles per row"} <= knobs
    config = load_config(recipe, TARGETS[(recipe, "v5e:1x1")][3])
    for suggestion in result["suggestions"]:  # every suggestion names real config keys
        apply_overrides(config, suggestion["overrides"])
    assert "to make it fit" in planner.format_plan(result)


def test_serve_programs_lower_for_tpu():
    """Serving lowers prefill (with the splash ViT) and decode; the KV cache is counted per device."""
    config = planner.for_tpu(load_config("tiny"))
    target = planner.tpu_target("v5e:2x2")
    setup = planner.serve_setup(config, planner.target_mesh(config, target), planner.ServeRequest(batch=3))
    lowered = setup.lower()
    assert set(lowered) == {"prefill", "decode"} and "tpu_custom_call" in lowered["prefill"].as_text()
    # The splash kernel's serialized body names its source file in the venv; the plan cache's key
    # reads the kernel without locations, so another checkout finds the recorded plans.
    keyed = planner._portable_text(lowered["prefill"].as_text())
    assert "tpu.matmul" in keyed and "site-packages" not in keyed
    # 3 prompts of 6 tiles + thumbnail, 16 tokens per tile + 128 text tokens, bucketed.
    assert setup.shapes == {"batch": 4, "prompt_tokens": 256, "tiles": 32, "new_tokens": 1024}
    llm = config.model.llm
    cache = 2 * llm.num_layers * 4 * (256 + 1024) * llm.num_kv_heads * llm.resolved_head_dim * 4  # k, v float32
    assert setup.inputs["kv_cache"] == cache // 4  # rows over the 4 fsdp devices


@pytest.mark.parametrize("argv, message", [
    (["--topology", "v5e:3x3x3x3"], "--topology 'v5e:3x3x3x3'"),
    (["--topology", "v9z:2x2"], "--topology 'v9z:2x2'"),
    (["--topology", "v5e:2x2", "model.nope=1"], "unknown config key 'model.nope'"),
    (["--topology", "v5e:2x2", "mesh.fsdp=3"], "mesh.data/mesh.fsdp/mesh.tensor"),
    (["--topology", "v5e:2x2", "train.grad_accum_steps=3"], "train.global_batch_size 8"),
])
def test_bad_arguments_are_named(argv, message, capsys):
    assert planner.main(["--config", "tiny"] + argv) == 2
    assert message in capsys.readouterr().err


def test_benchmark_quick_prints_the_tiny_row(tiny_plan, capsys):
    plan_recipes.main(["--quick"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny ")]
    assert len(rows) == 1 and "| fits |" in rows[0]
