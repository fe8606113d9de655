"""Training sees exactly what the model is served with: path 1 of every packed sequence is the
processor's own `apply_chat_template(messages, add_generation_prompt=True)` followed by the
trained block, for every tested family (templates from tests/chat_templates.py), with a system
turn only from the record or an explicit option, and one think opening with thinking templates."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from chat_templates import (
    DEFAULT_SYSTEM,
    FAMILY_TEMPLATES,
    HYBRID_THINKING_TEMPLATE,
    QWEN3_VL_THINKING_TEMPLATE,
    turn_end_of,
    use_template,
)
from family_models import FAMILIES, QWEN_TEMPLATE, build
from PIL import Image

from crystal_ext.data.example import Example
from crystal_ext.data.packing import DualPathPacker
from crystal_ext.model.latent_tokens import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN
from crystal_ext.ops.layout import segments_of

QUESTION, ANSWER = "what is in the image ?", "red circle"


@functools.cache
def _build(family):
    return build(family)


def _image(seed=0, w=40, h=50):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _packer(family, template, **kw):
    model, processor, latent = _build(family)
    use_template(processor, template)
    return DualPathPacker(processor, latent, model, **kw)


def _path1(packed) -> list[int]:
    return packed["input_ids"][segments_of(packed["layout"][None])[0].path1()].tolist()


def _served(processor, messages, images, **template_kwargs) -> list[int]:
    """The ids a served model reads: the processor's own rendering with the generation prompt."""
    text = processor.apply_chat_template(messages, add_generation_prompt=True, **template_kwargs)
    ids = processor(text=[text], images=[images], add_special_tokens=False).input_ids[0]
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)  # PixtralProcessor returns tensors


def _block(processor, latent, family, think_open=True) -> list[int]:
    """The trained block, written out: the think block (or its continuation), the answer, the turn end."""
    latents = "".join(processor.tokenizer.convert_ids_to_tokens(list(latent.latent_ids)))
    text = (THINK_OPEN if think_open else "") + latents + THINK_CLOSE
    text += f"{ANSWER_OPEN}{ANSWER}{ANSWER_CLOSE}{turn_end_of(family)}"
    return processor.tokenizer(text, add_special_tokens=False).input_ids


def _user(*parts):
    return {
        "role": "user",
        "content": [*({"type": "image"} for _ in range(parts[0])), {"type": "text", "text": parts[1]}],
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_path1_is_the_stock_rendering_then_the_trained_block(family):
    packer = _packer(family, FAMILY_TEMPLATES[family])
    image = _image()
    path1 = _path1(packer.pack(Example("k", image, QUESTION, ANSWER)))
    messages = [_user(1, QUESTION)]
    served = _served(packer.processor, messages, [image])
    assert path1 == served + _block(packer.processor, packer.latent, family)
    # the templates behave as the checkpoints' do: only Qwen2/2.5-VL's writes a system turn
    rendered = packer.processor.apply_chat_template(messages, add_generation_prompt=True)
    assert (DEFAULT_SYSTEM in rendered) == family.startswith(("qwen2_vl", "qwen2_5_vl"))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "idefics3"])
def test_multi_turn_path1_is_the_stock_rendering_of_every_turn(family):
    """Earlier turns, their answers included, are the data's own text as the template renders them."""
    packer = _packer(family, FAMILY_TEMPLATES[family])
    images = [_image(1), _image(2, 30, 30)]
    messages = [
        _user(1, "what colour"),
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        _user(1, QUESTION),
    ]
    path1 = _path1(packer.pack(Example("k", images, QUESTION, ANSWER, messages=messages)))
    assert path1 == _served(packer.processor, messages, images) + _block(
        packer.processor, packer.latent, family
    )


def test_system_turn_comes_from_the_record_or_the_explicit_option_only():
    image = _image()
    system = {"role": "system", "content": [{"type": "text", "text": "what shape"}]}
    block = None
    for template, record_system, option, want_messages in [
        # an explicit system option is the system turn of a record that has none
        (
            QWEN_TEMPLATE,
            None,
            DEFAULT_SYSTEM,
            [{"role": "system", "content": [{"type": "text", "text": DEFAULT_SYSTEM}]}],
        ),
        # a record's own system turn wins over the option and over the template's default
        (QWEN_TEMPLATE, system, DEFAULT_SYSTEM, [system]),
        (FAMILY_TEMPLATES["qwen2_5_vl"], system, None, [system]),
    ]:
        packer = _packer("qwen3_vl", template, system=option)
        block = _block(packer.processor, packer.latent, "qwen3_vl")
        messages = [*([record_system] if record_system else []), _user(1, QUESTION)]
        path1 = _path1(packer.pack(Example("k", [image], QUESTION, ANSWER, messages=messages)))
        assert path1 == _served(packer.processor, want_messages + [_user(1, QUESTION)], [image]) + block


def test_a_generation_prompt_that_opens_a_think_block_is_continued_by_the_latents():
    """Qwen3-VL-Thinking: the template writes "<think>\\n"; the latent block continues it, so the
    sequence holds one think opening, not two."""
    packer = _packer("qwen3_vl", QWEN3_VL_THINKING_TEMPLATE)
    image = _image()
    packed = packer.pack(Example("k", image, QUESTION, ANSWER))
    path1 = _path1(packed)
    served = _served(packer.processor, [_user(1, QUESTION)], [image])
    assert path1 == served + _block(packer.processor, packer.latent, "qwen3_vl", think_open=False)
    assert path1.count(packer.latent.think_open) == 1 and path1.count(packer.latent.think_close) == 1
    d0, d1 = segments_of(packed["layout"][None])[0].d
    assert packed["input_ids"][d0:d1].tolist() == [*packer.latent.latent_ids, packer.latent.think_close]


