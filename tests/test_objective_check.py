"""The run-time objective check (crystal_ext.training.objective_check, `python -m crystal_ext.check`,
and inside `python -m crystal_ext.train`): it passes on the tested families, and stops loudly,
naming the model type, the quantity and how far off it is, on deliberately broken adapters
(tests/broken_adapters.py): one-row positions on a Qwen-VL model, a head whose logits the model
scales, path-2 positions that do not copy path 1's."""

from __future__ import annotations

import functools
import re
import sys

import pytest
import torch
from broken_adapters import break_positions, scale_head
from family_models import SCALED_HEAD_FAMILIES, build, build_scaled_head
from test_families import _examples
from test_families_train import save_family, write_data
from train_helpers import FAST, ROOT, run

import crystal_ext
from crystal_ext.data.packing import DualPathPacker
from crystal_ext.model.attention_registration import ATTN_IMPLEMENTATION, register_dual_path_attention
from crystal_ext.model.objective import ObjectiveConfig
from crystal_ext.training.objective_check import ObjectiveCheckFailed, check_objective

pytestmark = pytest.mark.skipif(
    not crystal_ext.extension_available(), reason="the objective's fused ops need the compiled extension"
)
CE_FAILURE = (
    r"crystal_ext\.check: qwen2_5_vl: path-1 CE [\d.]+ vs the stock forward's [\d.]+ "
    r"\(relative [\d.e+-]+ > 0\.0001\)"
)
LOGITS_FAILURE = (
    r"crystal_ext\.check: qwen2_5_vl: path-1 logits at the D/E rows of example '\w+' differ from the "
    r"stock forward's by [\d.e+-]+ of their largest value \(> 0\.0001\)"
)


@functools.cache
def _model(family):
    register_dual_path_attention()
    model, processor, latent = build(family, attn_implementation="sdpa")  # loaded as train loads it
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model, processor, latent


def _setup(family):
    model, processor, latent = _model(family)
    return model, DualPathPacker(processor, latent, model, system="you are a helpful assistant")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "llava_onevision"])
def test_the_check_passes_on_a_tested_family(family):
    model, packer = _setup(family)
    model.train()
    report = check_objective(model, packer, _examples(), ObjectiveConfig(), count=3)
    text = report.summary()
    print("\n" + text)
    assert report.examples == ["a", "b", "c"] and not report.failures
    for part in ("path-1 CE", "path-1 logits", "F's logits vs E's", "KL_pred", "KL_attn", "lm_head_losses",
                 "attention_alignment_loss", "dual_path_attention"):  # fmt: skip
        assert f"ok   {part}" in text, part
    assert model.training  # left in the mode it came in


@pytest.mark.parametrize("family", SCALED_HEAD_FAMILIES)
def test_the_check_passes_on_a_model_that_transforms_its_logits(family):
    """Aya Vision (x logit_scale) and Granite-Docling (/ logits_scaling): the check holds the
    objective's logits to the stock forward's, which transforms its head's output itself."""
    register_dual_path_attention()
    model, processor, latent = build_scaled_head(family, attn_implementation="sdpa")
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    report = check_objective(
        model, DualPathPacker(processor, latent, model), _examples(), ObjectiveConfig(), count=2
    )
    assert not report.failures, report.summary()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64"])
def test_the_check_passes_in_every_dtype_it_has_tolerances_for(dtype):
    register_dual_path_attention()
    model, processor, latent = build("qwen2_5_vl", attn_implementation="sdpa")
    model = model.to(getattr(torch, dtype))
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    packer = DualPathPacker(processor, latent, model, system="you are a helpful assistant")
    report = check_objective(model, packer, _examples(), ObjectiveConfig(), count=2)
    assert f"qwen2_5_vl ({dtype}, cpu)" in report.summary() and not report.failures


def test_the_sft_baseline_is_checked_on_path_1():
    model, packer = _setup("qwen2_5_vl")
    report = check_objective(model, packer, _examples(), ObjectiveConfig(crystal=False), count=2)
    assert "ok   path-1 CE" in report.summary() and "KL_pred" not in report.summary()


def test_one_row_positions_on_a_qwen_vl_model_fail_loudly():
    model, packer = _setup("qwen2_5_vl")
    break_positions(packer)
    with pytest.raises(ObjectiveCheckFailed, match=LOGITS_FAILURE) as failed:
        check_objective(model, packer, _examples(), ObjectiveConfig(), count=3)
    assert "FAIL path-1 logits" in str(failed.value)


def test_a_head_the_model_scales_fails_with_the_ce_message():
    register_dual_path_attention()
    model, processor, latent = build("qwen2_5_vl", attn_implementation="sdpa")
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    packer = DualPathPacker(processor, latent, model, system="you are a helpful assistant")
    scale_head(model)
    with pytest.raises(ObjectiveCheckFailed) as failed:
        check_objective(model, packer, _examples(), ObjectiveConfig(), count=2)
    first = str(failed.value).splitlines()[0]
    assert re.fullmatch(CE_FAILURE, first), first


