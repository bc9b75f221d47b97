"""scripts/benchmark_real.py's report stage rewrites the generated block of docs/BENCHMARK.md (and nothing else)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("benchmark_real_doc", ROOT / "scripts" / "benchmark_real.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_block_is_replaced_between_the_markers(tmp_path):
    mod = _script()
    doc = tmp_path / "BENCHMARK.md"
    doc.write_text(f"intro\n{mod.RESULTS_START}\nold numbers\n{mod.RESULTS_END}\nafter\n")
    results = tmp_path / "results.md"
    results.write_text("## Acceptance (issue 12), computed from the cells\n\nMISSED: x\n\n"
                       "## macro_auroc | task t | dataset d | split test (n = 5 records)\n\n| a |\n\n"
                       "## macro_f1 | task t | dataset d | split test (n = 5 records)\n\n| f1 |\n")
    curve = tmp_path / "learning_curve.md"
    curve.write_text("# Learning curve\n\n| step | auroc |\n")
    mod.update_benchmark_doc(doc, results, curve)
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("after\n") and "old numbers" not in text
    assert "#### Acceptance (issue 12)" in text and "#### macro_auroc | task t" in text and "MISSED: x" in text
    assert "macro_f1" not in text                       # the full tables stay in real_results.md
    assert "| step | auroc |" in text and "\n# Learning curve" not in text
    mod.update_benchmark_doc(doc, results, None)        # idempotent: one block, rewritten
    assert doc.read_text().count(mod.RESULTS_START) == 1 and "| step | auroc |" not in doc.read_text()


def test_a_document_without_markers_is_left_alone(tmp_path):
    mod = _script()
    doc = tmp_path / "BENCHMARK.md"
    doc.write_text("no markers\n")
    (tmp_path / "results.md").write_text("## Acceptance\n")
    mod.update_benchmark_doc(doc, tmp_path / "results.md", None)
    assert doc.read_text() == "no markers\n"
