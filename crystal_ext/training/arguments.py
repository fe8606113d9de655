"""Command-line arguments: CrystaL's own (`CrystalArguments`) next to transformers'
`TrainingArguments`, parsed together by `HfArgumentParser`, validated before any heavy work.

Two sets of defaults, chosen by whether `--model` is given:
- the embedded default (no --model): a tiny model trained in full from random init on the
  synthetic task; batch 16, LR 1e-3 (a random-init 1.1 M-parameter model needs a larger
  rate than LoRA on a 7 B model), a step count and a time guard that fit 5 minutes on 2 cores;
  the top-k prediction KL keeps every answer row (1.0: its 4-row answers would keep one at 0.1);
- a real model (--model): the published recipe (docs/method.md): LoRA r=16 alpha=32
  dropout 0.01, LR 2e-4 cosine with 5% warm-up, weight decay 0.1, batch 1 per device,
  4000 steps, bf16 and gradient checkpointing on GPUs; images at the size the model's processor
  gives them (`--image_size 448` resizes them to the published recipe's 448 x 448 first); the
  published top-10% prediction KL.
Both: 8 latent tokens, blur radius U(2, 5), loss weights 1:1:1. Anything given on the command
line wins over either set.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from crystal_ext.data.corruption import KINDS, CorruptionConfig
from crystal_ext.model.alignment_layer import check_choice
from crystal_ext.model.lora import LORA_ALPHA, LORA_DROPOUT, LORA_RANK
from crystal_ext.model.objective import ObjectiveConfig

TINY_OUTPUT_DIR = "outputs/crystal-tiny"
TINY_MAX_STEPS = 800
TINY_IMAGE_SIZE = 112
# Top-k prediction KL: the published 0.1 of each sample's answer rows; the embedded task's
# answers have 4 rows, where 0.1 keeps the answer word alone (k = max(1, int(0.1 * 4)) = 1).
PUBLISHED_TOPK_FRACTION = 0.1
TINY_TOPK_FRACTION = 1.0


@dataclass
class CrystalArguments:
    model: str | None = field(
        default=None,
        metadata={
            "help": "Local folder or hub id of a VLM with its processor (from_pretrained): Qwen2-VL, "
            "Qwen2.5-VL, Qwen3-VL (dense, MoE), LLaVA-OneVision, Idefics3, SmolVLM, and others of the same "
            "kind (docs/training.md). Default: the embedded tiny model."
        },
    )
    data: str | None = field(
        default=None,
        metadata={
            "help": "Training data: a messages + images .json/.jsonl (TRL, LLaMA-Factory, ms-swift), a "
            "LLaVA-conversation .json/.jsonl, a datasets save_to_disk folder (its train split), or a hub data "
            "set id owner/name (split train); docs/training.md. Default: the synthetic task."
        },
    )
    image_folder: str | None = field(
        default=None,
        metadata={
            "help": "Folder that relative image paths of --data are relative to (default: the data file's folder)."
        },
    )
    eval_data: str | None = field(
        default=None,
        metadata={
            "help": "Held-out data for the final evaluation (the formats of --data; a DatasetDict folder or hub "
            "data set gives its test split). Default with --data: none."
        },
    )
    task: str = field(
        default="stripes",
        metadata={
            "help": "Synthetic task: stripes (default; blur removes the answer), stripes_faint (the same "
            "with faint, noisy lines for half of the examples: harder, for comparisons), shape, or colour "
            "(blur-proof control)."
        },
    )
    train_examples: int = field(default=100_000, metadata={"help": "Synthetic training examples."})
    eval_examples: int = field(default=300, metadata={"help": "Held-out examples for the final evaluation."})
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "Resize every image to this square side before the processor (448: the published "
            "recipe). Default 112 for the tiny model (a multiple of 28); otherwise none: the processor's own sizing."
        },
    )
    num_latent_tokens: int = field(default=8, metadata={"help": "K latent tokens in the think block."})
    corruption: str = field(
        default="blur", metadata={"help": f"Corruption of the second path: one of {KINDS}."}
    )
    blur_radius_min: float = field(
        default=2.0, metadata={"help": "Gaussian blur radius, lower end (uniform)."}
    )
    blur_radius_max: float = field(default=5.0, metadata={"help": "Gaussian blur radius, upper end."})
    lambda_pred: float = field(default=1.0, metadata={"help": "Weight of the prediction-alignment KL."})
    lambda_attn: float = field(default=1.0, metadata={"help": "Weight of the attention-alignment KL."})
    alignment_layer: str = field(
        default="last",
        metadata={
            "help": "Whose attention the attention-alignment loss reads: last (the last text layer, as "
            "published; refused when it is not attention) or last_attention (the last full-attention text "
            "layer; the layers after it still train through the other losses). LFM2-VL's released "
            "checkpoints end on a convolution layer and need last_attention (docs/method.md)."
        },
    )
    alignment_warmup_ratio: float = field(
        default=0.0,
        metadata={
            "help": "Share of --max_steps over which the KL weights grow linearly from 0 to --lambda_pred / "
            "--lambda_attn (0: full weight from the first step)."
        },
    )
    topk_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Fraction of each sample's answer rows kept by the top-k prediction KL. Default 0.1 (the "
            "published recipe) with --model; 1.0 for the embedded task, whose 4-row answers would keep only "
            "the answer word (docs/results.md: that made the loss climb; 1.0 measured better over five seeds)."
        },
    )
    no_crystal: bool = field(
        default=False,
        metadata={
            "help": "Baseline: plain SFT on the intact path (same data, latent tokens and schedule), CE only."
        },
    )
    use_lora: bool | None = field(
        default=None,
        metadata={
            "help": "LoRA on the language model and vision blocks (merger in full, new token rows only). "
            "Default: on with --model, off for the tiny model (trained in full)."
        },
    )
    lora_r: int = field(default=LORA_RANK, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=LORA_ALPHA, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=LORA_DROPOUT, metadata={"help": "LoRA dropout."})
    max_length: int = field(
        default=4096, metadata={"help": "Longest packed dual-path sequence; longer ones are skipped."}
    )
    system_prompt: str | None = field(
        default=None,
        metadata={
            "help": "System turn for records that have none. Default: none injected; the prompt is the chat "
            "template's own (Qwen2/2.5-VL's writes its default system turn, Qwen3-VL's and most others none). "
            "Serve the model with the same system turn."
        },
    )
    # ---- the chat template: training packs the prompt the model is served with ----
    chat_template_kwargs: str | None = field(
        default=None,
        metadata={
            "help": "JSON object of the chat template's own variables, passed to apply_chat_template in training "
            "and evaluation, e.g. '{\"enable_thinking\": false}'. Serve the model with the same ones."
        },
    )
    max_train_minutes: float | None = field(
        default=None,
        metadata={
            "help": "Stop (and save) after this many minutes of training. Default 3.75 for the tiny model, "
            "none otherwise."
        },
    )
    num_pictures: int = field(default=3, metadata={"help": "Held-out examples drawn as attention pictures."})
    cpu_threads: int | None = field(
        default=None,
        metadata={
            "help": "torch intra-op threads per process on the CPU. Default 1 for the tiny model (see README), "
            "torch's own choice otherwise."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Allow an --output_dir that already holds checkpoints: the earlier run's checkpoints, metrics, "
            "TensorBoard logs, pictures, results and adapter are removed once every check of the new run has "
            "passed (arguments, data, model), right before training."
        },
    )
    lm_head_losses: str = field(
        default="fused",
        metadata={
            "help": "fused (crystal_ext.lm_head_losses, the default) or reference (plain PyTorch, for debugging)."
        },
    )
    # The run-time check (crystal_ext.training.objective_check), run before the first optimizer step.
    skip_objective_check: bool = field(
        default=False,
        metadata={
            "help": "Skip the check that the objective reproduces the stock model on a few training examples "
            "(path-1 logits and CE, identity corruption, fused ops; docs/training.md). Not recommended."
        },
    )
    objective_check_examples: int = field(
        default=2, metadata={"help": "Training examples the run-time objective check uses."}
    )

    @property
    def tiny(self) -> bool:
        return self.model is None

    def objective(self) -> ObjectiveConfig:
        """The objective's settings, as one value for the trainer."""
        return ObjectiveConfig(
            crystal=not self.no_crystal,
            lambda_pred=self.lambda_pred,
            lambda_attn=self.lambda_attn,
            topk_fraction=self.topk_fraction,
            lm_head_losses=self.lm_head_losses,
            alignment_layer=self.alignment_layer,
        )

    def template_kwargs(self) -> dict:
        from crystal_ext.data.chat import parse_template_kwargs

        return parse_template_kwargs(self.chat_template_kwargs)

    def corruption_config(self) -> CorruptionConfig:
        return CorruptionConfig(
            kind=self.corruption, blur_radius=(self.blur_radius_min, self.blur_radius_max)
        )