def test_path_2_positions_that_do_not_copy_path_1_fail_the_identity_check():
    model, packer = _setup("qwen3_vl")
    plain_pack = packer.pack

    def shifted(ex):
        packed = plain_pack(ex)
        f0, f1 = packed["layout"][5].tolist()
        packed["position_ids"][:, f0:f1] += 1
        return packed

    packer.pack = shifted
    with pytest.raises(ObjectiveCheckFailed, match=r"qwen3_vl: with the identity corruption, F's logits"):
        check_objective(model, packer, _examples(), ObjectiveConfig(), count=2)


def test_unpackable_examples_are_passed_over():
    model, packer = _setup("qwen2_5_vl")
    from crystal_ext.data.example import Example

    bad = Example("no-image", None, "what is the shape", "red")
    report = check_objective(model, packer, [bad, *_examples()], ObjectiveConfig(), count=1)
    assert report.examples == ["a"]
    with pytest.raises(ObjectiveCheckFailed, match="none of the first 1 examples could be packed"):
        check_objective(model, packer, [bad], ObjectiveConfig(), count=1)


# ---- the command lines -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_qwen(tmp_path_factory):
    folder = tmp_path_factory.mktemp("check")
    return save_family("qwen2_5_vl", folder / "model"), write_data(folder, n=4)


def _check_args(model_dir, data):
    return [
        "--model",
        model_dir,
        "--data",
        data,
        "--system_prompt",
        "you are a helpful assistant",
        "--examples",
        "2",
    ]


def test_check_command_on_a_saved_folder_and_jsonl(saved_qwen):
    proc = run(_check_args(*saved_qwen), module="crystal_ext.check", timeout=300)
    print(proc.stdout)
    assert (
        "crystal_ext.check: qwen2_5_vl (float32, cpu): objective checked against the stock model on 2"
        in proc.stdout
    )
    assert proc.stdout.rstrip().endswith("passed")


@pytest.mark.parametrize(
    "broken, message", [("one_row_positions", LOGITS_FAILURE), ("scaled_head", CE_FAILURE)]
)
def test_check_command_exits_2_naming_the_quantity(saved_qwen, broken, message):
    prefix = [sys.executable, str(ROOT / "tests" / "broken_adapters.py"), broken, "crystal_ext.check"]
    proc = run(_check_args(*saved_qwen), prefix=prefix, check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    first = next(line for line in proc.stderr.splitlines() if line.startswith("crystal_ext.check:"))
    assert re.fullmatch(message, first), proc.stderr
    assert "Traceback" not in proc.stderr


def test_check_command_refuses_an_unsupported_model_before_loading(tmp_path):
    from transformers import PaliGemmaConfig

    PaliGemmaConfig().save_pretrained(tmp_path)
    proc = run(
        ["--model", str(tmp_path), "--data", write_data(tmp_path, n=1)], "crystal_ext.check", check=False
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        f"crystal_ext.check: error: --model {tmp_path}: model_type 'paligemma' is not supported"
        in proc.stderr
    )


def test_train_stops_before_training_and_keeps_the_previous_run(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    prefix = [
        sys.executable,
        str(ROOT / "tests" / "broken_adapters.py"),
        "one_row_positions",
        "crystal_ext.train",
    ]
    args = ["--output_dir", str(out), "--overwrite_output_dir", "--max_steps", "2", *FAST]
    proc = run(args, prefix=prefix, check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    # The check's first failing comparison: the path-1 CE or, where the CE happens to agree, the
    # logits (which one depends on the tiny model's random weights).
    assert re.search(
        r"crystal_ext\.train: error: crystal_ext\.check: qwen2_5_vl: path-1 (CE|logits)", proc.stderr
    )
    assert "the run stopped before training: no optimizer step was taken" in proc.stderr
    assert "--skip_objective_check" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "checkpoint-1").is_dir() and (
        out / "metrics.jsonl"
    ).read_text() == '{"step": 1, "loss": 1.0}\n'
    assert not (out / "crystal_config.json").exists()


def test_train_runs_the_check_and_the_skip_flag_skips_it(tmp_path):
    args = ["--max_steps", "1", *FAST]
    proc = run([*args, "--output_dir", str(tmp_path / "checked")], timeout=300)
    assert (
        "crystal_ext.train: qwen2_5_vl (float32, cpu): objective checked against the stock model"
        in proc.stdout
    )
    prefix = [
        sys.executable,
        str(ROOT / "tests" / "broken_adapters.py"),
        "one_row_positions",
        "crystal_ext.train",
    ]
    skipped = run([*args, "--output_dir", str(tmp_path / "skipped"), "--skip_objective_check"], prefix=prefix)
    assert "objective checked" not in skipped.stdout and skipped.returncode == 0
