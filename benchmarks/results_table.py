"""The README's results table, written from one benchmark run's output.

    pytest benchmarks/ --benchmark-only -s 2>&1 | tee docs/benchmark_output.txt
    python benchmarks/results_table.py            # rewrites the table in README.md from that file
    python benchmarks/results_table.py --check    # exits 1 when README.md's table differs

The table sits between the two RESULTS markers of README.md; tests/test_docs_results.py checks
that it is the one this script writes, so the README's figures and docs/benchmark_output.txt
always come from the same run. A row whose benchmark line is missing from the output is left out.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "benchmark_output.txt"
README = ROOT / "README.md"
BEGIN = "<!-- RESULTS: written by python benchmarks/results_table.py from docs/benchmark_output.txt -->"
END = "<!-- /RESULTS -->"
HEADER = ["| what | ours | reference | ratio |", "|---|---|---|---|"]


def _dict_after(text: str, prefix: str) -> dict | None:
    """The dict printed on the line that starts with `prefix` (the benchmarks print `prefix: {...}`)."""
    match = re.search(rf"^{re.escape(prefix)}: (\{{.*\}})$", text, re.MULTILINE)
    return ast.literal_eval(match.group(1)) if match else None


def _lm_head(text: str) -> dict | None:
    match = re.search(
        r"^\[qwen0\.5b torch\.bfloat16 weight_grad=False\] fused (?P<fused>[\d.]+)s reference (?P<ref>[\d.]+)s "
        r"ratio (?P<ratio>[\d.]+) \|.*\| peak fused (?P<fused_mb>[\d.]+) MiB reference (?P<ref_mb>[\d.]+) MiB "
        r"ratio (?P<mem>[\d.]+)",
        text,
        re.MULTILINE,
    )
    return {k: float(v) for k, v in match.groupdict().items()} if match else None


def _g(value: float, digits: int = 3) -> str:
    """`value` to `digits` significant figures, without an exponent."""
    return f"{float(f'{value:.{digits}g}'):g}"


def _roofline(step: dict) -> str:
    """Ours' fraction of the GEMM roofline and, where the row has it, the ceiling: the fraction a
    step of nothing but its own GEMMs at torch's speed for their shapes would reach."""
    fraction = step.get("roofline_fraction")
    if fraction is None:
        return ""
    ceiling = step.get("roofline_ceiling")
    return f"; ours at {fraction:.2f} of the GEMM roofline" + (
        "" if ceiling is None else f" (its GEMMs alone at torch's speed: {ceiling:.2f})"
    )


def _step_bound(row: dict) -> str:
    """The speed-up with the LM-head op at that bound and the rest of ours' step as measured, and
    the speed-up of a step of ours that did nothing but its GEMMs at torch's speed."""
    out = f"; with the op at it, {row['step_bound']:.2f}x" if "step_bound" in row else ""
    return out + (f"; ours' GEMMs alone, {row['floor_bound']:.2f}x" if "floor_bound" in row else "")


def _published(seconds: float, row: dict) -> str:
    """The published step's cell: its time, the part of it spent in the kernel (faulting in its
    fresh fp32 logits and dense probabilities page by page: host-dependent) where the row has it,
    and its peak memory."""
    kernel = ""
    if "published_system_s" in row:
        kernel = (
            f" ({row['published_system_s']:.1f} CPU-s of it in the kernel, "
            f"{row['published_page_faults'] / 1e6:.2f} M page faults)"
        )
    return f"published recipe: {_g(seconds)} s{kernel}, {row['published_peak_MB']:.0f} MB"


def rows(text: str) -> list[str]:
    out = []
    attn = _dict_after(text, "qwen7b_L708 torch.bfloat16")
    if attn:
        out.append(
            "| attention-alignment loss, Qwen 7B last layer, L = 708, bf16 "
            f"| {_g(attn['fused_ms'])} ms, {_g(attn['fused_workspace_MB'], 2)} MB workspace "
            f"| {_g(attn['reference_ms'])} ms, {_g(attn['reference_workspace_MB'])} MB "
            f"| {attn['speedup']:.0f}x faster, {attn['workspace_ratio']:.3f} of the workspace |"
        )
    head = _lm_head(text)
    if head:
        out.append(
            "| LM-head losses, V = 151,936, N = 708, bf16 "
            f"| {_g(head['fused'])} s, {head['fused_mb']:.0f} MB | {_g(head['ref'])} s, {head['ref_mb']:.0f} MB "
            f"| {head['ratio']:.2f} of the time, {head['mem']:.3f} of the memory |"
        )
    published = _dict_after(text, "published trainable configuration, ours vs published")
    if published:
        out.append(
            "| whole training step with optimizer.step(), published trainable set (LoRA, merger, new rows), "
            f"Qwen 7B widths, 2 layers, L = {published['length']}, bf16 "
            f"| {_g(published['ours_s'])} s, {published['ours_peak_MB']:.0f} MB "
            f"| {_published(published['published_s'], published)} "
            f"| {published['speedup']:.1f}x faster, {published['memory_ratio']:.3f} of the memory |"
        )
    step = _dict_after(text, "ours vs published qwen7b_L1400")
    if step:
        out.append(
            "| whole step (forward + backward), embedding and head frozen, Qwen 7B attention and vocabulary, "
            f"2 layers, L = {step['length']} | {_g(step['ours_s'])} s, {step['ours_peak_MB']:.0f} MB "
            f"| {_published(step['published_s'], step)} "
            f"| {step['speedup']:.1f}x faster, {step['memory_ratio']:.2f} of the memory{_roofline(step)} |"
        )
    for shape in ("E24", "E96", "E384", "image1024"):
        row = _dict_after(text, f"answer length {shape}, ours vs published")
        if row:
            out.append(
                f"| whole step, bf16, \\|E\\| = {row['answer_rows']}, L = {row['length']}, Qwen 7B attention "
                f"and vocabulary, 2 layers | {_g(row['ours_s_median'])} s, {row['ours_peak_MB']:.0f} MB "
                f"| {_published(row['published_s_median'], row)} "
                f"| {_g(row['speedup'])}x faster (LM-head bound {row['bound']:.1f}x{_step_bound(row)}), "
                f"{row['memory_ratio']:.2f} of the memory |"
            )
    return out


def table(text: str) -> str:
    return "\n".join([BEGIN, *HEADER, *rows(text), END])


def readme_table(readme: str) -> str | None:
    """The table between the markers of `readme`, markers included; None without them."""
    if BEGIN not in readme or END not in readme:
        return None
    start = readme.index(BEGIN)
    return readme[start : readme.index(END, start) + len(END)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when README.md's table differs")
    args = parser.parse_args(argv)
    readme = README.read_text()
    current = readme_table(readme)
    if current is None:
        print(f"README.md: no {BEGIN} ... {END} block", file=sys.stderr)
        return 1
    wanted = table(OUTPUT.read_text())
    if args.check:
        return 0 if current == wanted else 1
    README.write_text(readme.replace(current, wanted))
    return 0


if __name__ == "__main__":
    sys.exit(main())
