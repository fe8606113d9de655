"""crystal_ext's model side refuses a transformers older than the oldest release its tests passed
on (crystal_ext.model.transformers_support), with a message naming both versions; the command-line
tools stop with it before any work; pyproject.toml asks for the same floor."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from crystal_ext.model import transformers_support
from crystal_ext.model.attention_registration import register_dual_path_attention
from crystal_ext.model.runtime_fusions import load_pretrained
from crystal_ext.model.transformers_support import MIN_TRANSFORMERS, transformers_problem

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def old_transformers(monkeypatch):
    monkeypatch.setattr(transformers_support, "installed_transformers", lambda: "5.17.0")


def test_the_installed_transformers_is_supported():
    assert transformers_problem() is None


def test_an_older_transformers_is_refused_by_name(old_transformers):
    problem = transformers_problem()
    assert problem is not None and "5.17.0" in problem and f">= {MIN_TRANSFORMERS}" in problem
    with pytest.raises(RuntimeError, match="5.17.0"):
        register_dual_path_attention()
    with pytest.raises(RuntimeError, match="5.17.0"):  # before anything is read from the folder
        load_pretrained("/nonexistent", torch.float32)


@pytest.mark.parametrize("module", ["crystal_ext.train", "crystal_ext.evaluate", "crystal_ext.check"])
def test_the_command_line_tools_stop_before_any_work(module, old_transformers, tmp_path, capsys):
    import importlib

    argv = {
        "crystal_ext.train": ["--output_dir", str(tmp_path / "o")],
        "crystal_ext.evaluate": ["--model", str(tmp_path / "none")],
        "crystal_ext.check": ["--model", str(tmp_path / "none"), "--data", str(tmp_path / "none.jsonl")],
    }[module]
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(module).main(argv)
    assert stop.value.code == 2
    assert f"transformers >= {MIN_TRANSFORMERS}; this is 5.17.0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_pyproject_asks_for_the_same_floor():
    text = (ROOT / "pyproject.toml").read_text()
    floors = re.findall(r'"transformers>=([0-9.]+)"', text)
    assert floors and all(MIN_TRANSFORMERS.startswith(f) for f in floors), floors
