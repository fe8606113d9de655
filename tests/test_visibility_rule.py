"""The dual-path visibility rule of docs/method.md, written out by hand segment pair by segment
pair, against the dense mask (`dual_path_mask`) and against what the gathered attention
(`dual_path_attention`) actually reads. Both of those are built from the package's own
definition of the paths; this table is not, so a rule that is wrong in both places fails here."""

from __future__ import annotations

import pytest
import torch

from crystal_ext.model.dual_path_attention import dual_path_attention
from crystal_ext.ops.layout import dual_path_mask, segment_bounds

# Row = the query's segment, column = the key's segment ("-" is padding after F).
#   all    : the row sees every key of that segment
#   causal : the row sees the keys of its own segment at or before it
#   .      : the row sees none of them
# From docs/method.md: path 1 is [A, C, D, E], path 2 is [A, B, D, F], a row sees its own path's
# keys at or before it. So B never sees C; C, D and E never see B; F never sees C or E; padding
# takes part in nothing.
RULE = """
        A       B       C       D       E       F       -
A       causal  .       .       .       .       .       .
B       all     causal  .       .       .       .       .
C       all     .       causal  .       .       .       .
D       all     .       all     causal  .       .       .
E       all     .       all     all     causal  .       .
F       all     all     .       all     .       causal  .
-       .       .       .       .       .       .       .
"""


def _rule_table() -> dict[tuple[str, str], str]:
    lines = [line.split() for line in RULE.strip().splitlines()]
    columns = lines[0]
    return {(row[0], col): cell for row in lines[1:] for col, cell in zip(columns, row[1:])}


def _segment_names(sizes, length) -> list[str]:
    names = [name for name, size in zip("ABCDEF", sizes) for _ in range(size)]
    return names + ["-"] * (length - len(names))


def _expected_mask(sizes, length) -> torch.Tensor:
    """[length, length] bool: the hand-written table expanded to positions."""
    table = _rule_table()
    names = _segment_names(sizes, length)
    mask = torch.zeros(length, length, dtype=torch.bool)
    for r, row_seg in enumerate(names):
        for c, col_seg in enumerate(names):
            cell = table[(row_seg, col_seg)]
            mask[r, c] = cell == "all" or (cell == "causal" and c <= r)
    return mask


# (sizes of A..F, padded length): every segment at least two long, then a layout with a
# one-token A and D and no padding, batched together so one sample's rule cannot leak into the other.
LAYOUTS = [([2, 2, 2, 2, 2, 2], 14), ([1, 3, 3, 1, 2, 2], 12)]


def _batch():
    length = max(n for _, n in LAYOUTS)
    layout = torch.tensor([segment_bounds(sizes) for sizes, _ in LAYOUTS], dtype=torch.long)
    expected = torch.stack([_expected_mask(sizes, length) for sizes, _ in LAYOUTS])
    return layout, length, expected


def test_table_states_the_rules_of_the_method_page():
    table = _rule_table()
    forbidden = [("B", "C"), ("C", "B"), ("D", "B"), ("E", "B"), ("F", "C"), ("F", "E")]
    for row, col in forbidden:
        assert table[(row, col)] == ".", (row, col)
    assert table[("F", "D")] == "all" and table[("F", "B")] == "all"  # the corrupted path reads the latents


def test_dense_mask_equals_the_hand_written_rule():
    layout, length, expected = _batch()
    got = dual_path_mask(layout, length)
    for b in range(len(LAYOUTS)):
        wrong = (got[b] != expected[b]).nonzero().tolist()
        names = _segment_names(LAYOUTS[b][0], length)
        assert not wrong, "row/column segment pairs that differ: " + ", ".join(
            f"{names[r]}{r}->{names[c]}{c} (mask {bool(got[b, r, c])})" for r, c in wrong[:12]
        )


@pytest.mark.parametrize("perturb", ["v", "k"])
def test_attention_reads_exactly_the_keys_of_the_rule(perturb):
    """Row r of the attention output depends on key column c iff the rule lets r see c: change
    one column's key or value and see which rows' outputs move (exactly zero change otherwise)."""
    layout, length, expected = _batch()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(len(LAYOUTS), 2, length, 8, generator=g, dtype=torch.float64) for _ in range(3))
    base = dual_path_attention(q, k, v, layout)
    reads = torch.zeros(len(LAYOUTS), length, length, dtype=torch.bool)
    for c in range(length):
        k2, v2 = k.clone(), v.clone()
        changed = {"v": v2, "k": k2}[perturb]
        changed[:, :, c] += torch.randn(changed[:, :, c].shape, generator=g, dtype=torch.float64)
        out = dual_path_attention(q, k2, v2, layout)
        reads[:, :, c] = (out - base).abs().amax(dim=(1, 3)) > 0  # [batch, rows]
    for b in range(len(LAYOUTS)):
        names = _segment_names(LAYOUTS[b][0], length)
        # A row with a single visible key gives it probability 1 whatever that key is.
        check = expected[b] if perturb == "v" else expected[b] & (expected[b].sum(-1, keepdim=True) > 1)
        wrong = (reads[b] != check).nonzero().tolist()
        assert not wrong, "row/column pairs read against the rule: " + ", ".join(
            f"{names[r]}{r}->{names[c]}{c} (read {bool(reads[b, r, c])})" for r, c in wrong[:12]
        )
