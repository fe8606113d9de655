"""`python -m crystal_ext.train`: the default run end to end, torchrun with 2 processes (gloo),
kill-and-resume (SIGKILL during a checkpoint save), and argument validation."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from train_helpers import FAST, loss_at, metrics, run

import crystal_ext

pytestmark = pytest.mark.skipif(
    not crystal_ext.extension_available(), reason="training runs the compiled fused ops"
)


def test_default_run_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = run(
        [
            "--max_steps",
            "24",
            "--save_steps",
            "12",
            "--logging_steps",
            "6",
            "--eval_examples",
            "12",
            "--num_pictures",
            "2",
            "--output_dir",
            str(out),
        ]
    )
    # checkpoints, each complete; the final model at the top
    for step in (12, 24):
        ckpt = out / f"checkpoint-{step}"
        assert (ckpt / "crystal_checkpoint_complete.json").is_file()
        assert (ckpt / "model.safetensors").is_file() and (ckpt / "optimizer.pt").is_file()
    assert (out / "model.safetensors").is_file() and (out / "crystal_config.json").is_file()
    # metrics: JSONL with the objective's parts, and TensorBoard event files
    train_logs = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in train_logs] == [6, 12, 18, 24]
    for r in train_logs:
        assert {"ce", "kl_pred", "kl_attn", "learning_rate"} <= set(r)
        assert abs(r["loss"] - (r["ce"] + r["kl_pred"] + r["kl_attn"])) < 1e-3 * max(1.0, r["loss"])
    assert train_logs[-1]["ce"] < train_logs[0]["ce"]
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    # evaluation and pictures
    result = json.loads((out / "eval_results.json").read_text())
    assert result["n"] == 12 and len(result["examples"]) == 12
    for name in ("intact", "blurred", "latent_carried"):  # the share of its examples answered right
        right = sum(r[name] == r["answer"] for r in result["examples"])
        assert result[f"accuracy_{name}"] == pytest.approx(right / 12)
    assert (
        f"intact {result['accuracy_intact']:.3f}, blurred {result['accuracy_blurred']:.3f}, "
        f"latent-carried {result['accuracy_latent_carried']:.3f}" in proc.stdout
    )
    pictures = sorted((out / "pictures").glob("*.png"))
    assert len(pictures) == 2
    with Image.open(pictures[0]) as im:
        assert im.format == "PNG" and im.width > 300
    # it ends by saying where everything is
    for needle in ("held-out accuracy", "checkpoints:", "metrics.jsonl", "tensorboard", "pictures:"):
        assert needle in proc.stdout
    assert str(pictures[0]) in proc.stdout or pictures[0].name in proc.stdout


RECORD_PARAMETERS = """
import os, sys
import torch
from transformers import TrainerCallback
import crystal_ext.training.trainer as trainer_module
from crystal_ext.train import main

seen = []  # a fingerprint of every training batch this rank computed a loss on
compute_loss = trainer_module.CrystalTrainer.compute_loss


def recording_compute_loss(self, model, inputs, *args, **kwargs):
    if model.training and "input_ids" in inputs:
        seen.append(inputs["input_ids"].tolist())
    return compute_loss(self, model, inputs, *args, **kwargs)


trainer_module.CrystalTrainer.compute_loss = recording_compute_loss


class RecordParameters(TrainerCallback):
    # Each rank saves its parameters before and after training, and the batches it trained on.
    def _save(self, args, model, when):
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        torch.save(params, os.path.join(args.output_dir, f"params_{when}_rank{args.process_index}.pt"))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._save(args, model, "begin")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._save(args, model, "end")
        torch.save(seen, os.path.join(args.output_dir, f"batches_rank{args.process_index}.pt"))

main(sys.argv[1:], extra_callbacks=[RecordParameters()])
"""


def test_torchrun_two_processes_gloo(tmp_path):
    out = tmp_path / "ddp"
    script = tmp_path / "record.py"
    script.write_text(RECORD_PARAMETERS)
    run(
        [
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            "--max_steps",
            "4",
            "--save_steps",
            "2",
            "--per_device_train_batch_size",
            "4",
            "--output_dir",
            str(out),
            *FAST,
        ],
        prefix=[sys.executable, "-m", "torch.distributed.run"],
    )
    ckpt = out / "checkpoint-4"
    assert (ckpt / "crystal_checkpoint_complete.json").is_file()
    assert (ckpt / "rng_state_0.pth").is_file() and (ckpt / "rng_state_1.pth").is_file()  # really 2 ranks
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    logs = [r for r in metrics(out) if "loss" in r]
    assert len(logs) == 4  # one writer (rank 0), one line per step

    # The ranks trained on different examples at every step ...
    batches = [torch.load(out / f"batches_rank{r}.pt") for r in (0, 1)]
    assert len(batches[0]) == len(batches[1]) == 4
    for step, (b0, b1) in enumerate(zip(*batches)):
        assert b0 != b1, f"step {step + 1}: both ranks trained on the same batch"
    # ... from the same start, yet end with bitwise equal parameters that moved: their gradients
    # were all-reduced (through the objective-as-forward) before every optimizer step.
    begin = [torch.load(out / f"params_begin_rank{r}.pt") for r in (0, 1)]
    end = [torch.load(out / f"params_end_rank{r}.pt") for r in (0, 1)]
    assert begin[0].keys() == end[0].keys() == end[1].keys()
    for name in begin[0]:
        assert torch.equal(begin[0][name], begin[1][name]), name
        assert torch.equal(end[0][name], end[1][name]), f"{name} differs between the ranks"
    moved = [n for n in begin[0] if not torch.equal(begin[0][n], end[0][n])]
    assert len(moved) > len(begin[0]) // 2, f"only {len(moved)} of {len(begin[0])} parameters trained"


KILL_DURING_SAVE = """
import os, signal, sys
import transformers