def recipe_defaults(tiny: bool) -> dict:
    """TrainingArguments defaults for the embedded run or the published recipe."""
    import torch

    # use_cpu on a machine without a GPU: otherwise accelerate (1.15) initialises the process
    # group under torchrun but leaves the Trainer in single-process mode, so every rank would
    # train alone and write the same checkpoint files.
    common = dict(
        use_cpu=not torch.cuda.is_available(),
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        weight_decay=0.1,
        remove_unused_columns=False,
        report_to=["tensorboard"],
        save_strategy="steps",
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        save_only_model=False,
    )
    if tiny:
        # One loader worker draws and packs the next batch on the second core while the main
        # process computes with one thread (packing is ~15% of a step).
        return {
            **common,
            "output_dir": TINY_OUTPUT_DIR,
            "max_steps": TINY_MAX_STEPS,
            "learning_rate": 1e-3,
            "dataloader_num_workers": 1,
            "per_device_train_batch_size": 16,
            "logging_steps": 25,
            "save_steps": 300,
            "save_total_limit": 2,
        }
    gpu = torch.cuda.is_available()
    return {
        **common,
        "output_dir": "outputs/crystal",
        "max_steps": 4000,
        "learning_rate": 2e-4,
        "per_device_train_batch_size": 1,
        "logging_steps": 10,
        "save_steps": 500,
        "save_total_limit": 3,
        "bf16": gpu and torch.cuda.is_bf16_supported(),
        "activation_checkpointing": gpu,
    }


