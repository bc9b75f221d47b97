"""notebooks/explain.ipynb executes top to bottom (nbclient) on a real PTB-XL record, so the walk-through cannot rot.

Slow (a Jupyter kernel start plus a short training of the demo classifier on 352 PTB-XL records: about a minute on
a busy 2-core machine); the same path (classifier folder -> explain_records -> figures + report, on real PTB-XL
fixture records) runs fast in ``tests/integration/test_explain_entry.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "explain.ipynb"


@pytest.mark.slow   # ~40 s with the kernel start (docs/EXPLAIN.md: opt-in); the explain chain it walks has fast tests
@pytest.mark.realdata
def test_explain_notebook_runs(shared_data):
    if not (shared_data / "ptbxl" / "records100").is_dir():
        pytest.skip(f"PTB-XL not found under {shared_data}")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "macro AUROC" in text or "loaded" in text
    assert "deletion AOPC" in text and "'valid'" in text
    assert "ptbxl_00180_chart_occlusion.png" in text and "report.json" in text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in
              o.get("data", {})]
    assert len(images) >= 3
