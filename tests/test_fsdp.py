"""FSDP on the CPU (gloo, 2 processes): the CrystaL objective with LoRA and the new tokens' rows
gives the single-process losses over 10 steps (tests/fsdp_objective_run.py), and what the
Trainer's `--fsdp` flag does on a CPU."""

from __future__ import annotations

import json
import sys

import pytest
from train_helpers import FAST, ROOT, run

import crystal_ext

pytestmark = pytest.mark.skipif(
    not crystal_ext.extension_available(), reason="the objective runs the compiled fused ops"
)

SCRIPT = str(ROOT / "tests" / "fsdp_objective_run.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def test_fsdp_full_shard_matches_one_process_over_ten_steps(tmp_path):
    run([str(tmp_path / "fsdp.json")], prefix=TORCHRUN + [SCRIPT], timeout=300)
    run([str(tmp_path / "single.json")], prefix=[sys.executable, SCRIPT], timeout=300)
    sharded = json.loads((tmp_path / "fsdp.json").read_text())
    single = json.loads((tmp_path / "single.json").read_text())
    assert sharded["fsdp_units"] > 1  # the decoder layers and vision blocks were wrapped on their own
    assert len(sharded["losses"]) == len(single["losses"]) == 10
    assert sharded["losses"][-1] < sharded["losses"][0]
    for a, b in zip(sharded["losses"], single["losses"]):
        assert a == pytest.approx(b, rel=1e-5)


RECORD_WRAPPER = """
import os, sys
from crystal_ext.train import main
from crystal_ext.training.trainer import CrystalTrainer

original = CrystalTrainer.compute_loss

def compute_loss(self, model, inputs, *args, **kwargs):
    path = os.path.join(self.args.output_dir, f"wrapper_rank{self.args.process_index}.txt")
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write(type(model).__name__)
    return original(self, model, inputs, *args, **kwargs)

CrystalTrainer.compute_loss = compute_loss
main(sys.argv[1:])
import torch.distributed as dist
rank = os.environ["RANK"]
with open(os.path.join(sys.argv[sys.argv.index("--output_dir") + 1], f"group_after_main_rank{rank}.txt"), "w") as f:
    f.write(str(dist.is_initialized()))
"""


def test_trainer_fsdp_flag_on_the_cpu(tmp_path):
    """`--fsdp "full_shard auto_wrap"` through the Trainer: accelerate (1.x) turns FSDP on only
    for accelerator devices and wraps a CPU/gloo model in DDP instead, without an error. The run
    still trains (LoRA and the new rows) on two ranks; whether it was FSDP is checked, and the
    test skips with the reason when it was not."""
    script = tmp_path / "record.py"
    script.write_text(RECORD_WRAPPER)
    out = tmp_path / "run"
    args = ["--use_lora", "true", "--max_steps", "2", "--per_device_train_batch_size", "2"]
    args += ["--fsdp", "full_shard auto_wrap", "--save_strategy", "no", "--output_dir", str(out), *FAST]
    run(args, prefix=TORCHRUN + [str(script)], timeout=300)
    # main() closed the process group it set up, on both ranks (left to the interpreter's exit,
    # a rank could abort there after a finished run).
    assert [(out / f"group_after_main_rank{r}.txt").read_text() for r in (0, 1)] == ["False", "False"]
    wrapper = (out / "wrapper_rank0.txt").read_text()
    if wrapper != "FullyShardedDataParallel":
        pytest.skip(
            f"the Trainer's --fsdp does not shard on the CPU: accelerate wrapped the model in {wrapper} "
            "(it enables FSDP only for GPU-type devices); FSDP itself on the CPU is tested above"
        )
