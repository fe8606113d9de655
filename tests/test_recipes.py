"""Recipes as files: `python -m crystal_ext.train recipes/NAME.yaml [flags]`. Every shipped recipe
parses into the arguments it states; the command line overrides the file; bad recipes say why."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from crystal_ext.training import arguments
from crystal_ext.training.arguments import parse_args, recipe_argv

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def _without_deepspeed(argv: list[str]) -> list[str]:
    # TrainingArguments loads DeepSpeed as soon as --deepspeed is set; it is a GPU-machine package.
    if importlib.util.find_spec("deepspeed") is not None or "--deepspeed" not in argv:
        return argv
    at = argv.index("--deepspeed")
    return argv[:at] + argv[at + 2 :]


def test_recipes_are_shipped():
    assert {p.name for p in RECIPES} >= {"qwen2_5_vl_7b.yaml", "qwen3_vl_8b.yaml", "qwen3_5_9b.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_each_shipped_recipe_parses_into_what_it_says(recipe, monkeypatch, tmp_path):
    monkeypatch.setattr(arguments, "check_model_available", lambda model: None)  # hub ids, offline here
    settings = yaml.safe_load(recipe.read_text())
    argv = recipe_argv([str(recipe), "--output_dir", str(tmp_path / "out")])
    zero = Path(argv[argv.index("--deepspeed") + 1])
    assert zero.is_file() and json.loads(zero.read_text())["zero_optimization"]["stage"] == 2
    cargs, targs = parse_args(_without_deepspeed(argv))
    for name, want in settings.items():
        if name in ("deepspeed", "output_dir"):
            continue
        got = getattr(cargs, name) if hasattr(cargs, name) else getattr(targs, name)
        got = getattr(got, "value", got)  # enums (lr_scheduler_type)
        assert got == want, name
    assert targs.output_dir == str(tmp_path / "out")  # the command line overrides the file


def test_the_command_line_overrides_the_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_steps: 10\nlearning_rate: 0.001\nuse_lora: false\nreport_to: [tensorboard]\n")
    argv = recipe_argv([str(recipe), "--max_steps", "3"])
    assert argv == [
        "--max_steps", "10", "--learning_rate", "0.001", "--use_lora", "false",
        "--report_to", "tensorboard", "--max_steps", "3",
    ]  # fmt: skip
    cargs, targs = parse_args(argv + ["--output_dir", str(tmp_path / "o")])
    assert targs.max_steps == 3 and targs.learning_rate == 0.001 and cargs.use_lora is False


@pytest.mark.parametrize(
    "text, message",
    [
        ("- a\n- b\n", "expected a mapping"),
        ("max_steps: [1\n", "not valid YAML"),
        ("nope: 1\n", "unknown arguments"),
    ],
)
def test_a_bad_recipe_says_why(tmp_path, text, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(ValueError, match=message):
        parse_args([str(recipe), "--output_dir", str(tmp_path / "o")])


def test_a_missing_recipe_is_named(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        recipe_argv([str(tmp_path / "none.yaml")])
    assert recipe_argv(["--max_steps", "3"]) == ["--max_steps", "3"]