def _given(argv: list[str], name: str) -> bool:
    return any(a == f"--{name}" or a.startswith(f"--{name}=") for a in argv)


RECIPE_SUFFIXES = (".yaml", ".yml", ".json")


def recipe_argv(argv: list[str]) -> list[str]:
    """`RECIPE.yaml [--flag value ...]` as flags: the file's settings first, then the command line's,
    so a flag given on the command line overrides the file (argparse keeps the last value). A
    relative `deepspeed` path is read from the recipe's folder. Any other argv is returned as is."""
    if not argv or argv[0].startswith("-") or not argv[0].endswith(RECIPE_SUFFIXES):
        return argv
    path = argv[0]
    if not os.path.isfile(path):
        raise ValueError(f"recipe {path}: no such file")
    import json

    import yaml

    with open(path) as f:
        try:
            settings = yaml.safe_load(f) if path.endswith((".yaml", ".yml")) else json.load(f)
        except (yaml.YAMLError, json.JSONDecodeError) as exc:
            raise ValueError(
                f"recipe {path}: not valid {'YAML' if path.endswith('l') else 'JSON'}: {exc}"
            ) from None
    if not isinstance(settings, dict):
        raise ValueError(f"recipe {path}: expected a mapping of argument names to values")
    flags = []
    for name, value in settings.items():
        if value is None:
            continue
        if isinstance(value, dict):  # e.g. chat_template_kwargs: the flag takes JSON text
            value = json.dumps(value)
        if name == "deepspeed" and isinstance(value, str) and not os.path.isabs(value):
            value = os.path.join(os.path.dirname(os.path.abspath(path)), value)
        values = value if isinstance(value, list) else [value]
        flags += [f"--{name}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return flags + argv[1:]


def parse_args(argv: list[str] | None = None):
    """(CrystalArguments, TrainingArguments) from `argv` (default sys.argv[1:]), validated."""
    from transformers import HfArgumentParser, TrainingArguments

    argv = recipe_argv(list(sys.argv[1:] if argv is None else argv))
    parser = HfArgumentParser((CrystalArguments, TrainingArguments))
    parser.set_defaults(**recipe_defaults(tiny=not _given(argv, "model")))
    cargs, targs, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if rest:
        raise ValueError(f"unknown arguments: {' '.join(rest)} (see --help)")
    if cargs.use_lora is None:
        cargs.use_lora = not cargs.tiny
    if cargs.image_size is None and cargs.tiny:
        cargs.image_size = TINY_IMAGE_SIZE
    if cargs.topk_fraction is None:
        cargs.topk_fraction = TINY_TOPK_FRACTION if cargs.tiny else PUBLISHED_TOPK_FRACTION
    if cargs.max_train_minutes is None and cargs.tiny and not _given(argv, "max_steps"):
        cargs.max_train_minutes = 3.75
    if cargs.cpu_threads is None and cargs.tiny:
        # Measured on the 2-core development machine while another process was busy: a step
        # of the tiny model took 0.24 s with 1 thread and 10.8 s with 2 (OpenMP threads spin
        # against the other process); idle, 2 threads gain little on a 1 M-parameter model.
        cargs.cpu_threads = 1
    validate(cargs, targs)
    return cargs, targs


def validate(cargs: CrystalArguments, targs) -> None:
    """Every check that needs no model or data loaded; raises ValueError saying what to change.
    A --resume_from_checkpoint given as `last` is resolved to the checkpoint folder here."""

    def bad(msg):
        raise ValueError(msg)

    if cargs.num_latent_tokens < 1:
        bad(f"--num_latent_tokens must be >= 1, got {cargs.num_latent_tokens}")
    if cargs.corruption not in KINDS:
        bad(f"--corruption must be one of {', '.join(KINDS)}, got {cargs.corruption!r}")
    if not 0 < cargs.blur_radius_min <= cargs.blur_radius_max:
        bad(
            f"--blur_radius_min/--blur_radius_max must satisfy 0 < min <= max, got "
            f"{cargs.blur_radius_min}, {cargs.blur_radius_max}"
        )
    for name in ("lambda_pred", "lambda_attn"):
        if getattr(cargs, name) < 0:
            bad(f"--{name} must be >= 0, got {getattr(cargs, name)}")
    check_choice(cargs.alignment_layer)  # its ValueError names --alignment_layer
    if not 0 <= cargs.alignment_warmup_ratio <= 1:
        bad(f"--alignment_warmup_ratio must be in [0, 1], got {cargs.alignment_warmup_ratio}")
    if not 0 < cargs.topk_fraction <= 1:
        bad(f"--topk_fraction must be in (0, 1], got {cargs.topk_fraction}")
    if cargs.image_size is not None and cargs.image_size <= 0:
        bad(f"--image_size must be positive, got {cargs.image_size}")
    if cargs.objective_check_examples < 1:
        bad(f"--objective_check_examples must be >= 1, got {cargs.objective_check_examples}")
    if cargs.tiny and cargs.image_size % 28:
        bad(
            f"--image_size must be a multiple of 28 for the embedded tiny model (patch 14 x merge 2), "
            f"got {cargs.image_size}"
        )
    if cargs.use_lora and (cargs.lora_r < 1 or cargs.lora_alpha <= 0 or not 0 <= cargs.lora_dropout < 1):
        bad(
            f"LoRA needs --lora_r >= 1, --lora_alpha > 0 and 0 <= --lora_dropout < 1, got "
            f"{cargs.lora_r}, {cargs.lora_alpha}, {cargs.lora_dropout}"
        )
    _validate_data_and_schedule(cargs, targs)
    _validate_sources(cargs)
    targs.resume_from_checkpoint = _resume_checkpoint(cargs, targs)


def _validate_data_and_schedule(cargs: CrystalArguments, targs) -> None:
    """The synthetic task, the chat template's variables, the LM-head implementation, the
    optimisation and evaluation schedule."""
    from crystal_ext.data.synthetic import TASKS

    if cargs.task not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(sorted(TASKS))}, got {cargs.task!r}")
    if cargs.train_examples < 1 or cargs.eval_examples < 0:
        raise ValueError("--train_examples must be >= 1 and --eval_examples >= 0")
    cargs.template_kwargs()  # its ValueError names --chat_template_kwargs
    if cargs.lm_head_losses not in ("fused", "reference"):
        raise ValueError(f"--lm_head_losses must be fused or reference, got {cargs.lm_head_losses!r}")
    if cargs.max_train_minutes is not None and cargs.max_train_minutes <= 0:
        raise ValueError(f"--max_train_minutes must be > 0, got {cargs.max_train_minutes}")
    if cargs.cpu_threads is not None and cargs.cpu_threads < 1:
        raise ValueError(f"--cpu_threads must be >= 1, got {cargs.cpu_threads}")
    if targs.learning_rate <= 0:
        raise ValueError(f"--learning_rate must be > 0, got {targs.learning_rate}")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(targs, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(targs, name)}")
    if cargs.max_length < 16:
        raise ValueError(f"--max_length must be >= 16, got {cargs.max_length}")
    no_held_out = cargs.eval_data is None if cargs.data is not None else cargs.eval_examples == 0
    if targs.eval_strategy not in (None, "no") and no_held_out:
        raise ValueError(
            f"--eval_strategy {targs.eval_strategy} evaluates on held-out examples: give --eval_examples > 0 "
            "(synthetic task) or --eval_data"
        )
    if targs.max_steps <= 0 and cargs.data is None:
        raise ValueError("the synthetic data set is generated on the fly: give --max_steps > 0")


