"""`python -m crystal_ext.evaluate`: greedy intact-path answers, accuracy intact vs blurred, and
the --merge round trip (a LoRA run folded into a stock model that plain from_pretrained loads,
with the same outputs as the unmerged peft model)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from train_helpers import FAST, loss_at, run

import crystal_ext

pytestmark = pytest.mark.skipif(
    not crystal_ext.extension_available(), reason="training runs the compiled fused ops"
)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    run(
        [
            "--use_lora",
            "true",
            "--max_steps",
            "3",
            "--save_steps",
            "3",
            "--per_device_train_batch_size",
            "4",
            "--learning_rate",
            "1e-2",
            "--output_dir",
            str(out),
            *FAST,
        ]
    )
    return out


def test_lora_run_saves_adapter_and_token_rows(lora_run):
    assert (lora_run / "adapter_model.safetensors").is_file()
    assert (lora_run / "crystal_token_rows.safetensors").is_file()
    assert (lora_run / "checkpoint-3" / "crystal_token_rows.safetensors").is_file()
    assert (lora_run / "base_model" / "config.json").is_file()


def test_evaluate_and_merge_round_trip(lora_run, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from crystal_ext.data.chat import prompt_messages, render
    from crystal_ext.data.synthetic import SyntheticVQA
    from crystal_ext.training.run_loading import load_trained

    merged = tmp_path / "merged"
    results = tmp_path / "results.json"
    proc = run(
        ["--model", str(lora_run), "--eval_examples", "6", "--merge", str(merged), "--output", str(results)],
        module="crystal_ext.evaluate",
    )
    assert "held-out accuracy" in proc.stdout
    result = json.loads(results.read_text())
    assert result["n"] == 6 and len(result["examples"]) == 6
    for name in ("intact", "blurred", "latent_carried"):  # the share of its examples answered right
        right = sum(r[name] == r["answer"] for r in result["examples"])
        assert result[f"accuracy_{name}"] == pytest.approx(right / 6)
    # the latent-carried evaluation of a LoRA run: the corrupted path through the peft model
    assert result["attention_kl"] >= 0
    assert all(
        r["latent_carried_correct"] == (r["latent_carried"] == r["answer"]) for r in result["examples"]
    )
    assert "latent-carried" in proc.stdout

    # the merged folder is a stock model: plain from_pretrained of the stock class, no peft, no crystal_ext
    config = json.loads((merged / "config.json").read_text())
    assert "adapter" not in " ".join(p.name for p in merged.iterdir())
    plain = Qwen2_5_VLForConditionalGeneration.from_pretrained(merged).eval()
    peft_model, processor, run_config = load_trained(str(lora_run))
    assert hasattr(peft_model, "merge_and_unload")  # a peft model: base + adapter + token rows
    ex = SyntheticVQA(2, "test", task=run_config["task"], image_size=run_config["image_size"])
    inputs = processor(
        text=[
            render(processor, prompt_messages(ex[i], run_config["system_prompt"])) + "<think>"
            for i in range(2)
        ],
        images=[ex[i].image for i in range(2)],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        want = peft_model(**inputs).logits
        got = plain(**inputs).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # LoRA changed the model: the comparison is not trivially base vs base
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(lora_run / "base_model").eval()
    base.resize_token_embeddings(plain.get_input_embeddings().weight.shape[0], mean_resizing=False)
    with torch.no_grad():
        assert (base(**inputs).logits - want).abs().max() > 1e-3
    assert config["model_type"] == "qwen2_5_vl"


def test_extract_answer_and_prompt():
    from crystal_ext.data.chat import prompt_messages, render
    from crystal_ext.data.example import Example
    from crystal_ext.model.latent_tokens import add_latent_tokens
    from crystal_ext.training.answers import extract_answer
    from crystal_ext.training.tiny_model import tiny_tokenizer

    tok = tiny_tokenizer()
    lat = add_latent_tokens(tok, None, k=2)
    ids = [
        lat.think_open,
        *lat.latent_ids,
        lat.think_close,
        lat.answer_open,
        *tok("triangle", add_special_tokens=False).input_ids,
        lat.answer_close,
    ]
    assert extract_answer(tok, ids) == "triangle"
    assert extract_answer(tok, ids[:-1]) == "triangle"  # cut off before </answer>
    assert extract_answer(tok, ids[:3]) is None
    end, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id
    assert extract_answer(tok, ids[:-1] + [end, pad, pad]) == "triangle"  # the turn ended without </answer>
    # A stray special token inside the answer is not the answer (skip_special_tokens used to drop
    # it: a model writing "<answer><|latent_1|> triangle</answer>" was scored correct).
    stray = ids[:5] + [lat.latent_ids[1]] + ids[5:]
    assert extract_answer(tok, stray) not in (None, "triangle")
    assert extract_answer(tok, ids[:5] + [lat.think_close] + ids[5:]) != "triangle"
    text = render(
        tok,
        prompt_messages(
            Example("q", None, "what shape is in the image ?", None), "you are a helpful assistant ."
        ),
    )
    assert "<unk>" not in tok.decode(tok(text).input_ids)


STOP_AT_STEP = """
import sys
from transformers import TrainerCallback
from crystal_ext.train import main


class StopAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 3:
            control.should_training_stop = True


main(sys.argv[1:], extra_callbacks=[StopAfterSave()])
"""


def test_lora_resume_restores_the_new_rows_and_their_optimizer_state(tmp_path):
    """A LoRA run stopped after its step-3 checkpoint and resumed reaches the uninterrupted run's
    loss and rows at step 6: the rows (and their AdamW state) come back from the checkpoint."""
    from safetensors.torch import load_file

    common = ["--use_lora", "true", "--max_steps", "6", "--save_steps", "3", "--learning_rate", "1e-2"]
    common += ["--per_device_train_batch_size", "2", *FAST]
    run([*common, "--output_dir", str(tmp_path / "straight")])
    out = tmp_path / "stopped"
    run([*common, "--output_dir", str(out)], prefix=[sys.executable, "-c", STOP_AT_STEP])
    assert not (out / "checkpoint-6").exists()
    run([*common, "--output_dir", str(out), "--resume_from_checkpoint", "last"])
    want = loss_at(tmp_path / "straight", 6)
    assert abs(loss_at(out, 6) - want) <= 1e-5 * max(1.0, abs(want))
    rows = load_file(out / "crystal_token_rows.safetensors")
    straight = load_file(tmp_path / "straight" / "crystal_token_rows.safetensors")
    start = load_file(out / "checkpoint-3" / "crystal_token_rows.safetensors")
    for name in ("embed_tokens", "lm_head"):
        torch.testing.assert_close(rows[name], straight[name], rtol=1e-5, atol=1e-6)
        assert not torch.equal(rows[name], start[name])  # the rows trained on after the resume


def test_accuracy_counts_the_right_answers(monkeypatch):
    """evaluate_model on four examples whose generated answers are fixed: intact gets examples 0,
    1 and 3 right (one answer is cut off before </answer>, which still counts), blurred only
    example 1 (one answer is wrong, one never opens <answer>): 0.75 and 0.25."""
    from PIL import Image

    from crystal_ext.data.example import Example
    from crystal_ext.model.latent_tokens import add_latent_tokens
    from crystal_ext.training import evaluation
    from crystal_ext.training.tiny_model import tiny_tokenizer

    tok = tiny_tokenizer()
    lat = add_latent_tokens(tok, None, k=2)
    answers = ["red circle", "green", "blue", "green square"]

    def written(text, close=True):
        body = tok(text, add_special_tokens=False).input_ids if text else []
        head = [lat.think_open, *lat.latent_ids, lat.think_close]
        return head + [lat.answer_open, *body] + ([lat.answer_close] if close else [])

    generated = {
        "intact": [
            written("red circle"),
            written("green"),
            written("red"),
            written("green square", close=False),
        ],
        "blurred": [written("blue circle"), written("green"), written(None)[:3], written("blue square")],
    }
    calls = []

    def fake_generate(model, processor, images, questions, system, max_new, **_):
        kind = ("intact", "blurred")[len(calls) % 2]  # per batch: the intact images, then the blurred
        calls.append(kind)
        assert len(images) == len(questions) == 4
        return generated[kind]

    class Processor:
        tokenizer = tok

    picture = Image.new("RGB", (28, 28), (200, 10, 10))
    dataset = [Example(f"k{i}", picture, "what is in the image ?", a) for i, a in enumerate(answers)]
    monkeypatch.setattr(evaluation, "generate_answers", fake_generate)
    result = evaluation.evaluate_model(
        torch.nn.Module(),
        Processor(),
        dataset,
        system="s",
        image_size=28,
        num_latent_tokens=2,
        progress=False,
    )
    assert calls == ["intact", "blurred"] and result["n"] == 4
    assert result["accuracy_intact"] == 0.75 and result["accuracy_blurred"] == 0.25
    assert [r["intact"] == r["answer"] for r in result["examples"]] == [True, True, False, True]
    assert [r["blurred"] == r["answer"] for r in result["examples"]] == [False, True, False, False]


def test_gold_answers_with_capitals_match_case_insensitively(monkeypatch):
    """Real tokenizers keep case: a gold "Red Circle" is matched by the model's "red circle" and its
    "Red Circle" alike (both sides are lower-cased), and "Blue" is still not "Red"."""
    from PIL import Image

    from crystal_ext.data.example import Example
    from crystal_ext.model.latent_tokens import add_latent_tokens
    from crystal_ext.training import evaluation
    from crystal_ext.training.tiny_model import SPECIAL, word_level_tokenizer

    tok = word_level_tokenizer(["Red", "red", "Circle", "circle", "Blue", "blue"], SPECIAL)
    lat = add_latent_tokens(tok, None, k=2)
    assert tok.decode(tok("Red", add_special_tokens=False).input_ids) == "Red"  # the tokenizer keeps case

    def written(text):
        body = tok(text, add_special_tokens=False).input_ids
        return [lat.think_open, *lat.latent_ids, lat.think_close, lat.answer_open, *body, lat.answer_close]

    gold = ["Red Circle", "Red Circle", "blue", "Red"]
    given = ["red circle", "Red Circle", "Blue", "Blue"]
    monkeypatch.setattr(evaluation, "generate_answers", lambda *a, **k: [written(g) for g in given])

    class Processor:
        tokenizer = tok

    picture = Image.new("RGB", (28, 28))
    dataset = [Example(f"k{i}", picture, "q", answer) for i, answer in enumerate(gold)]
    result = evaluation.evaluate_model(
        torch.nn.Module(),
        Processor(),
        dataset,
        system="s",
        image_size=28,
        num_latent_tokens=2,
        progress=False,
    )
    assert [r["intact_correct"] for r in result["examples"]] == [True, True, True, False]
    assert result["accuracy_intact"] == 0.75


def test_merge_alone_writes_the_trained_rows_without_evaluating(lora_run, tmp_path):
    """`--merge DIR` on its own: no evaluation and no data needed; the merged embedding and LM head
    (the tiny model's head is untied) hold exactly the saved rows of the new tokens."""
    from safetensors.torch import load_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    merged = tmp_path / "merged"
    proc = run(["--model", str(lora_run), "--merge", str(merged)], module="crystal_ext.evaluate")
    assert "merged model" in proc.stdout and "held-out accuracy" not in proc.stdout
    assert not (lora_run / "eval_results.json").exists()
    saved = load_file(lora_run / "crystal_token_rows.safetensors")
    assert {"ids", "embed_tokens", "lm_head"} <= set(saved)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(merged)
    assert not model.config.tie_word_embeddings
    ids = saved["ids"]
    torch.testing.assert_close(
        model.get_input_embeddings().weight[ids], saved["embed_tokens"], rtol=0, atol=0
    )
    torch.testing.assert_close(model.get_output_embeddings().weight[ids], saved["lm_head"], rtol=0, atol=0)
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(lora_run / "base_model")
    assert not torch.equal(base.get_output_embeddings().weight[ids], saved["lm_head"])  # the rows trained
    # without --merge, --eval_examples 0 leaves nothing to do
    proc = run(["--model", str(lora_run), "--eval_examples", "0"], module="crystal_ext.evaluate", check=False)
    assert proc.returncode == 2 and "evaluates nothing" in proc.stderr
