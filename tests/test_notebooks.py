"""The Colab notebooks in notebooks/ run headless on CPU (nbclient) with tiny parameters.

Each notebook runs top to bottom in a kernel of this interpreter, with an extra cell after its
`parameters` cell (papermill style) that sets the tiny values. A cell that raises fails the test
(CellExecutionError), and so does a code cell left unexecuted. The install cell finds the package
already importable and installs nothing. The kernel shares the suite's compilation cache and fake
device count, so the tiny end-to-end run reuses test_demo's compiled programs.
"""
import os
import re
import sys

import jax
import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO
from data_fixtures import synthetic_meta  # noqa: F401  (fixture)
from test_chat import BRIEF, image, tokenizer, tokenizer_dir  # noqa: F401  (fixtures: a tokenizer covering every id)

NOTEBOOKS = REPO / "notebooks"


def run_notebook(name: str, parameters: dict, cwd, **env) -> str:
    """Executes notebooks/<name> in `cwd` with `parameters` overriding its parameters cell and `env` added
    to the kernel's environment; returns the text the notebook printed."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    tagged = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: expected one cell tagged 'parameters', found {len(tagged)}"
    assert notebook.cells[0].cell_type == "markdown" and "pip" in notebook.cells[1].source, \
        f"{name}: the first code cell must install the environment"
    lines = ["import sys", f"assert sys.prefix == {sys.prefix!r}, sys.prefix  # a kernel of this environment"]
    lines += [f"{key} = {value!r}" for key, value in parameters.items()]
    notebook.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell("\n".join(lines),
                                                                   metadata={"tags": ["injected-parameters"]}))
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0", **env}
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}})
    client.execute(env=env)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code), f"{name}: a code cell did not run"
    assert not [o for cell in code for o in cell.outputs if o.output_type == "error"]
    return "".join(output.get("text", "") for cell in code for output in cell.outputs
                   if output.output_type == "stream" and output.name == "stdout")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model, tokenizer):
    """The tiny random model exported as an official HF checkpoint with the tokenizer."""
    from internvl_jax.convert.export import export_model
    return export_model(tiny_model, tmp_path_factory.mktemp("notebooks") / "ckpt", tokenizer=tokenizer)


def test_inference(checkpoint, image, tmp_path):
    image.save(tmp_path / "image.png")
    # A one-tile image and a brief system message: both turns reuse the programs test_chat compiled.
    text = run_notebook("inference.ipynb", dict(CHECKPOINT=str(checkpoint), IMAGE=str(tmp_path / "image.png"),
                                                MAX_NEW_TOKENS=4, DTYPE=None, SYSTEM_MESSAGE=BRIEF), tmp_path)
    assert "internlm2 LLM" in text
    assert len(re.findall(r"^Assistant: ", text, re.MULTILINE)) == 2 and "[2 turns]" in text, text


def test_lora_finetune_and_resume(checkpoint, synthetic_meta, image, tmp_path):  # noqa: F811
    image.save(tmp_path / "image.png")  # one tile: the chat reuses the generation programs test_chat compiled
    overrides = ["model.lora.rank=4", "model.lora.alpha=8", "train.stage=finetune_lora",
                 "train.trainable=language_model", "train.total_steps=3", "train.global_batch_size=2",
                 "train.max_seq_length=256", "data.max_tiles_per_row=8", "data.num_workers=0",
                 "train.group_by_length=false", "train.save_every_steps=0"]
    text = run_notebook("lora_finetune.ipynb", dict(
        CHECKPOINT=str(checkpoint), META_PATH=str(synthetic_meta), WORKDIR=str(tmp_path / "run"), CONFIG="tiny",
        OVERRIDES=overrides, SESSION_STEPS=2, EXPORT_DIR=str(tmp_path / "merged"), EXPORT_DTYPE="float32",
        TEST_IMAGE=str(tmp_path / "image.png"), QUESTION="what is it?", MAX_NEW_TOKENS=4), tmp_path)
    assert "LoRA rank 4" in text
    saved = int(re.search(r"started at step 0; saved step (\d+)", text)[1])
    resumed_from, now = map(int, re.search(r"resumed from step (\d+); now at step (\d+)", text).groups())
    assert saved == resumed_from == 2 and now == 3 > saved, text
    assert (tmp_path / "merged" / "config.json").exists()
    assert re.search(r"^Assistant: ", text, re.MULTILINE), text


def test_tiny_end_to_end(tmp_path):
    text = run_notebook("tiny_end_to_end.ipynb", dict(SCHEDULE="quick"), tmp_path)
    assert re.search(r"^overall accuracy \d+\.\d% \(blank-image control \d+\.\d%\)$", text, re.MULTILINE), text
    assert "blank-image control" in text and (tmp_path / "tiny_run" / "stage2" / "metrics.jsonl").exists()
