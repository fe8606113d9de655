"""The README's results table and docs/benchmark_output.txt come from the same benchmark run:
the table is the one benchmarks/results_table.py writes from that file."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _results_table():
    spec = importlib.util.spec_from_file_location("results_table", ROOT / "benchmarks" / "results_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_results_table_is_written_from_the_benchmark_output():
    rt = _results_table()
    readme = (ROOT / "README.md").read_text()
    current = rt.readme_table(readme)
    assert current is not None, "README.md lost its RESULTS markers"
    assert current == rt.table((ROOT / "docs" / "benchmark_output.txt").read_text()), (
        "README.md's results table differs from docs/benchmark_output.txt: run python benchmarks/results_table.py"
    )
    assert len(current.splitlines()) >= 2 + 2 + 3  # markers, header, at least the three op/step rows


def test_every_figure_of_a_row_comes_from_its_benchmark_line():
    """A planted number in the output moves the README's table: the rows are read, not copied."""
    rt = _results_table()
    text = (ROOT / "docs" / "benchmark_output.txt").read_text()
    step = re.search(
        r"^ours vs published qwen7b_L1400: \{'length': 1317, 'ours_s': ([\d.]+),", text, re.MULTILINE
    )
    assert step, "the whole-step line of L 1317 is missing from docs/benchmark_output.txt"
    ours = float(step.group(1))
    changed = rt.table(
        text.replace(step.group(0), step.group(0).replace(f"'ours_s': {step.group(1)},", "'ours_s': 1.234,"))
    )
    peak = rt._dict_after(text, "ours vs published qwen7b_L1400")["ours_peak_MB"]
    assert f"| 1.23 s, {peak:.0f} MB |" in changed and f"{ours:.3g} s, {peak:.0f} MB" not in changed
    planted = (
        "published trainable configuration, ours vs published: {'length': 685, 'ours_s': 11.5, "
        "'published_s': 34.7, 'speedup': 3.01, 'ours_peak_MB': 491.0, 'published_peak_MB': 9375.0, "
        "'memory_ratio': 0.052}"
    )
    text = re.sub(r"^published trainable configuration, ours vs published: .*$", "", text, flags=re.MULTILINE)
    row = [r for r in rt.rows(text + "\n" + planted + "\n") if "published trainable set" in r]
    assert len(row) == 1 and re.search(
        r"\| 11\.5 s, 491 MB \| published recipe: 34\.7 s, 9375 MB \| 3\.0x", row[0]
    )
