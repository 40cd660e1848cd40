"""notebooks/quickstart.ipynb executed cell by cell (nbclient, a real Jupyter kernel) on the demo model.

The settings cell (tagged ``parameters``) is the only one changed: a work folder under tmp and a short
run, so the notebook's own code is what runs and it cannot rot unnoticed.
"""

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
# A short run: enough steps to log, evaluate and plot; the demo's other settings are the notebook's own.
SHORT = ["train.max_steps=10", "train.logging_steps=5", "train.eval_loss_steps=5", "train.warmup_steps=2",
         "train.save_steps=10", "eval.num_examples=6"]


def test_notebook_is_committed_clean():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), (
        "clear the notebook's outputs before committing")
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "USE_REAL_MODEL = False" in params[0].source
    assert "colab-badge.svg" in nb.cells[0].source


def test_notebook_runs_on_the_demo_model(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source = params.source.replace('WORK_DIR = "outputs/quickstart"', f'WORK_DIR = "{tmp_path / "work"}"')
    params.source = params.source.replace("OVERRIDES = []", f"OVERRIDES = {SHORT!r}")
    assert str(tmp_path) in params.source and "max_steps=10" in params.source

    # The kernel imports this checkout's loralab (PYTHONPATH is inherited), offline as every test is.
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")  # plots inline, as in Jupyter
        client.execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the training curves and the flow diagram, inline
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "LoRA: r=16" in text and "rougeL" in text and "--- helped most" in text
    run_dir = tmp_path / "work" / "runs" / "demo"
    assert (run_dir / "report.html").is_file() and (run_dir / "eval_results.csv").is_file()
    assert "train: 10 steps" in text
