"""Planted bugs, and the tests that must catch them: a measure of the suite's strength that
anyone can rerun.

    python tests/mutations.py                 # every mutation (C++ ones rebuild the CPU extension)
    python tests/mutations.py --python-only   # only the Python mutations (CI runs these)
    python tests/mutations.py --only NAME     # one mutation, by name

For each mutation: copy the project (tracked and untracked, not ignored files) to a scratch
folder outside the checkout, apply the change (an exact string replacement that must match once),
rebuild the CPU-only extension there for a C++ change (otherwise use this checkout's built
extension), run the named tests, and expect them to FAIL. The scratch folder is kept between
mutations and runs (--fresh deletes it) so that ninja recompiles only the translation units a
C++ mutation touches; a file is rewritten there only when its content differs, so every change
and every revert gets a new modification time. A mutation whose tests pass "survived": the suite does not check
what that mutation breaks. The script exits non-zero if any mutation survived or could not be
applied. It runs this checkout's unmodified tests first for the same test ids, so a failure that
is already there is not counted as a catch.

Not a pytest file (its name does not start with test_); it runs pytest in subprocesses.
"""

from __future__ import annotations

import argparse
import fcntl
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Mutation:
    name: str
    what: str  # the bug, in words
    edits: list[tuple[str, str, str]]  # (file, old, new): each `old` must occur exactly once
    tests: list[str]  # pytest ids that must fail
    csrc: bool = field(default=False)


