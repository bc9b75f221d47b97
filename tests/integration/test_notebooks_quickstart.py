"""notebooks/quickstart.ipynb executes top to bottom (nbclient), so the walk-through cannot rot.

Slow (a Jupyter kernel start plus a short training run: ~40 s on a busy 2-core machine); the same path (train on
an already prepared cache with data=cached, export, reload) runs fast in
``tests/integration/test_train_pipeline.py::test_pretrain_on_prepared_cache_then_load_encoder``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "quickstart.ipynb"


@pytest.mark.parametrize("cwd", ["notebooks", "root"])
def test_quickstart_notebook_runs(cwd):
    """From its own folder (Jupyter's default) and from the project root."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    where = NOTEBOOK.parent if cwd == "notebooks" else NOTEBOOK.parents[1]
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(where)}})
    client.execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "embeddings: (4, " in outputs
    assert "12 steps" in outputs
    scratch = outputs.split("scratch folder: ", 1)[1].split("\n", 1)[0].strip()
    assert scratch and not Path(scratch).exists(), f"the notebook leaves its scratch folder {scratch}"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