save_rng = transformers.Trainer._save_rng_state

def killed_mid_save(self, output_dir):
    # checkpoint-{step}'s model and optimizer are written; its RNG state, trainer state and
    # completion marker are not: SIGKILL, as an out-of-memory killer or a pre-empted node would.
    if self.state.global_step == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return save_rng(self, output_dir)

transformers.Trainer._save_rng_state = killed_mid_save
from crystal_ext.train import main
main(sys.argv[1:])
"""


def test_sigkill_during_save_then_resume_retraces_the_uninterrupted_run(tmp_path, monkeypatch):
    common = ["--max_steps", "9", "--save_steps", "3", "--per_device_train_batch_size", "4", *FAST]
    run([*common, "--output_dir", str(tmp_path / "straight")])

    out = tmp_path / "killed"
    monkeypatch.setenv("KILL_AT_STEP", "6")
    proc = run(
        [*common, "--output_dir", str(out)], prefix=[sys.executable, "-c", KILL_DURING_SAVE], check=False
    )
    monkeypatch.delenv("KILL_AT_STEP")
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert (out / "checkpoint-3" / "crystal_checkpoint_complete.json").is_file()
    partial = out / "checkpoint-6"
    assert (partial / "model.safetensors").is_file()  # looks like a checkpoint ...
    assert not (partial / "crystal_checkpoint_complete.json").exists()  # ... but is marked incomplete

    refused = run([*common, "--output_dir", str(out), "--resume_from_checkpoint", str(partial)], check=False)
    assert refused.returncode == 2
    assert "incomplete" in refused.stderr and "checkpoint-3" in refused.stderr

    proc = run([*common, "--output_dir", str(out), "--resume_from_checkpoint", "last"])
    assert "resuming from" in proc.stdout and "checkpoint-3" in proc.stdout
    assert (partial / "crystal_checkpoint_complete.json").is_file()  # rewritten whole by the resumed run
    # The resumed run retraces the uninterrupted one: the same loss at every step (the killed
    # run's steps 1-3, the resumed run's 4-9) and the same final weights.
    for step in range(1, 10):
        want = loss_at(tmp_path / "straight", step)
        assert abs(loss_at(out, step) - want) <= 1e-5 * max(1.0, abs(want)), f"step {step}"
    straight, resumed = (load_file(folder / "model.safetensors") for folder in (tmp_path / "straight", out))
    assert straight.keys() == resumed.keys()
    for name, want in straight.items():
        torch.testing.assert_close(
            resumed[name], want, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num_latent_tokens", "0"], "--num_latent_tokens must be >= 1"),
        (["--corruption", "smear"], "--corruption must be one of"),
        (["--topk_fraction", "0"], "--topk_fraction must be in (0, 1]"),
        (["--lambda_attn", "-1"], "--lambda_attn must be >= 0"),
        (["--learning_rate", "-1"], "--learning_rate must be > 0"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be >= 1"),
        (["--image_size", "100"], "multiple of 28"),
        (["--blur_radius_min", "6"], "--blur_radius_min/--blur_radius_max"),
        (["--blur_radius_min", "0", "--blur_radius_max", "0"], "--blur_radius_min/--blur_radius_max"),
        (["--data", "/nonexistent/train.json"], "no such file"),
        (["--model", "/nonexistent/model"], "no such folder"),
        (["--model", "crystal-ext-tests/no-such-model"], "hf download"),
        (["--use_lora", "true", "--lora_r", "0"], "--lora_r >= 1"),
        (["--lm_head_losses", "fast"], "fused or reference"),
        (["--alignment_warmup_ratio", "1.5"], "--alignment_warmup_ratio must be in [0, 1]"),
        (["--eval_strategy", "steps", "--eval_examples", "0"], "evaluates on held-out examples"),
        (
            ["--task", "stripes_thin"],
            "--task must be one of colour, shape, stripes, stripes_faint, got 'stripes_thin'",
        ),
        (["--not_an_option", "1"], "unknown arguments"),
    ],
)
def test_argument_validation(args, message, tmp_path, monkeypatch):
    from crystal_ext.training.arguments import parse_args

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError) as err:
        parse_args([*args, "--output_dir", str(tmp_path / "o")])
    assert message in str(err.value)


def test_validation_fails_fast_on_the_command_line(tmp_path):
    model_dir = tmp_path / "empty_model"
    model_dir.mkdir()
    proc = run(["--model", str(model_dir)], check=False, timeout=60)
    assert proc.returncode == 2 and "no config.json" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_output_dir_with_checkpoints_needs_resume_or_overwrite(tmp_path):
    from crystal_ext.training.arguments import parse_args

    (tmp_path / "checkpoint-5").mkdir()
    with pytest.raises(ValueError, match="already holds checkpoints"):
        parse_args(["--output_dir", str(tmp_path)])
    _, targs = parse_args(["--output_dir", str(tmp_path), "--overwrite_output_dir"])
    assert targs.resume_from_checkpoint is None
    with pytest.raises(ValueError, match="no complete checkpoint"):
        parse_args(["--output_dir", str(tmp_path), "--resume_from_checkpoint", "last"])


def test_defaults_follow_the_recipe_for_a_real_model(tmp_path):
    from crystal_ext.training.arguments import parse_args

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cargs, targs = parse_args(["--model", str(model), "--output_dir", str(tmp_path / "o")])
    assert cargs.use_lora and (cargs.lora_r, cargs.lora_alpha, cargs.lora_dropout) == (16, 32, 0.01)
    assert (cargs.num_latent_tokens, cargs.topk_fraction, cargs.lambda_pred, cargs.lambda_attn) == (
        8,
        0.1,
        1,
        1,
    )
    # images keep the processor's own size unless --image_size is given (448: the published recipe)
    assert (cargs.corruption, cargs.blur_radius_min, cargs.blur_radius_max, cargs.image_size) == (
        "blur",
        2,
        5,
        None,
    )
    assert targs.learning_rate == 2e-4 and targs.lr_scheduler_type == "cosine" and targs.warmup_steps == 0.05
    assert targs.weight_decay == 0.1 and targs.max_steps == 4000 and targs.per_device_train_batch_size == 1
    tiny, ttargs = parse_args(["--output_dir", str(tmp_path / "t")])
    assert not tiny.use_lora and tiny.image_size == 112 and ttargs.learning_rate == 1e-3
    assert tiny.max_train_minutes is not None and ttargs.max_steps > 0


def test_evaluation_during_training_is_logged(tmp_path):
    """--eval_strategy steps: the three accuracies and the attention KL at every --eval_steps, in
    metrics.jsonl and TensorBoard; the final evaluation reports the latent-carried answers too."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    proc = run(
        [
            "--max_steps",
            "4",
            "--per_device_train_batch_size",
            "4",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "2",
            "--logging_steps",
            "2",
            "--eval_examples",
            "4",
            "--num_pictures",
            "1",
            "--report_to",
            "tensorboard",
            "--output_dir",
            str(out),
        ]
    )
    names = (
        "eval_accuracy_intact",
        "eval_accuracy_blurred",
        "eval_accuracy_latent_carried",
        "eval_attention_kl",
    )
    evals = [r for r in metrics(out) if "eval_accuracy_intact" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert set(names) <= set(r)
        assert all(0 <= r[n] <= 1 for n in names[:3]) and r["eval_attention_kl"] > 0
    events = EventAccumulator(str(next((out / "tensorboard").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for n in names:
        assert n.replace("eval_", "eval/") in tags, tags
    assert [s.step for s in events.Scalars("eval/accuracy_latent_carried")] == [2, 4]
    # the final evaluation: per example, the three answers and whether each is right
    result = json.loads((out / "eval_results.json").read_text())
    assert {"accuracy_latent_carried", "attention_kl"} <= set(result)
    for r in result["examples"]:
        for name in ("intact", "blurred", "latent_carried"):
            assert name in r and r[f"{name}_correct"] == (r[name] == r["answer"])
    assert "latent-carried" in proc.stdout and "attention KL" in proc.stdout


def test_alignment_warm_up_scales_the_kl_weights():
    from crystal_ext.model.objective import ObjectiveConfig
    from crystal_ext.training.trainer import objective_at

    full = ObjectiveConfig(lambda_pred=2.0, lambda_attn=0.5)
    weights = [(c.lambda_pred, c.lambda_attn) for c in (objective_at(full, s, 4) for s in range(6))]
    assert weights == [(0.0, 0.0), (0.5, 0.125), (1.0, 0.25), (1.5, 0.375), (2.0, 0.5), (2.0, 0.5)]
    assert objective_at(full, 0, 0) is full  # no warm-up: the objective as given
    assert objective_at(full, 1, 4).topk_fraction == full.topk_fraction


def test_topk_fraction_default_keeps_every_answer_row_on_the_embedded_task(tmp_path):
    """The embedded task's 4-row answers: 0.1 would keep the answer word alone (the loss-climb
    cause in docs/results.md), so the tiny run keeps all rows; a given value always wins."""
    from crystal_ext.training.arguments import parse_args

    out = ["--output_dir", str(tmp_path / "o")]
    assert parse_args(out)[0].topk_fraction == 1.0
    assert parse_args([*out, "--topk_fraction", "0.1"])[0].topk_fraction == 0.1