MUTATIONS = [
    Mutation(
        "checkpoint_marker_before_fsync",
        "the completion marker is written before the checkpoint's files are fsynced",
        [
            (
                "crystal_ext/training/checkpoints.py",
                "def write_complete_marker(folder: str, step: int) -> None:\n    _fsync_tree(folder)\n",
                "def write_complete_marker(folder: str, step: int) -> None:\n",
            ),
            (
                "crystal_ext/training/checkpoints.py",
                "    _fsync(folder)  # the rename itself made durable\n",
                "    _fsync_tree(folder)\n",
            ),
        ],
        ["tests/test_checkpoint_order.py"],
    ),
    Mutation(
        "path1_reads_corrupted_image",
        "path 1 (C, D, E) sees segment B, wrong the same way in the dense mask and the gathered paths",
        [
            (
                "crystal_ext/ops/layout.py",
                "    path1 = (seg == A) | (seg == C)",
                "    path1 = (seg == A) | (seg == B) | (seg == C)",
            ),
            (
                "crystal_ext/ops/layout.py",
                "return [*range(0, self.a[1]), *range(self.c[0], self.e[1])]",
                "return [*range(0, self.b[1]), *range(self.c[0], self.e[1])]",
            ),
        ],
        ["tests/test_visibility_rule.py"],
    ),
    Mutation(
        "guard_sees_leaked_tf32",
        "a test turns TF32 on and leaves it on for every later test in the process",
        [
            (
                "tests/test_visibility_rule.py",
                "    layout, length, expected = _batch()\n    got = dual_path_mask(layout, length)\n",
                "    torch.backends.cuda.matmul.allow_tf32 = True\n"
                "    layout, length, expected = _batch()\n    got = dual_path_mask(layout, length)\n",
            )
        ],
        ["tests/test_visibility_rule.py"],
    ),
    Mutation(
        "published_step_head_gets_no_gradient",
        "the LM head's weight is detached in our objective: one parameter loses its gradient",
        [("crystal_ext/model/objective.py", "        head.weight,\n", "        head.weight.detach(),\n")],
        ["tests/test_published_step.py"],
    ),
    Mutation(
        "visual_lora_scaled_to_zero",
        "the vision tower's LoRA adapters are scaled by 0: present, with gradients that are all zero",
        [
            (
                "crystal_ext/model/lora.py",
                "        lora_alpha=alpha,\n",
                '        lora_alpha=alpha,\n        alpha_pattern={r"visual\\..*": 0},\n',
            )
        ],
        ["tests/test_model_dual_path.py::test_peft_wrapped_model_trains_lora_merger_and_new_rows"],
    ),
    Mutation(
        "lora_on_the_fused_patch_embedding",
        "LoRA targets GLM-4V's fused patch embedding, a layer the stock model does not have",
        [
            (
                "crystal_ext/model/lora.py",
                "for name in family.lora_targets(model) if name not in fused]",
                "for name in family.lora_targets(model)]",
            )
        ],
        ["tests/test_runtime_fusions.py::test_lora_targets_only_layers_the_stock_model_has"],
    ),
    Mutation(
        "accuracies_swapped",
        "every accuracy (blurred, latent-carried) reports the intact images' answers",
        [
            (
                "crystal_ext/training/evaluation.py",
                'f"accuracy_{name}": sum(self.correct[name])',
                'f"accuracy_{name}": sum(self.correct["intact"])',
            )
        ],
        ["tests/test_evaluate.py::test_accuracy_counts_the_right_answers"],
    ),
    Mutation(
        "ddp_forward_bypasses_the_wrapper",
        "the objective is called on the unwrapped module, so DDP never all-reduces the gradients",
        [
            (
                "crystal_ext/training/trainer.py",
                "            out = model(crystal_batch=inputs)\n",
                "            out = inner(crystal_batch=inputs)\n",
            )
        ],
        ["tests/test_train.py::test_torchrun_two_processes_gloo"],
    ),
    Mutation(
        "resume_skips_the_weights",
        "a resumed run keeps its fresh weights instead of loading the checkpoint's",
        [
            (
                "crystal_ext/training/trainer.py",
                "            target.load_state_dict(loaded.state_dict(), strict=True)\n",
                "            pass\n",
            )
        ],
        ["tests/test_train.py::test_sigkill_during_save_then_resume_retraces_the_uninterrupted_run"],
    ),
    Mutation(
        "autocast_mixed_qkv_dtypes",
        "the dual-path attention is handed autocast's mixed q/k (fp32) and v (bf16) as they come",
        [
            (
                "crystal_ext/model/attention_registration.py",
                "        query, key, value = (t.to(dtype) for t in (query, key, value))\n",
                "        pass\n",
            )
        ],
        ["tests/test_model_dual_path.py::test_bf16_autocast_objective_tracks_float64"],
    ),
    Mutation(
        "fused_kl_one_percent_off",
        "the fused LM-head op returns a KL 1% too large: the benchmark must refuse to time it",
        [("crystal_ext/ops/lm_head_losses.py", "    return ce, kl\n", "    return ce, kl * 1.01\n")],
        ["benchmarks/test_lm_head_losses.py::test_lm_head_losses[small-float32-head-frozen]"],
    ),
    Mutation(
        "override_rows_kl_gradient_dropped",
        "the new tokens' LM-head rows get the cross-entropy gradient only, none from the KL",
        [
            (
                "csrc/lm_head_override.h",
                "  if (p.n_pairs > 0) {\n    const at::Tensor teacher",
                "  if (false) {\n    const at::Tensor teacher",
            )
        ],
        ["tests/test_lm_head_override.py::test_fused_override_matches_the_reference"],
        csrc=True,
    ),
    Mutation(
        "override_column_from_the_weight",
        "the CPU kernel computes the override columns' logits from the frozen weight's rows instead of "
        "the override rows",
        [
            (
                "csrc/cpu/lm_head_losses.cpp",
                "    if (columns.empty()) return;\n    const acc_t* ov_ptr",
                "    return;\n    const acc_t* ov_ptr",
            )
        ],
        [
            "tests/test_lm_head_override.py::test_fused_override_matches_the_reference",
            "tests/test_lm_head_override.py::test_fused_override_matches_the_reference_on_fresh_random_inputs",
        ],
        csrc=True,
    ),
    Mutation(
        "objective_ignores_the_trained_head_rows",
        "the objective scores the new tokens with the frozen head's rows instead of the trained ones",
        [
            (
                "crystal_ext/model/objective.py",
                "        return fn(*args, **kwargs, override_ids=rows.ids, override_rows=rows.lm_head_rows())\n",
                "        return fn(*args, **kwargs)\n",
            )
        ],
        ["tests/test_model_dual_path.py::test_objective_with_new_token_rows_equals_the_rows_written_in"],
    ),
    Mutation(
        "corruption_shared_by_all_images",
        "every image of a multi-image example gets the same corruption draw (one seed key per example)",
        [
            (
                "crystal_ext/data/images.py",
                '    return key if count == 1 else f"{key}#{index}"\n',
                "    return key\n",
            )
        ],
        ["tests/test_corruption.py::test_every_image_of_an_example_gets_its_own_draw"],
    ),
    Mutation(
        "merged_head_rows_not_restored",
        "loading the saved token rows restores the embedding rows only: the LM head keeps its untrained rows",
        [
            (
                "crystal_ext/training/token_rows.py",
                'zip(("embed_tokens", "lm_head"), mats)',
                'zip(("embed_tokens",), mats)',
            )
        ],
        ["tests/test_evaluate.py::test_merge_alone_writes_the_trained_rows_without_evaluating"],
    ),
    Mutation(
        "resume_newest_by_folder_name",
        "--resume_from_checkpoint last picks the checkpoint whose folder name sorts last (checkpoint-9 over -10)",
        [
            (
                "crystal_ext/training/checkpoints.py",
                "max(found)[1]",
                "max(found, key=lambda step_name: step_name[1])[1]",
            )
        ],
        ["tests/test_train_data.py::test_the_newest_checkpoint_is_the_highest_step_not_the_last_name"],
    ),
    Mutation(
        "data_check_allows_extra_image_places",
        "the data check counts a record with more image places than images as usable",
        [
            (
                "crystal_ext/data/records.py",
                "    if places != len(images):\n",
                "    if places < len(images):\n",
            )
        ],
        ["tests/test_train_data.py::test_data_check_refuses_image_places_and_images_that_differ"],
    ),
    Mutation(
        "gold_answers_keep_capitals",
        "the gold answer is not lower-cased: a capitalised gold answer never matches the model's",
        [
            (
                "crystal_ext/training/answers.py",
                "        .strip()\n        .lower()\n    )\n",
                "        .strip()\n    )\n",
            )
        ],
        ["tests/test_evaluate.py::test_gold_answers_with_capitals_match_case_insensitively"],
    ),
    Mutation(
        "blur_radius_zero_accepted_by_the_command_line",
        "--blur_radius_min 0 is accepted: some corrupted images are not corrupted at all",
        [
            (
                "crystal_ext/training/arguments.py",
                "if not 0 < cargs.blur_radius_min <= cargs.blur_radius_max:",
                "if not 0 <= cargs.blur_radius_min <= cargs.blur_radius_max:",
            )
        ],
        ["tests/test_train.py::test_argument_validation"],
    ),
    Mutation(
        "blur_radius_zero_accepted_by_the_corruption",
        "CorruptionConfig(blur_radius=(0, r)) is accepted (the Python API's way to the same bug)",
        [
            (
                "crystal_ext/data/corruption.py",
                "if not 0.0 < self.blur_radius[0] <= self.blur_radius[1]:",
                "if not 0.0 <= self.blur_radius[0] <= self.blur_radius[1]:",
            )
        ],
        ["tests/test_corruption.py::test_bad_arguments"],
    ),
    Mutation(
        "images_opened_unguarded",
        "an example's images are opened without the guarded opener: a truncated held-out image crashes the evaluation",
        [
            (
                "crystal_ext/data/images.py",
                "        images = [open_image(source) for source in example.images]\n",
                '        images = [Image.open(source).convert("RGB") for source in example.images]\n',
            )
        ],
        ["tests/test_bad_input.py::test_evaluate_names_every_bad_record_and_writes_its_results"],
    ),
    Mutation(
        "overwrite_clears_before_the_checks",
        "--overwrite_output_dir deletes the earlier run before the data is checked",
        [
            (
                "crystal_ext/train.py",
                "    check_kernels(cargs)\n",
                "    check_kernels(cargs)\n    clear_previous_run(cargs, targs)\n",
            )
        ],
        ["tests/test_bad_input.py::test_unusable_data_stops_with_the_records_named_and_the_earlier_run_kept"],
    ),
    Mutation(
        "readme_results_hand_edited",
        "a README results figure is edited by hand and no longer comes from docs/benchmark_output.txt",
        [("README.md", " s, 448 MB | published recipe:", " s, 449 MB | published recipe:")],
        ["tests/test_docs_results.py"],
    ),
    Mutation(
        "held_out_reads_the_train_split",
        "held-out data from a DatasetDict folder or a hub data set is read from its train split",
        [("crystal_ext/training/run_config.py", "HELD_OUT_SPLIT, limit)", "TRAIN_SPLIT, limit)")],
        ["tests/test_run_config.py"],
    ),
    Mutation(
        "malformed_record_crashes_the_check",
        "a record whose fields have the wrong types raises out of the data check (a traceback, no record named)",
        [
            (
                "crystal_ext/data/records.py",
                "    except (TypeError, AttributeError, KeyError, ValueError) as exc:\n",
                "    except KeyError as exc:\n",
            )
        ],
        ["tests/test_train_data.py::test_a_record_of_the_wrong_structure_is_left_out_by_name"],
    ),
    Mutation(
        "block_rescale_squared",
        "the online log-sum-exp rescale of lm_head_losses is alpha^2 instead of alpha; caught only by a "
        "CPU row whose running maximum grows in a later vocabulary block (tests/test_lm_head_losses.py)",
        [
            (
                "csrc/lm_head_losses.h",
                "return old_max == neg_inf<T>() ? T(0) : exp_acc(old_max - new_max);",
                "return old_max == neg_inf<T>() ? T(0) : exp_acc(T(2) * (old_max - new_max));",
            )
        ],
        ["tests/test_lm_head_losses.py::test_running_max_growing_in_a_later_vocabulary_block"],
        csrc=True,
    ),
    Mutation(
        "objective_uses_the_bare_head",
        "the objective takes the LM head's output as the logits where the model's forward rescales it",
        [("crystal_ext/model/objective.py", "        **transform.op_kwargs(),\n", "")],
        [
            "tests/test_families.py::test_scaled_head_objective_and_gradients_equal_the_dense_eager_forward",
            "tests/test_families.py::test_scaled_head_path1_ce_equals_the_stock_forward_loss",
        ],
    ),
    Mutation(
        "softcap_slope_dropped",
        "the soft-cap's derivative 1 - tanh^2 is taken as 1 in the LM-head kernels' gradients",
        [("csrc/lm_head_losses.h", "  return (T(1) - t) * (T(1) + t);", "  return T(1);")],
        ["tests/test_lm_head_losses.py::test_transform_matches_reference_fp32"],
        csrc=True,
    ),
    Mutation(
        "softcap_cross_expectation_with_teacher_slopes",
        "under a soft-cap the pair's KL gradient weights the teacher's probabilities with the teacher's "
        "slopes (E_s - E_teacher) instead of the student's",
        [
            (
                "csrc/cpu/lm_head_losses.cpp",
                "if (pc != nullptr) pc[v] = e * softcap_slope(ss[v], cap);",
                "if (pc != nullptr) pc[v] = e * softcap_slope(st[v], cap);",
            )
        ],
        ["tests/test_lm_head_losses.py::test_transform_matches_reference_fp32"],
        csrc=True,
    ),
    Mutation(
        "plan_unpacked_in_another_order",
        "the C++ side unpacks the schema's plan list in another order than the Python side packs it "
        "(rows and ce_rows swapped)",
        [("csrc/lm_head_plan.h", "X(rows) X(row_targets) X(ce_rows)", "X(ce_rows) X(row_targets) X(rows)")],
        [
            "tests/test_lm_head_losses.py::test_python_and_kernel_plans_name_the_same_tensors_in_the_same_order",
            "tests/test_lm_head_losses.py::test_matches_reference_fp32",
        ],
        csrc=True,
    ),
    Mutation(
        "alignment_plan_unpacked_in_another_order",
        "the alignment kernels unpack the schema's plan list in another order than the Python side "
        "packs it (the two paths' keys swapped)",
        [
            (
                "csrc/attention_alignment_plan.h",
                "X(intact_keys) X(corrupted_keys)",
                "X(corrupted_keys) X(intact_keys)",
            )
        ],
        [
            "tests/test_attention_alignment_loss.py::test_python_and_kernel_plans_name_the_same_tensors_in_the_same_order",
            "tests/test_attention_alignment_loss.py::test_float64_fused_equals_reference_exactly_enough",
        ],
        csrc=True,
    ),
    Mutation(
        "gemm_skips_second_pass",
        "the CPU bf16 GEMM drops every k-pass after the first 4096 pairs",
        [
            (
                "csrc/cpu/gemm_bf16.cpp",
                "for (int64_t p0 = 0; p0 < b.k_pairs; p0 += kPairBlock) {",
                "for (int64_t p0 = 0; p0 < std::min(b.k_pairs, kPairBlock); p0 += kPairBlock) {",
            )
        ],
        ["tests/test_cpu_gemm_bf16.py"],
        csrc=True,
    ),
    Mutation(
        "vector_pack_drops_second_row",
        "the AVX-512 pack of w leaves out the second row of the last full pair",
        [
            (
                "csrc/cpu/gemm_bf16.cpp",
                "const __m512i r1 = 2 * p + 1 < k",
                "const __m512i r1 = 2 * p + 2 < k",
            )
        ],
        ["tests/test_cpu_gemm_bf16.py"],
        csrc=True,
    ),
    Mutation(
        "vector_exp_drops_ln2_low_part",
        "the AVX-512 exp reduces its argument by the high part of ln 2 only (n * 2.1e-4 relative off)",
        [
            (
                "csrc/cpu/vocab_rows.cpp",
                "r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);",
                "r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.0f), r);",
            )
        ],
        ["tests/test_cpu_vocab_rows.py::test_exp_within_two_ulp_of_float64"],
        csrc=True,
    ),
    Mutation(
        "mkl_product_overwrites",
        "MKL's P W product overwrites the running expectation instead of adding to it",
        [
            (
                "csrc/cpu/gemm_bf16.cpp",
                "accumulate ? 1.0f : 0.0f, c, static_cast<int>(ldc));",
                "0.0f, c, static_cast<int>(ldc));",
            )
        ],
        ["tests/test_cpu_gemm_bf16.py::test_accumulates_into_out", "tests/test_cpu_vocab_rows.py"],
        csrc=True,
    ),
    Mutation(
        "deferred_product_overwrites",
        "the product by w^T on the deferred pack (any A above 64 rows, one over 3 MB included) "
        "overwrites c instead of adding",
        [
            (
                "csrc/cpu/gemm_bf16.cpp",
                "        pack_panels(b, j0, j1, p0, p0 + pairs, buf.data());\n"
                "        const bool add = accumulate || p0 > 0;",
                "        pack_panels(b, j0, j1, p0, p0 + pairs, buf.data());\n"
                "        const bool add = p0 > 0;",
            )
        ],
        ["tests/test_cpu_gemm_bf16.py::test_accumulates_into_out_with_a_large_a"],
        csrc=True,
    ),
    Mutation(
        "k_outer_product_rereads_first_k_block",
        "the k-outer AMX product by w multiplies every k-block of w by A's first k-block",
        [("csrc/cpu/gemm_bf16.cpp", "add, a + i0 * lda + 2 * p0, group,", "add, a + i0 * lda, group,")],
        ["tests/test_cpu_gemm_bf16.py"],
        csrc=True,
    ),
    Mutation(
        "k_outer_product_drops_the_second_a",
        "the k-outer AMX product by w packs w once but never adds the second A (the lo parts of P)",
        [
            (
                "csrc/cpu/gemm_bf16.cpp",
                "for (int64_t i0 = 0; i0 < m2; i0 += kAmxRows)",
                "for (int64_t i0 = 0; i0 < 0; i0 += kAmxRows)",
            )
        ],
        ["tests/test_cpu_gemm_bf16.py"],
        csrc=True,
    ),
    Mutation(
        "difference_rows_ratio_fixed_after_first_block",
        "the students' difference rows keep the first ratio of sums they adopt instead of following "
        "the running one",
        [
            (
                "csrc/cpu/lm_head_losses.cpp",
                "static constexpr double kRatioTolerance = 1.0 / 1024;",
                "static constexpr double kRatioTolerance = 1e30;",
            )
        ],
        ["tests/test_lm_head_losses.py"],
        csrc=True,
    ),
    Mutation(
        "difference_rows_drop_the_last_teacher_term",
        "u misses r_B S_B, the teacher's part of the student's expectation added at the end",
        [
            (
                "csrc/cpu/lm_head_losses.cpp",
                "u_ptr[i * Hd + d] += f * e_ptr[t * Hd + d];",
                "u_ptr[i * Hd + d] += 0 * f * e_ptr[t * Hd + d];",
            )
        ],
        ["tests/test_lm_head_losses.py"],
        csrc=True,
    ),
    Mutation(
        "difference_rows_drop_a_ratio_change",
        "a change of a pair's ratio is not summed by parts into u",
        [
            (
                "csrc/cpu/lm_head_losses.cpp",
                "u_ptr[i * Hd + d] += f * e_t[d];",
                "u_ptr[i * Hd + d] += 0 * f * e_t[d];",
            )
        ],
        ["tests/test_lm_head_losses.py"],
        csrc=True,
    ),
    Mutation(
        "difference_rows_u_not_rescaled",
        "u is not rescaled when the student's running max grows",
        [("csrc/cpu/lm_head_losses.cpp", "for (int64_t d = 0; d < Hd; ++d) u_ptr[i * Hd + d] *= a;", "")],
        ["tests/test_lm_head_losses.py"],
        csrc=True,
    ),
    Mutation(
        "difference_rows_override_columns_keep_the_student_probability",
        "an override column of a student's difference row multiplies its row with p~_s instead of "
        "p~_s - r p~_teacher",
        [
            (
                "csrc/cpu/lm_head_losses.cpp",
                "out[j * nb + k] -= c.ratio[pair] *",
                "out[j * nb + k] -= 0 * c.ratio[pair] *",
            )
        ],
        ["tests/test_lm_head_override.py"],
        csrc=True,
    ),
    Mutation(
        "kept_pair_sweep_drops_override_columns",
        "the kept pairs' own sweep (bf16, many rows) takes the override columns out of D but never "
        "multiplies their rows",
        [
            (
                "csrc/cpu/lm_head_losses.cpp",
                "    if (n_ov > 0) diff.addmm_(d_ov, ov_rows);",
                "",
            )
        ],
        ["tests/test_lm_head_override.py", "tests/test_lm_head_losses.py"],
        csrc=True,
    ),
    Mutation(
        "kept_pair_sweep_uses_the_teacher_lse_twice",
        "the kept pairs' own sweep normalises the students' rows with their teachers' log-sum-exps",
        [
            (
                "csrc/cpu/lm_head_losses.cpp",
                "row_lse[j] = static_cast<acc_t>(c.lse[local[j]]);",
                "row_lse[j] = static_cast<acc_t>(c.lse[local[j % K]]);",
            )
        ],
        ["tests/test_lm_head_losses.py"],
        csrc=True,
    ),
    Mutation(
        "one_pass_sweep_overwrites_its_partial_product",
        "the one-pass sweep's second product overwrites the thread's partial D w where it must add "
        "each block's",
        [
            (
                "csrc/cpu/gemm_bf16.cpp",
                "width, k, /*add_C=*/true, d_ptr + i0 * ldd, group,",
                "width, k, /*add_C=*/false, d_ptr + i0 * ldd, group,",
            )
        ],
        ["tests/test_cpu_gemm_sweep.py"],
        csrc=True,
    ),
    Mutation(
        "one_pass_sweep_keeps_one_thread_partial",
        "the one-pass sweep sums only the first thread's partial product",
        [
            (
                "csrc/cpu/gemm_bf16.cpp",
                "  for (const auto& part : partials)\n",
                "  for (const auto& part : decltype(partials)(partials.begin(), partials.begin() + 1))\n",
            )
        ],
        ["tests/test_cpu_gemm_sweep.py"],
        csrc=True,
    ),
    Mutation(
        "w_as_a_product_overwrites",
        "the few-rows product by w^T (w as the tiles' A operand) overwrites c where it must accumulate",
        [
            (
                "csrc/cpu/gemm_bf16.cpp",
                "for (int64_t i = 0; i < rows; ++i) row[i] += c_t[i * cols + r];",
                "for (int64_t i = 0; i < rows; ++i) row[i] = c_t[i * cols + r];",
            )
        ],
        ["tests/test_cpu_gemm_bf16.py"],
        csrc=True,
    ),
    Mutation(
        "w_as_a_product_restarts_each_k_pass",
        "the product with w's rows as the tiles' A operand (the few-rows logits, the one-pass "
        "sweep's logits) starts every k-pass of 4096 pairs from zero",
        [
            (
                "csrc/cpu/gemm_bf16.cpp",
                "k, cols, cols, /*add_C=*/p0 > 0,",
                "k, cols, cols, /*add_C=*/false,",
            )
        ],
        ["tests/test_cpu_gemm_bf16.py", "tests/test_cpu_gemm_sweep.py"],
        csrc=True,
    ),
    Mutation(
        "vector_transpose_repeats_a_lane",
        "the 16 x 16 word transpose of the AVX-512 pack of w^T writes column 0 where column 8 goes",
        [
            (
                "csrc/cpu/gemm_bf16.cpp",
                "r[8 + q] = _mm512_shuffle_i32x4(t[q], t[8 + q], 0xdd);",
                "r[8 + q] = _mm512_shuffle_i32x4(t[q], t[8 + q], 0x88);",
            )
        ],
        ["tests/test_cpu_gemm_bf16.py"],
        csrc=True,
    ),
    Mutation(
        "prompt_injects_a_system_turn",
        "the prompt gets a system turn that neither the record, the option nor the template wrote",
        [
            (
                "crystal_ext/data/chat.py",
                "messages = prompt_messages(example, system)",
                'messages = prompt_messages(example, system or "You are a helpful assistant.")',
            )
        ],
        ["tests/test_chat_templates.py::test_path1_is_the_stock_rendering_then_the_trained_block"],
    ),
    Mutation(
        "think_block_opened_twice",
        "the latent block opens its own <think> after a generation prompt that already opened one",
        [
            (
                "crystal_ext/data/sequence.py",
                "opening = [] if continues_think_block else [latent.think_open]",
                "opening = [latent.think_open]",
            )
        ],
        [
            "tests/test_chat_templates.py::test_a_generation_prompt_that_opens_a_think_block_is_continued_by_the_latents"
        ],
    ),
    Mutation(
        "evaluation_prompt_drops_template_kwargs",
        "evaluation renders the prompt without the run's chat-template variables",
        [
            (
                "crystal_ext/training/generation.py",
                "generation_prompt(processor, e, system, template_kwargs)",
                "generation_prompt(processor, e, system, None)",
            )
        ],
        ["tests/test_chat_templates.py::test_evaluation_generates_from_the_prompt_training_packs"],
    ),
    Mutation(
        "existing_think_tokens_made_special",
        "add_latent_tokens re-adds the tokens the tokenizer already has, as special tokens",
        [
            (
                "crystal_ext/model/latent_tokens.py",
                "tokenizer.add_tokens(missing, special_tokens=True)",
                "tokenizer.add_tokens(wanted, special_tokens=True)",
            )
        ],
        ["tests/test_latent_tokens.py::test_tokens_the_tokenizer_has_are_left_as_they_are"],
    ),
    Mutation(
        "unpackable_answer_ends_the_batch",
        "one example the packer refuses during latent-carried decoding stops every example of the batch",
        [
            (
                "crystal_ext/training/latent_carried.py",
                "            done[i] = unpacked[i] = True\n            continue\n",
                "            done[i] = unpacked[i] = True\n            return [], []\n",
            )
        ],
        ["tests/test_latent_carried.py::test_an_answer_the_packer_cannot_use_affects_only_its_example"],
    ),
    # ---- the model's own positions, the model-type checks, placeholder tokens in answers ----
    Mutation(
        "own_positions_one_row",
        "a model with its own position function is numbered 0, 1, 2, ... (in all three rows)",
        [
            (
                "crystal_ext/model/families/own_positions.py",
                'return rope_index(ids, (ids == image_token).long(), image_inputs["image_grid_thw"])',
                "return torch.arange(ids.shape[1]).expand(3, -1)",
            )
        ],
        [
            "tests/test_own_positions.py::test_path1_positions_are_the_stock_models_own_and_b_f_copy_c_e[glm4v]",
            "tests/test_families.py::test_baseline_is_plain_sft_on_the_intact_path[glm4v]",
        ],
    ),
    Mutation(
        "own_position_function_not_checked",
        "an adapter-less model with its own position function is accepted as generic (1-D positions)",
        [
            (
                "crystal_ext/model/families/architecture.py",
                "    source = own_position_function(model_or_config)\n",
                "    source = None\n",
            )
        ],
        ["tests/test_model_types.py::test_own_position_functions_without_an_adapter_are_refused[glm4v_moe]"],
    ),
    Mutation(
        "router_term_dropped",
        "the objective drops the router load-balancing loss the MoE config asks the stock forward to add",
        [
            (
                "crystal_ext/model/families/router_loss.py",
                "        return loss + self.path1_loss(batch)\n",
                "        return loss\n",
            )
        ],
        ["tests/test_router_loss.py::test_the_objective_adds_the_stock_router_term_on_path_1"],
    ),
    Mutation(
        "placeholder_token_packed_back",
        "the latent-carried decoding packs a generated image token back into the answer",
        [("crystal_ext/training/latent_carried.py", "    stop |= packer.media_tokens\n", "")],
        [
            "tests/test_answer_placeholder_tokens.py::test_latent_carried_answers_stop_at_a_generated_image_token[qwen3_vl]"
        ],
    ),
    Mutation(
        "check_stock_forward_given_packed_positions",
        "the run-time check hands the stock forward the packed position ids, so the ground truth no "
        "longer numbers its positions itself and shares a wrong family's positions",
        [
            (
                "crystal_ext/training/objective_check.py",
                "        logits = base(**_to(inputs, device), **keep, use_cache=False).logits[0]\n",
                '        positions = batch["position_ids"][..., b : b + 1, seg.path1()]\n'
                "        logits = base(**_to(inputs, device), position_ids=positions, **keep, use_cache=False)"
                ".logits[0]\n",
            )
        ],
        ["tests/test_objective_check.py::test_one_row_positions_on_a_qwen_vl_model_fail_loudly"],
    ),
    Mutation(
        "check_compares_logits_with_themselves",
        "the run-time check measures the objective's path-1 logits against themselves, not the stock forward's",
        [
            (
                "crystal_ext/training/objective_check.py",
                "        error = relative_error(ours, theirs)\n",
                "        error = relative_error(ours, ours)\n",
            )
        ],
        ["tests/test_objective_check.py::test_one_row_positions_on_a_qwen_vl_model_fail_loudly"],
    ),
    Mutation(
        "window_on_packed_indices",
        "a sliding window counted on packed indices instead of path positions",
        [
            (
                "crystal_ext/model/dual_path_attention.py",
                "path_mask(order, self._blocks(idx) if blocks else None, window)",
                "path_mask(idx, self._blocks(idx) if blocks else None, window)",
            )
        ],
        [
            "tests/test_dual_path_windows.py::test_equals_the_dense_rule_with_windows_on_positions_and_image_blocks",
            "tests/test_windowed_families.py::test_objective_and_gradients_equal_the_dense_eager_forward",
        ],
    ),
    Mutation(
        "path2_image_blocks_causal",
        "B's image blocks stay causal on path 2 (only path 1's images are bidirectional)",
        [
            (
                "crystal_ext/model/dual_path_attention.py",
                "path_mask(order, self._blocks(idx) if blocks else None, window)",
                "path_mask(order, self._blocks(idx) if blocks and idx is self.idx1 else None, window)",
            )
        ],
        [
            "tests/test_dual_path_windows.py::test_equals_the_dense_rule_with_windows_on_positions_and_image_blocks",
            "tests/test_windowed_families.py::test_objective_and_gradients_equal_the_dense_eager_forward",
        ],
    ),
    Mutation(
        "image_blocks_cross_paths",
        "path 2 attends to path 1's keys and values, so B's image rows see C's image block (the gathered "
        "paths are the only place the paths can meet)",
        [
            (
                "crystal_ext/model/dual_path_attention.py",
                "out2 = _sdpa(q2, k2, v2, scale, mask2)",
                "out2 = _sdpa(q2, k1, v1, scale, mask2)",
            )
        ],
        [
            "tests/test_dual_path_windows.py::test_no_image_block_crosses_the_paths",
            "tests/test_windowed_families.py::test_objective_and_gradients_equal_the_dense_eager_forward",
        ],
    ),
    Mutation(
        "path_masks_built_in_every_layer",
        "the path-local masks are built again in every sliding layer instead of once per forward",
        [
            (
                "crystal_ext/model/dual_path_attention.py",
                "        if (window, blocks) not in self._masks:\n",
                "        if True:\n",
            )
        ],
        ["tests/test_gemma4.py::test_path_masks_are_built_once_per_forward"],
    ),
    Mutation(
        "plan_slot_flags_sent_as_bool",
        "the plan's real-slot flags go to the device as they are: to a GPU they travel in one int64 buffer "
        "and come back as integers, which the image blocks cannot be found from",
        [
            (
                "crystal_ext/model/dual_path_attention.py",
                "on_device = copy_to_device((idx1, idx2, src, valid.long(), path_rows, output_rows), self.device)",
                "on_device = copy_to_device((idx1, idx2, src, valid, path_rows, output_rows), self.device)",
            ),
            (
                "crystal_ext/model/dual_path_attention.py",
                "        self.valid = valid.bool()\n",
                "        self.valid = valid\n",
            ),
        ],
        ["tests/test_dual_path_windows.py::test_the_image_blocks_survive_the_plans_copy_to_a_gpu"],
    ),
    Mutation(
        "lora_defaults_diverge",
        "the command line's LoRA alpha default is written again, and differs from apply_lora's",
        [
            (
                "crystal_ext/training/arguments.py",
                "lora_alpha: int = field(default=LORA_ALPHA,",
                "lora_alpha: int = field(default=64,",
            )
        ],
        ["tests/test_lora.py::test_the_command_line_defaults_are_apply_loras"],
    ),
    Mutation(
        "layout_checked_again_in_the_layers",
        "the objective does not hand its checked layout on: the first text layer reads and checks it again",
        [
            (
                "crystal_ext/model/objective.py",
                "hidden, kl_attn = dual_path_hidden(backbone, batch, layout, config.alignment_layer)",
                "hidden, kl_attn = dual_path_hidden(backbone, batch, None, config.alignment_layer)",
            )
        ],
        ["tests/test_model_dual_path.py::test_layout_is_read_and_checked_once_per_forward"],
    ),
    Mutation(
        "layers_trust_any_checked_layout",
        "the text layers take a checked layout made for another layout tensor as the check of theirs",
        [
            (
                "crystal_ext/ops/layout.py",
                "        return layout is self.source and (batch, length) == (self.batch, self.length)\n",
                "        return (batch, length) == (self.batch, self.length)\n",
            )
        ],
        ["tests/test_model_dual_path.py::test_the_layers_check_a_layout_the_caller_did_not"],
    ),
    Mutation(
        "reference_imports_fused_op",
        "the plain-PyTorch reference imports a fused op module (importing it loads the compiled code)",
        [
            (
                "crystal_ext/ops/reference.py",
                "from crystal_ext.ops.checks import check_override, check_qk\n",
                "from crystal_ext.ops.checks import check_override, check_qk\n"
                "from crystal_ext.ops.lm_head_plan import LmHeadPlan  # noqa: F401\n",
            )
        ],
        ["tests/test_import_structure.py::test_references_reach_no_fused_module"],
    ),
    Mutation(
        "lazy_import_cycle",
        "a module imports, inside a function, a module that imports it",
        [
            (
                "crystal_ext/ops/layout.py",
                "def validate_layout(",
                "def _plan():\n    from crystal_ext.ops.lm_head_plan import lm_head_plan\n\n"
                "    return lm_head_plan\n\n\ndef validate_layout(",
            )
        ],
        ["tests/test_import_structure.py::test_no_import_cycle"],
    ),
    Mutation(
        "package_imports_its_ops_eagerly",
        "the package's __init__ imports the objective up front, so importing the references loads "
        "and registers every fused op",
        [
            (
                "crystal_ext/__init__.py",
                "import importlib\n",
                "import importlib\n\nfrom crystal_ext.model.objective import crystal_objective  # noqa: F401\n",
            )
        ],
        ["tests/test_import_structure.py::test_importing_the_references_registers_no_fused_op"],
    ),
    Mutation(
        "op_names_left_to_module_getattr",
        "the ops' lazy names are served by the module __getattr__ alone, so importing an op's module "
        "first leaves the module where the op's name is",
        [
            (
                "crystal_ext/ops/__init__.py",
                "sys.modules[__name__].__class__ = _OpsPackage\n",
                "",
            ),
            (
                "crystal_ext/ops/__init__.py",
                '    if name == "reference":\n',
                "    if name in _OPS:\n"
                '        return getattr(importlib.import_module(f"{__name__}.{name}"), name)\n'
                '    if name == "reference":\n',
            ),
        ],
        ["tests/test_import_structure.py::test_public_op_names_are_the_ops_whatever_was_imported_first"],
    ),
    Mutation(
        "linear_layer_one_packed_scan",
        "a linear-attention layer scans the packed sequence once (path 2 sees C and E, path 1 sees B)",
        [
            (
                "crystal_ext/model/objective.py",
                "    use_path_scans(backbone)  # linear-attention / convolution layers: one scan per path\n",
                "",
            )
        ],
        ["tests/test_linear_families.py::test_objective_and_gradients_equal_the_per_path_recurrence"],
    ),
    Mutation(
        "short_conv_one_packed_scan",
        "an LFM2 short-convolution layer convolves the packed sequence (path 2's B and F see C and E)",
        [
            (
                "crystal_ext/model/path_scan.py",
                "        mixer.conv, (b * x)[rows, index].transpose(1, 2), None, mixer.layer_idx\n    )\n"
                "    return mixer.out_proj(c * _to_packed(conv.transpose(1, 2), plan))",
                "        mixer.conv, (b * x).transpose(1, 2), None, mixer.layer_idx\n    )\n"
                "    return mixer.out_proj(c * conv.transpose(1, 2))",
            )
        ],
        ["tests/test_linear_families.py::test_short_conv_layer_from_parts_equals_the_per_path_recurrence"],
    ),
    Mutation(
        "linear_f_continues_path1",
        "a linear-attention layer's F scan starts from path 1's state after [A, C, D], not path 2's",
        [
            (
                "crystal_ext/model/path_scan.py",
                "    index = torch.cat([plan.idx1, plan.idx2])",
                "    f_start = plan.layout_cpu[:, 5, :1].to(plan.idx2.device)\n"
                "    index = torch.cat([plan.idx1, torch.where(plan.idx2 >= f_start, plan.idx2, plan.idx1)])",
            )
        ],
        ["tests/test_linear_families.py::test_objective_and_gradients_equal_the_per_path_recurrence"],
    ),
    Mutation(
        "linear_d_from_path2",
        "a linear-attention layer's D rows take path 2's scan (D recomputed on the corrupted path)",
        [
            (
                "crystal_ext/model/path_scan.py",
                "    both = torch.cat([out[:batch], out[batch:], zero_row], dim=1)",
                "    d = plan.layout_cpu[:, 3].to(out.device)\n"
                "    in_d = ((plan.idx1 >= d[:, :1]) & (plan.idx1 < d[:, 1:]))[..., None]\n"
                "    both = torch.cat([torch.where(in_d, out[batch:], out[:batch]), out[batch:], zero_row], dim=1)",
            )
        ],
        ["tests/test_linear_families.py::test_objective_and_gradients_equal_the_per_path_recurrence"],
    ),
    Mutation(
        "linear_path2_prefix_state_detached",
        "path 2 continues from A's shared-prefix state detached: the same outputs, but A's rows get no "
        "gradient from path 2",
        [
            (
                "crystal_ext/model/path_scan.py",
                "initial_state=torch.cat([state, state])",
                "initial_state=torch.cat([state, state.detach()])",
            )
        ],
        [
            "tests/test_linear_families.py::test_both_paths_carry_the_shared_prefix_state_and_its_gradient",
            "tests/test_linear_families.py::test_a_long_prefix_scanned_once_equals_the_per_path_recurrence",
        ],
    ),
    Mutation(
        "linear_path2_starts_from_zero",
        "path 2 continues from a zero state instead of the state at the end of A's shared prefix",
        [
            (
                "crystal_ext/model/path_scan.py",
                "initial_state=torch.cat([state, state])",
                "initial_state=torch.cat([state, torch.zeros_like(state)])",
            )
        ],
        [
            "tests/test_linear_families.py::test_both_paths_carry_the_shared_prefix_state_and_its_gradient",
            "tests/test_linear_families.py::test_a_long_prefix_scanned_once_equals_the_per_path_recurrence",
        ],
    ),
    Mutation(
        "linear_prefix_not_whole_chunks",
        "the shared prefix is all of A, not its whole chunks: the delta rule's chunks start elsewhere "
        "than in the stock single-path scan, so float32 rounding differs from the stock model",
        [
            (
                "crystal_ext/model/path_scan.py",
                '    return CHUNK * (min(seg.size("a") for seg in segments) // CHUNK)',
                '    return min(seg.size("a") for seg in segments)',
            )
        ],
        ["tests/test_linear_families.py::test_path1_equals_the_stock_forward"],
    ),
    Mutation(
        "kv_shared_layer_reads_one_path",
        "a KV-shared layer (Gemma 4) reads shared keys and values of path 1 only: B's and F's slots hold "
        "C's and E's, so path 2 sees C",
        [
            (
                "crystal_ext/model/attention_registration.py",
                "    image_blocks = window is not None or not sliding_only\n",
                "    image_blocks = window is not None or not sliding_only\n"
                '    if getattr(module, "is_kv_shared_layer", False):\n'
                "        one_path = torch.arange(key.shape[2], device=key.device).repeat(key.shape[0], 1)\n"
                "        for b, seg in enumerate(plan.segments):\n"
                "            one_path[b, seg.b[0] : seg.b[1]] = torch.arange(seg.c[0], seg.c[1])\n"
                "            one_path[b, seg.f[0] : seg.f[1]] = torch.arange(seg.e[0], seg.e[1])\n"
                "        key, value = (t.gather(2, one_path[:, None, :, None].expand_as(t)) for t in (key, value))\n",
            )
        ],
        [
            "tests/test_gemma4.py::test_objective_and_gradients_equal_the_dense_eager_forward",
            "tests/test_gemma4.py::test_every_row_equals_the_dense_eager_forward",
        ],
    ),
    Mutation(
        "gemma4_image_blocks_on_full_layers",
        "Gemma 4's image blocks made bidirectional on the full layers too (the stock model: sliding only)",
        [
            (
                "crystal_ext/model/attention_registration.py",
                "    image_blocks = window is not None or not sliding_only\n",
                "    image_blocks = True\n",
            )
        ],
        [
            "tests/test_gemma4.py::test_objective_and_gradients_equal_the_dense_eager_forward",
            "tests/test_gemma4.py::test_every_row_equals_the_dense_eager_forward",
            "tests/test_gemma4.py::test_path1_equals_the_stock_forward",
        ],
    ),
    Mutation(
        "run_not_seeded_before_the_model",
        "the seed is set only by the Trainer, after the LoRA matrices and new token rows were drawn",
        [
            (
                "crystal_ext/train.py",
                "    set_seed(targs.seed)\n",
                "",
            )
        ],
        ["tests/test_families_train.py::test_a_lora_run_repeats_from_its_seed"],
    ),
    Mutation(
        "alignment_layer_one_attention_layer_early",
        "--alignment_layer last_attention reads the attention layer before the last full-attention one",
        [
            (
                "crystal_ext/model/alignment_layer.py",
                "    return len(types) - 1 - types[::-1].index(FULL_ATTENTION)\n",
                "    full = [i for i, t in enumerate(types) if t == FULL_ATTENTION]\n"
                "    return full[-2] if len(full) > 1 else full[-1]\n",
            )
        ],
        [
            "tests/test_alignment_layer.py::test_last_attention_equals_the_reference_read_at_the_last_attention_layer",
            "tests/test_alignment_layer.py::test_the_pictures_read_the_chosen_layer",
        ],
    ),
    Mutation(
        "rms_norm_simd_drops_the_tail_of_the_mean_square",
        "the bf16 SIMD forward sums the squares of the 16-lane body only, not of a row's tail",
        [
            (
                "csrc/cpu/rms_norm.cpp",
                "    for (int64_t i = body; i < h; ++i) squares += float(xr[i]) * float(xr[i]);\n",
                "",
            )
        ],
        ["tests/test_rms_norm.py"],
        csrc=True,
    ),
    Mutation(
        "rms_norm_simd_backward_sums_instead_of_averaging",
        "the bf16 SIMD backward takes sum(g w n) for mean(g w n)",
        [("csrc/cpu/rms_norm.cpp", "const float mean_dot = dot / float(h);", "const float mean_dot = dot;")],
        ["tests/test_rms_norm.py"],
        csrc=True,
    ),
    Mutation(
        "rms_norm_generic_ignores_eps",
        "the generic forward leaves eps out of the mean square",
        [
            (
                "csrc/cpu/rms_norm.cpp",
                "const acc inv = acc(1) / std::sqrt(squares / acc(h) + acc(eps));",
                "const acc inv = acc(1) / std::sqrt(squares / acc(h));",
            )
        ],
        ["tests/test_rms_norm.py"],
        csrc=True,
    ),
    Mutation(
        "rms_norm_weight_gradient_of_one_chunk",
        "the weight's gradient is the first chunk of rows' partial sum only",
        [
            (
                "csrc/cpu/rms_norm.cpp",
                "at::Tensor grad_weight = weight_grad ? partial.sum(0).to(weight.scalar_type())",
                "at::Tensor grad_weight = weight_grad ? partial[0].to(weight.scalar_type())",
            )
        ],
        ["tests/test_rms_norm.py"],
        csrc=True,
    ),
    Mutation(
        "rms_norm_fusion_runs_float64",
        "the fused norm runs the kernel on float64, which the stock forward computes in float32",
        [
            (
                "crystal_ext/model/rms_norm_fusion.py",
                "_KERNEL_DTYPES = (torch.bfloat16, torch.float32)",
                "_KERNEL_DTYPES = (torch.bfloat16, torch.float32, torch.float64)",
            )
        ],
        ["tests/test_rms_norm.py"],
    ),
    Mutation(
        "rms_norm_fusion_not_checked_on_the_model",
        "from_config builds fused norms without comparing them with the stock forward",
        [
            (
                "crystal_ext/model/runtime_fusions.py",
                "as from_pretrained leaves it\n    check_fused_rms_norms(model)\n",
                "as from_pretrained leaves it\n",
            )
        ],
        ["tests/test_rms_norm.py"],
    ),
    Mutation(
        "rms_norm_fusion_without_the_extension",
        "models built without the compiled extension get fused norms, which then fail in the baseline's forward",
        [
            (
                "crystal_ext/model/rms_norm_fusion.py",
                "    if not extension_available():  # the baseline without the extension keeps the stock norms\n",
                "    if False:\n",
            )
        ],
        ["tests/test_rms_norm.py"],
    ),
    Mutation(
        "published_step_runs_the_fused_norms",
        "the published step's stock modules leave the fused RMSNorms in place",
        [
            (
                "benchmarks/published_step.py",
                "        m.forward = types.MethodType(stock_class_of(m).forward, m)\n",
                "        pass\n",
            )
        ],
        ["tests/test_published_step.py"],
    ),
]


