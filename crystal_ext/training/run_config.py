"""One run's configuration, shared by `crystal_ext.train` and `crystal_ext.evaluate`.

The training run builds this configuration from its arguments, uses it for its own packer, data
and evaluation, and writes it as `crystal_config.json`; `crystal_ext.evaluate` reads it back and
calls the same functions. So the two commands cannot disagree on the data split they read, the
corruption and seed of the corrupted path, the image size, the think block or the evaluation's
settings.

Data splits: a `datasets` folder holding a DatasetDict, or a data set on the hub, gives its
`train` split to `--data` and its `test` split to held-out data (`--eval_data`, and
`crystal_ext.evaluate --data`); a JSON / JSONL file or a single-split folder is read whole.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

CONFIG_FILE = "crystal_config.json"
DATA_SEED = 0  # the synthetic task's data seed (its splits are disjoint key spaces)
TRAIN_SPLIT = "train"
HELD_OUT_SPLIT = "test"


def run_config(cargs, targs, base_model: str | None) -> dict:
    """The configuration of a training run: CrystaL's arguments, the seed, the data seed, where the
    base model of a LoRA run is, and the absolute output folder."""
    return {
        **asdict(cargs),
        "seed": targs.seed,
        "data_seed": DATA_SEED,
        "base_model": base_model,
        "output_dir_abs": os.path.abspath(targs.output_dir),
    }


def write_run_config(config: dict, folder: str) -> str:
    path = os.path.join(folder, CONFIG_FILE)
    with open(path, "w") as f:
        json.dump(config, f, indent=1)
    return path


def read_run_config(folder: str) -> dict:
    """The configuration of the run that wrote `folder` (an output folder or one of its checkpoints)."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        # A checkpoint folder: the run's config sits in the output folder above it.
        path = os.path.join(os.path.dirname(os.path.abspath(folder)), CONFIG_FILE)
    if not os.path.isfile(path):
        raise ValueError(
            f"{folder}: no {CONFIG_FILE} here or in the folder above (not written by crystal_ext.train)"
        )
    with open(path) as f:
        return json.load(f)


def corruption_config(config: dict):
    from crystal_ext.data.corruption import CorruptionConfig

    return CorruptionConfig(
        kind=config["corruption"], blur_radius=(config["blur_radius_min"], config["blur_radius_max"])
    )


def make_packer(config: dict, processor, latent, model):
    """The run's DualPathPacker: its corruption, seed, image size, length limit, system message and
    chat template variables.
    `latent` None: the latent tokens the trained tokenizer already holds (their ids are read)."""
    from crystal_ext.data.packing import DualPathPacker

    if latent is None:
        from crystal_ext.model.latent_tokens import add_latent_tokens

        latent = add_latent_tokens(
            getattr(processor, "tokenizer", processor), None, k=config["num_latent_tokens"]
        )

    return DualPathPacker(
        processor,
        latent,
        model,
        corruption_config(config),
        seed=config["seed"],
        image_size=config["image_size"],
        max_length=config["max_length"],
        system=config["system_prompt"],
        template_kwargs=template_kwargs(config),
    )


def evaluation_settings(config: dict) -> dict:
    """The keyword arguments of `evaluation.evaluate_model` that come from the run."""
    return {
        "system": config["system_prompt"],
        "image_size": config["image_size"],
        "num_latent_tokens": config["num_latent_tokens"],
        "blur_radius": (config["blur_radius_min"], config["blur_radius_max"]),
        "seed": config["seed"],
        "template_kwargs": template_kwargs(config),
        "alignment_layer": alignment_layer(config),
    }


def alignment_layer(config: dict) -> str:
    """The layer whose attention the run's alignment loss read (--alignment_layer); a run written
    before the flag existed read the last one."""
    return config.get("alignment_layer", "last")


def template_kwargs(config: dict) -> dict:
    """The chat template's variables the run trained with (--chat_template_kwargs)."""
    from crystal_ext.data.chat import parse_template_kwargs

    return parse_template_kwargs(config.get("chat_template_kwargs"))


def _checked(path: str, flag: str, image_folder: str | None, split: str, limit: int | None = None):
    """The records of `path` after the data check (ValueError naming `flag` when it cannot be read
    or most records cannot be used)."""
    from crystal_ext.data.records import check_dataset, load_examples

    try:
        data = load_examples(path, image_folder, split=split)
    except (OSError, ValueError) as exc:
        raise ValueError(str(exc).replace("--data", flag, 1)) from None
    if limit is not None and limit < len(data):
        data.records = (
            data.records[:limit] if isinstance(data.records, list) else data.records.select(range(limit))
        )
    data.report = check_dataset(data, flag)
    return data


def training_data(config: dict, flag: str = "--data"):
    """The training set: `--data` checked (its `report` holds the check's counts), or the
    synthetic task."""
    if config["data"] is None:
        from crystal_ext.data.synthetic import SyntheticVQA

        return SyntheticVQA(
            config["train_examples"],
            TRAIN_SPLIT,
            seed=config["data_seed"],
            task=config["task"],
            image_size=config["image_size"],
        )
    return _checked(config["data"], flag, config["image_folder"], TRAIN_SPLIT)


def held_out_data(config: dict, data: str | None = None, limit: int | None = None, flag: str = "--eval_data"):
    """The held-out set: `data` (default: the run's `--eval_data`) checked, or the synthetic
    task's held-out split when the run trained on it (`limit` or the run's `--eval_examples`
    examples); None when the run trained on `--data` without held-out data. `limit` keeps the
    first records of a data file."""
    data = data or config.get("eval_data")
    if data:
        return _checked(data, flag, config.get("image_folder"), HELD_OUT_SPLIT, limit)
    if config.get("data"):
        return None
    from crystal_ext.data.synthetic import SyntheticVQA

    return SyntheticVQA(
        config["eval_examples"] if limit is None else limit,
        HELD_OUT_SPLIT,
        seed=config["data_seed"],
        task=config["task"],
        image_size=config["image_size"],
    )