def test_thinking_off_keeps_the_templates_empty_think_block_before_the_latent_block():
    """A template that closes an empty think block when thinking is off: that prompt is what is
    served, so it stays, and the latent block follows it whole. With thinking on it writes none."""
    image = _image()
    for kwargs, empty in (({"enable_thinking": False}, True), ({}, False)):
        packer = _packer("qwen3_vl", HYBRID_THINKING_TEMPLATE, template_kwargs=kwargs)
        path1 = _path1(packer.pack(Example("k", image, QUESTION, ANSWER)))
        served = _served(packer.processor, [_user(1, QUESTION)], [image], **kwargs)
        assert path1 == served + _block(packer.processor, packer.latent, "qwen3_vl")
        rendered = packer.processor.apply_chat_template(
            [_user(1, QUESTION)], add_generation_prompt=True, **kwargs
        )
        assert rendered.endswith(f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n") == empty
        assert path1.count(packer.latent.think_open) == 1 + empty


class _RecordingModel(torch.nn.Module):
    """Stands in for a model in generate_answers: records the prompt ids and writes nothing."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.prompts = []

    def generate(self, input_ids, **_):
        self.prompts += input_ids.tolist()
        return input_ids


@pytest.mark.parametrize(
    "template, kwargs",
    [
        (FAMILY_TEMPLATES["qwen2_5_vl"], {}),
        (QWEN3_VL_THINKING_TEMPLATE, {}),
        (HYBRID_THINKING_TEMPLATE, {"enable_thinking": False}),
    ],
)
def test_evaluation_generates_from_the_prompt_training_packs(template, kwargs):
    from crystal_ext.training.generation import generate_answers

    packer = _packer("qwen3_vl", template, template_kwargs=kwargs)
    image = _image()
    example = Example("k", image, QUESTION, ANSWER)
    seg = segments_of(packer.pack(example)["layout"][None])[0]
    trained_prompt = _path1(packer.pack(example))[: seg.a[1] + seg.c[1] - seg.c[0]]
    model = _RecordingModel()
    generate_answers(
        model, packer.processor, [image], [QUESTION], None, 4, examples=[example], template_kwargs=kwargs
    )
    assert model.prompts == [trained_prompt]
    assert trained_prompt == _served(packer.processor, [_user(1, QUESTION)], [image], **kwargs)


def test_embedded_default_packs_what_it_packed_with_its_injected_system_turn():
    """The embedded tiny template writes its default system turn itself (as Qwen2.5-VL's does), so
    the default run, which no longer injects one, packs the same sequence as before."""
    from crystal_ext.data.synthetic import SyntheticVQA
    from crystal_ext.model.latent_tokens import add_latent_tokens
    from crystal_ext.training.arguments import parse_args
    from crystal_ext.training.tiny_model import (
        TINY_DEFAULT_SYSTEM,
        tiny_model,
        tiny_processor,
        tiny_tokenizer,
    )

    cargs, _ = parse_args(["--output_dir", "unused"])
    assert cargs.system_prompt is None
    tok = tiny_tokenizer()
    latent = add_latent_tokens(tok, None, k=2)
    model, processor = tiny_model(tok), tiny_processor(tok)
    example = SyntheticVQA(1, "train")[0]
    now = DualPathPacker(processor, latent, model, system=cargs.system_prompt).pack(example)
    before = DualPathPacker(processor, latent, model, system=TINY_DEFAULT_SYSTEM).pack(example)
    for name in ("input_ids", "targets", "position_ids", "layout"):
        assert torch.equal(now[name], before[name]), name
    system_turn = tok(
        f"<|im_start|>system\n{TINY_DEFAULT_SYSTEM}<|im_end|>", add_special_tokens=False
    ).input_ids
    assert now["input_ids"][: len(system_turn)].tolist() == system_turn


def test_template_kwargs_option_reaches_training_and_evaluation(tmp_path):
    """--chat_template_kwargs: JSON text on the command line, a mapping in a recipe, checked up
    front; the run config carries it to crystal_ext.evaluate's packer."""
    from crystal_ext.training.arguments import parse_args
    from crystal_ext.training.run_config import make_packer

    flag = '{"enable_thinking": false}'
    cargs, _ = parse_args(["--chat_template_kwargs", flag, "--output_dir", str(tmp_path)])
    assert cargs.template_kwargs() == {"enable_thinking": False}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("chat_template_kwargs:\n  enable_thinking: false\n")
    assert parse_args([str(recipe), "--output_dir", str(tmp_path)])[0].template_kwargs() == {
        "enable_thinking": False
    }
    for bad in ("[1]", "{enable_thinking: false}"):
        with pytest.raises(ValueError, match="--chat_template_kwargs must be a JSON object"):
            parse_args(["--chat_template_kwargs", bad, "--output_dir", str(tmp_path)])
    model, processor, _ = _build("qwen3_vl")
    use_template(processor, HYBRID_THINKING_TEMPLATE)
    config = dict(
        num_latent_tokens=4, corruption="blur", blur_radius_min=2.0, blur_radius_max=5.0, seed=0,
        image_size=None, max_length=4096, system_prompt=None, chat_template_kwargs=flag,
    )  # fmt: skip
    packer = make_packer(config, processor, None, model)
    assert packer.chat.template_kwargs == {"enable_thinking": False}
    assert packer.chat.prompt(Example("k", _image(), QUESTION, ANSWER)).endswith(f"{THINK_CLOSE}\n\n")
    del config["chat_template_kwargs"]  # a run written before the option: the template's defaults
    assert make_packer(config, processor, None, model).chat.template_kwargs == {}