def _project_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


def _sync_project(dest: Path) -> None:
    """Makes `dest` hold this checkout's files, rewriting only those whose content differs."""
    for rel in _project_files():
        source, target = ROOT / rel, dest / rel
        data = source.read_bytes()
        if target.is_file() and target.read_bytes() == data:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        shutil.copymode(source, target)


def _workspace() -> Path:
    digest = hashlib.sha1(str(ROOT).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"crystal_ext-mutants-{digest}"


def _built_extension() -> list[str]:
    return glob.glob(str(ROOT / "crystal_ext" / "_C*.so"))


def _env(project: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(project) + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _pytest(project: Path, tests: list[str], timeout: int) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-x",
        "-q",
        "-rfE",
        "-p",
        "no:cacheprovider",
        "--no-header",
        "--benchmark-disable",  # the benchmarks' correctness guards, one pass, no timing
        *tests,
    ]
    return subprocess.run(
        cmd, cwd=project, env=_env(project), capture_output=True, text=True, timeout=timeout
    )


def _apply(project: Path, mutation: Mutation) -> str | None:
    """Applies the edits; returns why it could not, or None."""
    for rel, old, new in mutation.edits:
        path = project / rel
        text = path.read_text()
        if text.count(old) != 1:
            return f"{rel}: the text to replace occurs {text.count(old)} times (expected once)"
        path.write_text(text.replace(old, new))
    return None


def _build(project: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, CRYSTAL_EXT_CPU_ONLY="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    return subprocess.run(
        [
            sys.executable,
            "setup.py",
            "build_ext",
            "--inplace",
            "--force",
        ],  # ninja still rebuilds only what changed
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )


def _tail(proc: subprocess.CompletedProcess, n: int = 25) -> str:
    return "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-n:])


def run_one(mutation: Mutation, timeout: int) -> tuple[str, str]:
    """Returns (verdict, detail): verdict is caught, survived or error."""
    project = _workspace()
    _sync_project(project)
    for so in _built_extension():  # this checkout's extension, unless the mutation rebuilds it
        shutil.copy2(so, project / "crystal_ext")
    problem = _apply(project, mutation)
    if problem:
        return "error", problem
    try:
        if mutation.csrc:
            build = _build(project)
            if build.returncode != 0:
                return "error", "the mutated extension did not build:\n" + _tail(build)
        try:
            proc = _pytest(project, mutation.tests, timeout)
        except subprocess.TimeoutExpired:
            return "error", f"the tests ran past {timeout} s"
    finally:
        _sync_project(project)  # revert the mutation's files
        for so in _built_extension():
            shutil.copy2(so, project / "crystal_ext")
    if proc.returncode == 1:  # pytest: some tests failed
        return "caught", _tail(proc, 4)
    if proc.returncode == 0:
        return "survived", _tail(proc, 3)
    return "error", f"pytest exited {proc.returncode}:\n" + _tail(proc)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python-only", action="store_true", help="skip the C++ mutations (no rebuilds)")
    parser.add_argument("--only", action="append", help="run the mutation of this name (repeatable)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument(
        "--fresh", action="store_true", help="delete the scratch folder (and its C++ build) first"
    )
    args = parser.parse_args(argv)

    chosen = [m for m in MUTATIONS if not (args.python_only and m.csrc)]
    if args.only:
        unknown = set(args.only) - {m.name for m in MUTATIONS}
        if unknown:
            parser.error(f"--only: no mutation named {', '.join(sorted(unknown))}")
        chosen = [m for m in chosen if m.name in args.only]
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:36s} {'C++' if m.csrc else 'Py ':3s} {' '.join(m.tests)}\n    {m.what}")
        return 0
    if not _built_extension():
        print("mutations: build the extension here first (setup.py build_ext --inplace)", file=sys.stderr)
        return 2

    if args.fresh:
        shutil.rmtree(_workspace(), ignore_errors=True)
    # One run at a time per checkout: two runs would revert each other's mutations.
    _workspace().mkdir(parents=True, exist_ok=True)
    lock = open(_workspace() / ".lock", "w")  # noqa: SIM115 (held for the whole run)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"mutations: another run is using {_workspace()}", file=sys.stderr)
        return 2
    started = time.time()
    tests = sorted({t for m in chosen for t in m.tests})
    print(f"baseline: the unmutated project on {len(tests)} test ids", flush=True)
    # One pytest run per top-level folder: tests/ and benchmarks/ both hold a
    # test_lm_head_losses.py, and tests import theirs by module name.
    for folder in sorted({t.split("/", 1)[0] for t in tests}):
        baseline = _pytest(ROOT, [t for t in tests if t.split("/", 1)[0] == folder], args.timeout * 2)
        if baseline.returncode != 0:
            print("the unmutated tests fail already; fix them first:\n" + _tail(baseline), file=sys.stderr)
            return 2

    results = []
    for m in chosen:
        t0 = time.time()
        verdict, detail = run_one(m, args.timeout)
        results.append((m, verdict))
        print(f"{verdict.upper():9s} {m.name}  ({time.time() - t0:.0f} s; {' '.join(m.tests)})", flush=True)
        if verdict == "caught":  # the first failing test and its message
            failed = [line for line in detail.splitlines() if line.startswith(("FAILED", "ERROR"))]
            print("    " + (failed[0] if failed else detail.splitlines()[-1])[:220], flush=True)
        else:
            print("    " + m.what + "\n    " + detail.replace("\n", "\n    "), flush=True)
    print(f"scratch folder: {_workspace()}")
    caught = sum(v == "caught" for _, v in results)
    print(f"{caught}/{len(results)} mutations caught in {time.time() - started:.0f} s")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