def _validate_sources(cargs: CrystalArguments) -> None:
    """The image folder, the data and the model exist (a hub name is looked up when the hub answers)."""
    if cargs.image_folder is not None and not os.path.isdir(cargs.image_folder):
        raise ValueError(f"--image_folder {cargs.image_folder}: no such folder")
    for flag, path in (("--data", cargs.data), ("--eval_data", cargs.eval_data)):
        if path is not None:
            check_data_available(flag, path)
    if cargs.model is not None:
        check_model_available(cargs.model)


def _resume_checkpoint(cargs: CrystalArguments, targs) -> str | None:
    """The checkpoint to resume from; ValueError when the output folder holds checkpoints that
    the run would neither resume nor overwrite."""
    from crystal_ext.training.checkpoints import last_complete_checkpoint, resolve_resume_checkpoint

    resume = resolve_resume_checkpoint(targs.resume_from_checkpoint, targs.output_dir)
    if resume is None and not cargs.overwrite_output_dir and os.path.isdir(targs.output_dir):
        stale = [n for n in os.listdir(targs.output_dir) if n.startswith("checkpoint-")]
        if stale:
            last = last_complete_checkpoint(targs.output_dir)
            raise ValueError(
                f"--output_dir {targs.output_dir} already holds checkpoints ({len(stale)}): pass "
                f"--resume_from_checkpoint last to continue{f' from {last}' if last else ''}, "
                "--overwrite_output_dir to start over there, or another --output_dir"
            )
    return resume


