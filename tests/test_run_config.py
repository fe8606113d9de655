"""crystal_ext.train and crystal_ext.evaluate share one run configuration (training/run_config.py):
the same data split for held-out data (a DatasetDict folder or a hub data set gives `test`), the
same packer and the same evaluation settings."""

from __future__ import annotations

import argparse

import pytest
from PIL import Image

import crystal_ext.evaluate as evaluate_command
from crystal_ext.training import run_config


def _config(tmp_path, **overrides) -> dict:
    from crystal_ext.training.arguments import parse_args

    cargs, targs = parse_args(["--output_dir", str(tmp_path / "out"), "--max_steps", "1"])
    return {**run_config.run_config(cargs, targs, None), **overrides}


def _dataset_dict(tmp_path) -> str:
    from datasets import Dataset, DatasetDict

    Image.new("RGB", (28, 28), "red").save(tmp_path / "a.png")
    split = lambda answer: Dataset.from_list(  # noqa: E731
        [{"question": "q", "answer": answer, "image": str(tmp_path / "a.png")}] * 2
    )
    folder = tmp_path / "dict"
    DatasetDict({"train": split("from train"), "test": split("from test")}).save_to_disk(str(folder))
    return str(folder)


def _evaluate_args(data, merge=None, eval_examples=None):
    return argparse.Namespace(data=data, merge=merge, eval_examples=eval_examples)


def test_train_and_evaluate_read_the_same_held_out_split(tmp_path):
    import crystal_ext.train as train

    folder = _dataset_dict(tmp_path)
    config = _config(tmp_path, data=folder, eval_data=folder)
    train_set, held_out = train.build_datasets(config)
    assert train_set[0].answer == "from train" and held_out[0].answer == "from test"
    evaluated = evaluate_command.held_out_set(_evaluate_args(folder), config)
    assert [evaluated[i].answer for i in range(len(evaluated))] == ["from test"] * 2


def test_a_hub_data_set_gives_its_test_split_to_both_commands(tmp_path, monkeypatch):
    import datasets

    import crystal_ext.train as train
    from crystal_ext.training import arguments

    Image.new("RGB", (28, 28), "red").save(tmp_path / "a.png")
    asked = []

    def load_dataset(path, split):
        asked.append((path, split))
        return datasets.Dataset.from_list(
            [{"question": "q", "answer": split, "image": str(tmp_path / "a.png")}]
        )

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(arguments, "check_data_available", lambda flag, path: None)  # no network here
    config = _config(tmp_path, data="someone/vqa", eval_data="someone/vqa")
    train_set, held_out = train.build_datasets(config)
    evaluated = evaluate_command.held_out_set(_evaluate_args("someone/vqa"), config)
    assert asked == [("someone/vqa", "train"), ("someone/vqa", "test"), ("someone/vqa", "test")]
    assert (train_set[0].answer, held_out[0].answer, evaluated[0].answer) == ("train", "test", "test")


def test_merge_alone_needs_no_held_out_data(tmp_path):
    config = _config(tmp_path, data=str(tmp_path / "train.jsonl"), eval_data=None)
    assert evaluate_command.held_out_set(_evaluate_args(None, merge="m"), config) is None
    assert evaluate_command.held_out_set(_evaluate_args(None, merge="m", eval_examples=0), config) is None
    with pytest.raises(ValueError, match="pass --data HELD_OUT_FILE"):
        evaluate_command.held_out_set(_evaluate_args(None), config)


def test_the_evaluation_settings_are_the_run_s(tmp_path):
    config = _config(
        tmp_path,
        blur_radius_min=3.0,
        blur_radius_max=4.0,
        seed=7,
        image_size=56,
        chat_template_kwargs='{"enable_thinking": false}',
    )
    settings = run_config.evaluation_settings(config)
    assert settings == {
        "system": config["system_prompt"],
        "image_size": 56,
        "num_latent_tokens": config["num_latent_tokens"],
        "blur_radius": (3.0, 4.0),
        "seed": 7,
        "template_kwargs": {"enable_thinking": False},
        "alignment_layer": "last",
    }
    assert run_config.corruption_config(config).blur_radius == (3.0, 4.0)
