"""The LM-head op with override rows never writes the frozen weight: not even for the duration
of the call. A weight in read-only memory (a PROT_READ mapping, where any write is a crash) gives
the losses and gradients, the weight's bytes and version counter are unchanged, and under
torch.compile a tied embedding read in the same compiled step sees the frozen values."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import crystal_ext
from crystal_ext.ops import reference
from crystal_ext.ops.lm_head_plan import lm_head_plan

pytestmark = pytest.mark.skipif(
    not crystal_ext.extension_available(), reason="compiled extension unavailable"
)


def _problem(seed=0, n=19, hd=7, vocab=53):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[[1, 4]] = vocab - 1
    targets[[2]] = -100
    return dict(
        hidden=torch.randn(n, hd, generator=g),
        weight=torch.randn(vocab, hd, generator=g) / hd**0.5,
        targets=targets,
        teacher_rows=torch.tensor([0, 3, 5, 8]),
        student_rows=torch.tensor([9, 10, 11, 12]),
        pair_sample=torch.tensor([0, 0, 1, 1]),
        override_ids=torch.tensor([vocab - 1, 0, 30]),
        override_rows=torch.randn(3, hd, generator=g),
    )


def _losses(fn, prob, weight):
    hidden = prob["hidden"].clone().requires_grad_()
    rows = prob["override_rows"].clone().requires_grad_()
    ce, kl = fn(
        hidden, weight, prob["targets"], prob["teacher_rows"], prob["student_rows"], prob["pair_sample"], 0.5,
        override_ids=prob["override_ids"], override_rows=rows, logit_scale=0.8, logit_softcap=3.0,
    )  # fmt: skip
    (ce + 2 * kl).backward()
    return ce.detach(), kl.detach(), hidden.grad, rows.grad


def test_weight_bytes_and_version_are_unchanged():
    prob = _problem()
    weight = prob["weight"].clone()
    before, version = weight.clone(), weight._version
    got = _losses(crystal_ext.lm_head_losses, prob, weight)
    assert torch.equal(weight, before) and weight._version == version
    for a, b in zip(got, _losses(reference.lm_head_losses, prob, prob["weight"])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# Runs in a child process: a write into the read-only mapping kills it (SIGSEGV), which the
# parent reports as a failure instead of crashing the test session.
_READ_ONLY_RUN = textwrap.dedent(
    """
    import sys, numpy as np, torch, warnings
    sys.path.insert(0, {tests!r})
    import crystal_ext
    from test_lm_head_override_frozen_weight import _losses, _problem
    prob = _problem()
    np.asarray(prob["weight"].numpy()).tofile({path!r})
    mapped = np.memmap({path!r}, dtype=np.float32, mode="r", shape=tuple(prob["weight"].shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that the array is not writable: the point
        weight = torch.from_numpy(mapped)
    got = _losses(crystal_ext.lm_head_losses, prob, weight)
    torch.save(got, {out!r})
    """
)


def test_a_weight_in_read_only_memory_works(tmp_path):
    """The weight as a read-only view of a PROT_READ file mapping: any write, even one undone
    right after, ends the process; the op must finish and give the in-memory weight's results."""
    script = _READ_ONLY_RUN.format(
        tests=str(Path(__file__).parent),
        path=str(tmp_path / "weight.bin"),
        out=str(tmp_path / "out.pt"),
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (
        f"the op wrote into the frozen weight (exit {done.returncode}): {done.stderr[-2000:]}"
    )
    got = torch.load(tmp_path / "out.pt")
    prob = _problem()
    for a, b in zip(got, _losses(crystal_ext.lm_head_losses, prob, prob["weight"])):
        assert torch.equal(a, b)


def test_tied_embedding_read_in_the_same_compiled_step_sees_the_frozen_values():
    """The embedding matrix is also the head (tied): a compiled step that looks up the override
    tokens' embeddings before and after the LM-head op reads the frozen rows both times."""
    torch._dynamo.reset()
    prob = _problem()
    weight = prob["weight"].clone()
    ids = prob["override_ids"]
    plan = lm_head_plan(
        prob["targets"], prob["teacher_rows"], prob["student_rows"], prob["pair_sample"], 0.5,
        prob["hidden"].shape[0], weight.shape[0], "cpu",
    )  # fmt: skip

    def step(hidden, rows):
        before = F.embedding(ids, weight)
        ce, kl = crystal_ext.lm_head_losses(hidden, weight, plan, override_ids=ids, override_rows=rows)
        after = F.embedding(ids, weight)
        return ce + kl, before, after

    hidden = prob["hidden"].clone().requires_grad_()
    rows = prob["override_rows"].clone().requires_grad_()
    loss, before, after = torch.compile(step, backend="aot_eager", fullgraph=True)(hidden, rows)
    loss.backward()
    frozen = prob["weight"][ids]
    assert torch.equal(before, frozen) and torch.equal(after, frozen)
    assert torch.equal(weight, prob["weight"])
    eager_hidden = prob["hidden"].clone().requires_grad_()
    eager_rows = prob["override_rows"].clone().requires_grad_()
    eager_loss, *_ = step(eager_hidden, eager_rows)
    eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(rows.grad, eager_rows.grad)
    torch.testing.assert_close(hidden.grad, eager_hidden.grad)