def _probe_hub(timeout: float = 3.0) -> None:
    """Raise OSError at once when the hub's host cannot be reached. huggingface_hub retries a
    failed request with back-off (about 30 s in all) before it gives up; a plain connection
    attempt answers in milliseconds on a machine without network."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()


def _hub_offline() -> bool:
    return any(
        os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def check_data_available(flag: str, path: str) -> None:
    """Fail at once when `--data` / `--eval_data` is neither a usable local file or folder nor a
    hub data set id that this machine can reach."""
    from crystal_ext.data.records import check_data_path, is_hub_data_id

    try:
        check_data_path(path)
    except ValueError as exc:
        raise ValueError(str(exc).replace("--data", flag)) from None
    if not is_hub_data_id(path):
        return
    try:
        if _hub_offline():
            raise ConnectionError("HF_HUB_OFFLINE is set")
        _probe_hub()
    except Exception as exc:
        raise ValueError(
            f"{flag} {path}: not a local file or folder, and the Hugging Face hub cannot be reached here "
            f"({type(exc).__name__}). On a machine with network, save it with "
            f"`datasets.load_dataset({path!r}).save_to_disk(PATH)` and pass {flag} PATH."
        ) from None


def check_model_available(model: str) -> None:
    """Fail at once (not after minutes of set-up) when `--model` cannot be loaded."""
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            bad = f"--model {model}: the folder has no config.json (expected a save_pretrained folder)"
            raise ValueError(bad)
        return
    if model.startswith((".", "/", "~")) or os.sep in model.strip("/").replace("/", "", 1):
        raise ValueError(f"--model {model}: no such folder")
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(model, "config.json")
    if isinstance(cached, str):
        return
    try:
        if _hub_offline():
            raise ConnectionError("HF_HUB_OFFLINE is set")
        _probe_hub()
        hf_hub_download(model, "config.json", etag_timeout=5)
    except Exception as exc:  # offline, unknown id, gated repo: all mean the same to the user
        raise ValueError(
            f"--model {model}: not a local folder and not in the Hugging Face cache, and it cannot be downloaded "
            f"here ({type(exc).__name__}). On a machine with network run `hf download {model}` (it fills "
            f"the cache, ~/.cache/huggingface) or `hf download {model} --local-dir PATH` and pass --model PATH."
        ) from None
