"""Bring your TRL config: ``train plugin=dpo trl_config=dpo.yaml``.

Reads the YAML (or JSON) file that TRL's ``TrlParser`` takes with ``DPOConfig`` /
``SFTConfig`` / ``GRPOConfig`` (plus ``ModelConfig``, ``ScriptArguments`` and
``DatasetMixtureConfig``, as TRL's scripts parse them) and turns each argument into
modalforge Hydra overrides, before Hydra composes. The run is the one TRL would do:
TRL's defaults for the optimisation (learning rate, linear schedule, AdamW betas,
batch size, epochs...) apply where the file is silent, since modalforge's defaults
differ. An argument TRL does not know is an error; one TRL knows but modalforge
cannot honour is an error naming all of them (:func:`expand_argv`); arguments that
only steer TRL's bookkeeping (hub uploads, logging verbosity) are listed as ignored.

The argument names and defaults are a snapshot of TRL 1.16.0 on transformers 5.24
(``trl_fields.json``, written by ``python -m modalforge.trl_config --snapshot``), so
no trl install is needed; ``tests/test_trl_config.py`` checks the snapshot against
the installed trl where there is one. Plugin-specific arguments that share a name
with a parameter of the plugin's Objective map onto ``objective.<name>``.
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

from modalforge.errors import ModalforgeError

#: Which TRL config class a plugin's file is read as.
PLUGIN_CONFIGS = {"dpo": "DPOConfig", "sft": "SFTConfig", "grpo": "GRPOConfig"}
#: Always parsed beside it by TRL's scripts.
COMMON_CONFIGS = ("ModelConfig", "ScriptArguments", "DatasetMixtureConfig")
#: transformers < 5 names, still in many published TRL configs.
LEGACY = {"warmup_ratio": 0.0, "overwrite_output_dir": False, "logging_dir": None, "evaluation_strategy": "no"}
#: Absent from the file, these still take TRL's default: they decide the optimisation, and modalforge's differ.
OPTIMISATION_DEFAULTS = ("learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "adam_beta1",
                         "adam_beta2", "adam_epsilon", "max_grad_norm", "per_device_train_batch_size",
                         "gradient_accumulation_steps", "num_train_epochs")
#: Arguments translated together with another one (printed as "see <partner>").
PARTNERS = {"adam_beta2": "adam_beta1", "fp16": "bf16", "save_steps": "save_strategy", "eval_steps": "eval_strategy",
            "lr_scheduler_kwargs": "lr_scheduler_type", "dataset_train_split": "dataset_name",
            "dataset_test_split": "dataset_name",
            **{k: "use_peft" for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
                                      "lora_modules_to_save", "use_rslora", "use_dora", "load_in_4bit",
                                      "bnb_4bit_quant_type", "use_bnb_nested_quant")}}
#: Arguments that change nothing in what is trained: named in the printed mapping as ignored, not errors.
IGNORED = {
    **{k: "Hub upload settings (push_to_hub is false)" for k in (
        "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo", "hub_always_push", "hub_revision")},
    **{k: "TRL's logging and progress output" for k in (
        "logging_strategy", "logging_first_step", "logging_nan_inf_filter", "log_level", "log_level_replica",
        "log_on_each_node", "disable_tqdm", "run_name", "project", "trackio_space_id", "trackio_bucket_id",
        "trackio_static_space_id", "skip_memory_metrics", "include_num_input_tokens_seen", "logging_dir")},
    **{k: "data-loading speed only" for k in (
        "dataset_num_proc", "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor",
        "precompute_ref_batch_size", "pad_to_multiple_of", "remove_unused_columns")},
    **{k: "checkpoint housekeeping (modalforge keeps last.ckpt and final/)" for k in (
        "save_total_limit", "save_only_model", "save_on_each_node", "overwrite_output_dir")},
    "do_train": "TRL's scripts ignore it", "do_eval": "TRL's scripts ignore it", "do_predict": "TRL's scripts ignore it",
    "per_device_eval_batch_size": "evaluation batching only (modalforge evaluates with data.batch_size)",
    "padding_free": "TRL 1.16's DPOTrainer itself falls back to padding",
    "ignore_bias_buffers": "a DDP workaround with no counterpart needed",
}


class TrlConfigError(ModalforgeError):
    """A TRL config file that cannot be read, or names arguments modalforge cannot honour."""


class _Unmapped(Exception):
    """Raised by a handler: the argument has no modalforge counterpart (the message says why)."""


@dataclass
class Row:
    """One argument of the file: what it became (``overrides``) or why not (``note``)."""

    key: str
    value: Any
    overrides: list[str] = field(default_factory=list)
    status: str = "mapped"  # mapped | default (TRL default applied) | ignored | at_default | unmapped
    note: str = ""


@dataclass
class Mapping:
    """The whole translation of one file."""

    path: str
    plugin: str
    config_class: str
    rows: list[Row]
    env: dict[str, str]

    @property
    def overrides(self) -> list[str]:
        return [o for row in self.rows for o in row.overrides]

    @property
    def unmapped(self) -> list[str]:
        return [row.key for row in self.rows if row.status == "unmapped"]

    def describe(self) -> str:
        """The mapping as printed once by ``train``."""
        lines = [f"[modalforge] trl_config={self.path} read as TRL {self.config_class} (trl 1.16 names):"]
        for row in self.rows:
            value = json.dumps(row.value, default=str)
            if row.status in ("mapped", "default"):
                target = " ".join(row.overrides) or f"({row.note})"
                tag = "  (TRL default)" if row.status == "default" else ""
                lines.append(f"  {row.key}: {value} -> {target}{tag}")
            elif row.status == "unmapped":
                lines.append(f"  {row.key}: {value} -> NO COUNTERPART: {row.note}")
            elif row.status == "at_default":
                lines.append(f"  {row.key}: {value} -> (TRL's default; nothing to set)")
            else:
                lines.append(f"  {row.key}: {value} -> ignored: {row.note}")
        for key, value in self.env.items():
            lines.append(f"  env.{key}: {value!r} -> set in the environment")
        return "\n".join(lines)


# ---- the snapshot of TRL's argument names ----------------------------------------------------


def trl_fields(config_class: str) -> dict[str, Any]:
    """Argument name -> TRL default for ``config_class`` and the classes TRL's scripts parse beside it."""
    data = json.loads(resources.files("modalforge").joinpath("trl_fields.json").read_text())
    merged: dict[str, Any] = dict(LEGACY)
    for name in (config_class, *COMMON_CONFIGS):
        merged.update(data["configs"][name])
    return merged


def snapshot() -> dict[str, Any]:
    """The argument names and defaults of the installed trl (needs ``pip install trl``)."""
    import dataclasses

    import transformers
    import trl
    from trl.scripts.utils import DatasetMixtureConfig

    def default(f: dataclasses.Field) -> Any:
        value = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        value = getattr(value, "value", value)  # enums
        try:
            json.dumps(value)
            return value
        except TypeError:
            return str(value)

    classes = {c.__name__: c for c in (trl.DPOConfig, trl.SFTConfig, trl.GRPOConfig, trl.ModelConfig,
                                        trl.ScriptArguments, DatasetMixtureConfig)}
    return {"trl_version": trl.__version__, "transformers_version": transformers.__version__,
            "configs": {name: {f.name: default(f) for f in dataclasses.fields(cls) if f.init}
                        for name, cls in classes.items()}}


# ---- formatting -----------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    """A Hydra override value; strings always quoted, so the printed mapping reads the same for every key."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def _set(key: str, value: Any) -> str:
    return f"{key}={_fmt(value)}"


# ---- the mapping ------------------------------------------------------------------------------

Handler = Callable[[Any, dict, "Context"], list[str]]


@dataclass
class Context:
    plugin: str
    defaults: dict[str, Any]
    objective_params: frozenset[str]
    has_pretrained_option: bool


def _scheduler(value: Any, cfg: dict, ctx: Context) -> list[str]:
    names = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant",
             "cosine_with_min_lr": "cosine"}
    if value not in names:
        raise _Unmapped(f"modalforge schedules are {', '.join(sorted(set(names)))} (optim.scheduler)")
    kwargs = cfg.get("lr_scheduler_kwargs") or {}
    floor = 0.0  # transformers' linear and cosine decay to 0; modalforge's default floor is 0.1
    if value == "cosine_with_min_lr":
        if "min_lr_rate" not in kwargs:
            raise _Unmapped("cosine_with_min_lr needs lr_scheduler_kwargs.min_lr_rate (min_lr is not supported)")
        floor = float(kwargs["min_lr_rate"])
    return [_set("optim.scheduler", names[value]), _set("optim.min_lr_ratio", floor)]


def _scheduler_kwargs(value: Any, cfg: dict, ctx: Context) -> list[str]:
    rest = set(value or {}) - ({"min_lr_rate"} if cfg.get("lr_scheduler_type") == "cosine_with_min_lr" else set())
    if rest:
        raise _Unmapped(f"no counterpart for {sorted(rest)}")
    return []


def _warmup_steps(value: Any, cfg: dict, ctx: Context) -> list[str]:
    if isinstance(value, float) and 0 < value < 1:  # transformers 5: a float below 1 is a ratio
        return [_set("optim.warmup_ratio", value), _set("optim.warmup_steps", 0)]
    return [_set("optim.warmup_steps", int(value))]


def _betas(value: Any, cfg: dict, ctx: Context) -> list[str]:
    b1 = cfg.get("adam_beta1", ctx.defaults["adam_beta1"])
    b2 = cfg.get("adam_beta2", ctx.defaults["adam_beta2"])
    return [_set("optim.betas", [float(b1), float(b2)])]


def _optimizer(value: Any, cfg: dict, ctx: Context) -> list[str]:
    names = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "adamw": "adamw",
             "adamw_bnb_8bit": "adamw_8bit", "adamw_8bit": "adamw_8bit", "sgd": "sgd"}
    if value not in names:
        raise _Unmapped(f"modalforge optimizers: adamw ({', '.join(k for k, v in names.items() if v == 'adamw')}), "
                        "adamw_8bit, sgd")
    return [_set("optim.name", names[value])]


def _epochs(value: Any, cfg: dict, ctx: Context) -> list[str]:
    if float(cfg.get("max_steps", -1) or -1) > 0:
        return []  # max_steps wins, as in transformers
    if float(value) != int(value):
        raise _Unmapped("Lightning counts whole epochs; use max_steps")
    return [_set("trainer.max_epochs", int(value)), _set("trainer.max_steps", -1)]


def _max_steps(value: Any, cfg: dict, ctx: Context) -> list[str]:
    return [_set("trainer.max_steps", int(value)), _set("trainer.max_epochs", -1)] if int(value) > 0 else []


def _precision(value: Any, cfg: dict, ctx: Context) -> list[str]:
    bf16, fp16 = cfg.get("bf16"), cfg.get("fp16")
    if bf16 and fp16:
        raise _Unmapped("bf16 and fp16 are both true")
    if bf16:
        return [_set("trainer.precision", "bf16-mixed")]
    if fp16:
        return [_set("trainer.precision", "16-mixed")]
    if bf16 is False and not fp16:
        return [_set("trainer.precision", "32-true")]
    return []


def _eval_strategy(value: Any, cfg: dict, ctx: Context) -> list[str]:
    if value == "no":
        return [_set("trainer.limit_val_batches", 0)]
    if value == "steps":
        every = cfg.get("eval_steps") or cfg.get("logging_steps", ctx.defaults["logging_steps"])
        if float(every) < 1:
            raise _Unmapped("a fractional eval_steps (a ratio of the run) has no counterpart")
        return [_set("trainer.val_check_interval", int(every))]
    if value == "epoch":
        return [_set("trainer.val_check_interval", 1.0), _set("trainer.check_val_every_n_epoch", 1)]
    raise _Unmapped("eval_strategy is no, steps or epoch")


def _save(value: Any, cfg: dict, ctx: Context) -> list[str]:
    strategy = cfg.get("save_strategy", "steps")
    if strategy == "no":
        return [_set("trainer.enable_checkpointing", False)]
    if strategy != "steps":
        raise _Unmapped("modalforge checkpoints every checkpoint.every_n_train_steps steps")
    steps = cfg.get("save_steps", ctx.defaults["save_steps"])
    if float(steps) < 1:
        raise _Unmapped("a fractional save_steps (a ratio of the run) has no counterpart")
    return [_set("checkpoint.every_n_train_steps", int(steps))]


def _report_to(value: Any, cfg: dict, ctx: Context) -> list[str]:
    names = [value] if isinstance(value, str) else list(value or [])
    if names in ([], ["none"]):
        return ["logger=none"]
    if len(names) == 1 and names[0] in ("wandb", "tensorboard", "mlflow"):
        return [f"logger={names[0]}"]
    raise _Unmapped("one of none, wandb, tensorboard, mlflow (several at once: logger=many)")


def _resume(value: Any, cfg: dict, ctx: Context) -> list[str]:
    if value in (None, False):
        return []
    return [_set("ckpt_path", "last" if value is True else str(value))]


def _grad_clip(value: Any, cfg: dict, ctx: Context) -> list[str]:
    return [_set("trainer.gradient_clip_val", float(value) if value else None)]


def _logging_steps(value: Any, cfg: dict, ctx: Context) -> list[str]:
    if float(value) < 1:
        raise _Unmapped("a fractional logging_steps (a ratio of the run) has no counterpart")
    return [_set("trainer.log_every_n_steps", int(value))]


def _dataset(value: Any, cfg: dict, ctx: Context) -> list[str]:
    out = [_set("data.train", f"hf:{value}:{cfg.get('dataset_train_split', 'train')}")]
    if cfg.get("eval_strategy", "no") != "no":
        out.append(_set("data.val", f"hf:{value}:{cfg.get('dataset_test_split', 'test')}"))
    return out


def _model_path(value: Any, cfg: dict, ctx: Context) -> list[str]:
    out = [f"model={ctx.plugin}/pretrained"] if ctx.has_pretrained_option else []
    return out + [_set("model.name_or_path", value)]


def _needs_model(target: str) -> Handler:
    def handler(value: Any, cfg: dict, ctx: Context) -> list[str]:
        if not cfg.get("model_name_or_path"):
            raise _Unmapped("applies to a pretrained model (model_name_or_path)")
        return [_set(target, value)]
    return handler


def _peft(value: Any, cfg: dict, ctx: Context) -> list[str]:
    if not value:
        return []
    d = ctx.defaults
    get = lambda k: cfg.get(k, d[k])  # noqa: E731 - TRL's LoRA defaults (r=16, alpha=32) differ from modalforge's
    if get("load_in_4bit"):
        kind = "qlora"
    elif get("use_dora"):
        kind = "dora"
    else:
        kind = "lora"
    out = [f"adapter={kind}", _set("adapter.r", get("lora_r")), _set("adapter.alpha", get("lora_alpha")),
           _set("adapter.dropout", get("lora_dropout"))]
    if get("lora_target_modules") is not None:
        out.append(_set("adapter.target_modules", get("lora_target_modules")))
    if get("lora_modules_to_save") is not None:
        out.append(_set("adapter.modules_to_save", get("lora_modules_to_save")))
    if kind == "lora":
        out.append(_set("adapter.use_rslora", bool(get("use_rslora"))))
    if kind == "qlora":
        out += [_set("adapter.quant_type", get("bnb_4bit_quant_type")),
                _set("adapter.double_quant", bool(get("use_bnb_nested_quant")))]
    return out


def _consumed_by_peft(value: Any, cfg: dict, ctx: Context) -> list[str]:
    if not cfg.get("use_peft"):
        raise _Ignored("TRL ignores LoRA / quantisation arguments without use_peft")
    if value and cfg.get("load_in_4bit") and cfg.get("use_dora"):
        raise _Unmapped("DoRA on a 4-bit base (modalforge: qlora or dora)")
    return []  # mapped, with the other LoRA arguments, by use_peft


class _Ignored(Exception):
    """Raised by a handler: the argument changes nothing here (the message says why)."""


def _dpo_loss(value: Any, cfg: dict, ctx: Context) -> list[str]:
    return [_set("objective.loss", [value] if isinstance(value, str) else list(value))]


def _dpo_label_smoothing(value: Any, cfg: dict, ctx: Context) -> list[str]:
    names = cfg.get("loss_type", ["sigmoid"])
    names = [names] if isinstance(names, str) else list(names)
    if value and not set(names) & {"robust", "exo_pair", "aot", "aot_unpaired"}:
        raise _Ignored(f"TRL reads label_smoothing only in robust, exo_pair, aot, aot_unpaired, not {names}")
    return [_set("objective.label_smoothing", value)]


def _precompute(value: Any, cfg: dict, ctx: Context) -> list[str]:
    return [_set("objective.reference", "precomputed")] if value else []


def _max_length(value: Any, cfg: dict, ctx: Context) -> list[str]:
    if value is None:
        raise _Unmapped("modalforge needs a data.max_length")
    out = [_set("data.max_length", int(value))]
    if ctx.plugin in ("sft", "dpo"):
        out.append(_set("data.too_long", "truncate"))  # TRL truncates what is longer
    return out


def _truncation(value: Any, cfg: dict, ctx: Context) -> list[str]:
    if ctx.plugin == "dpo" and value in ("keep_start", "keep_end"):
        return [_set("data.truncation_mode", value)]
    if value != "keep_start":
        raise _Unmapped("only keep_start (TRL's own default) outside dpo")
    return []


def _sft_completion_only(value: Any, cfg: dict, ctx: Context) -> list[str]:
    if value is None:
        return []
    return [_set("data.train_on", "assistant" if value else "all")]


def _sft_assistant_only(value: Any, cfg: dict, ctx: Context) -> list[str]:
    return [_set("data.train_on", "assistant")] if value else []


def _must_be(expected: Any, why: str) -> Handler:
    def handler(value: Any, cfg: dict, ctx: Context) -> list[str]:
        if value != expected:
            raise _Unmapped(why)
        return []
    return handler


def _direct(target: str) -> Handler:
    return lambda value, cfg, ctx: [_set(target, value)]


COMMON: dict[str, Handler] = {
    "learning_rate": _direct("optim.lr"),
    "lr_scheduler_type": _scheduler,
    "lr_scheduler_kwargs": _scheduler_kwargs,
    "warmup_steps": _warmup_steps,
    "warmup_ratio": _direct("optim.warmup_ratio"),
    "weight_decay": _direct("optim.weight_decay"),
    "adam_beta1": _betas,
    "adam_beta2": _betas,
    "adam_epsilon": _direct("optim.eps"),
    "optim": _optimizer,
    "max_grad_norm": _grad_clip,
    "per_device_train_batch_size": _direct("data.batch_size"),
    "gradient_accumulation_steps": _direct("trainer.accumulate_grad_batches"),
    "num_train_epochs": _epochs,
    "max_steps": _max_steps,
    "bf16": _precision,
    "fp16": _precision,
    "gradient_checkpointing": _direct("module.gradient_checkpointing"),
    "activation_checkpointing": lambda v, c, x: [] if v is None else [_set("module.gradient_checkpointing", v)],
    "gradient_checkpointing_kwargs": _must_be(None, "modalforge checkpoints with use_reentrant=False"),
    "seed": _direct("seed"),
    "output_dir": _direct("run_dir"),
    "logging_steps": _logging_steps,
    "eval_strategy": _eval_strategy,
    "eval_steps": lambda v, c, x: [] if c.get("eval_strategy") == "steps" else _raise_ignored(
        "no effect unless eval_strategy=steps (as in TRL)"),
    "evaluation_strategy": _eval_strategy,
    "save_strategy": _save,
    "save_steps": _save,
    "report_to": _report_to,
    "dataloader_num_workers": _direct("data.num_workers"),
    "resume_from_checkpoint": _resume,
    "torch_compile": _direct("module.compile"),
    "use_cpu": lambda v, c, x: [_set("trainer.accelerator", "cpu")] if v else [],
    "full_determinism": lambda v, c, x: [_set("trainer.deterministic", True)] if v else [],
    "push_to_hub": _must_be(False, "modalforge does not upload; push final/ with huggingface_hub"),
    "trust_remote_code": _direct("model.trust_remote_code"),
    "model_init_kwargs": _must_be(None, "set model.* options instead (dtype, attn_implementation)"),
    "max_length": _max_length,
    "truncation_mode": _truncation,
    # ModelConfig
    "model_name_or_path": _model_path,
    "model_revision": _must_be("main", "model.name_or_path takes a local folder or a hub id at its main revision"),
    "dtype": lambda v, c, x: [] if v in (None, "auto") else _needs_model("model.dtype")(v, c, x),
    "attn_implementation": lambda v, c, x: [] if v is None else _needs_model("model.attn_implementation")(v, c, x),
    "use_peft": _peft,
    **{k: _consumed_by_peft for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
                                      "lora_modules_to_save", "use_rslora", "use_dora", "load_in_4bit",
                                      "bnb_4bit_quant_type", "use_bnb_nested_quant")},
    "lora_task_type": _must_be("CAUSAL_LM", "modalforge's text plugins train causal LMs"),
    # ScriptArguments
    "dataset_name": _dataset,
    "dataset_train_split": lambda v, c, x: [] if c.get("dataset_name") else _raise_ignored("without dataset_name"),
    "dataset_test_split": lambda v, c, x: [] if c.get("dataset_name") else _raise_ignored("without dataset_name"),
}


def _raise_ignored(why: str) -> list[str]:
    raise _Ignored(why)


PLUGIN_SPECIFIC: dict[str, dict[str, Handler]] = {
    "dpo": {"loss_type": _dpo_loss, "label_smoothing": _dpo_label_smoothing,
            "precompute_ref_log_probs": _precompute},
    "sft": {"packing": _direct("data.packing"), "completion_only_loss": _sft_completion_only,
            "assistant_only_loss": _sft_assistant_only,
            "packing_strategy": _must_be("bfd", "modalforge packs its own way (best-fit, no cross-attention)"),
            "loss_type": _must_be("nll", "modalforge's sft trains with NLL only"),
            "dataset_text_field": _must_be("text", "modalforge's sft detects its record formats itself")},
    "grpo": {},
}


def _objective_params(plugin: str) -> frozenset[str]:
    """Parameter names of the plugin's Objective (empty when the plugin is not installed)."""
    from modalforge import registry

    try:
        item = registry.get(plugin)
    except ModalforgeError:
        return frozenset()
    module_name, _, class_name = item.plugin.objective.rpartition(".")
    import importlib

    cls = getattr(importlib.import_module(module_name), class_name)
    return frozenset(p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "model"))


def _has_pretrained_option(plugin: str) -> bool:
    from modalforge import registry

    try:
        package = registry.get(plugin).plugin.conf_package
        return resources.files(package).joinpath("model", plugin, "pretrained.yaml").is_file()
    except (ModalforgeError, ModuleNotFoundError):
        return False


def read_file(path: str | Path) -> dict[str, Any]:
    """The file's mapping (YAML, or JSON by extension), as TrlParser reads it."""
    path = Path(path)
    if not path.is_file():
        raise TrlConfigError(f"trl_config={path}: no such file")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:  # noqa: BLE001 - yaml and json errors alike
        raise TrlConfigError(f"trl_config={path}: cannot parse: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise TrlConfigError(f"trl_config={path}: must hold a mapping of TRL argument names to values")
    return data


def trl_config_mapping(path: str | Path, plugin: str, *, objective_params: Sequence[str] | None = None,
                       has_pretrained_option: bool | None = None) -> Mapping:
    """Translate a TRL config file for ``plugin`` (``dpo``, ``sft`` or ``grpo``), row by row.

    Args:
        path: the YAML / JSON file TRL's ``TrlParser`` takes (``--config``).
        plugin: the modalforge plugin it runs under.
        objective_params: the plugin Objective's parameter names (default: looked up through the registry).
        has_pretrained_option: whether ``model=<plugin>/pretrained`` exists (default: looked up).

    Raises:
        TrlConfigError: unreadable file, unsupported plugin, or argument names TRL does not know.
    """
    if plugin not in PLUGIN_CONFIGS:
        raise TrlConfigError(f"trl_config works with plugin=dpo, sft or grpo (TRL's DPOConfig, SFTConfig, "
                             f"GRPOConfig), not plugin={plugin}")
    config_class = PLUGIN_CONFIGS[plugin]
    cfg = read_file(path)
    env = cfg.pop("env", None) or {}
    if not isinstance(env, dict):
        raise TrlConfigError(f"trl_config={path}: `env` must be a mapping of variable names to values")
    known = trl_fields(config_class)
    unknown = [k for k in cfg if k not in known]
    if unknown:
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, list(known), 1)) else k
                 for k in unknown]
        raise TrlConfigError(f"trl_config={path}: not {config_class} / ModelConfig / ScriptArguments arguments in "
                             f"TRL 1.16: {', '.join(hints)}")
    ctx = Context(plugin, known,
                  frozenset(objective_params) if objective_params is not None else _objective_params(plugin),
                  _has_pretrained_option(plugin) if has_pretrained_option is None else has_pretrained_option)
    handlers = {**COMMON, **PLUGIN_SPECIFIC[plugin]}
    rows: list[Row] = []
    seen_outputs: set[str] = set()
    applied = [k for k in OPTIMISATION_DEFAULTS if k not in cfg and k in known]
    if "max_steps" in cfg and "num_train_epochs" in applied:
        applied.remove("num_train_epochs")
    for key, is_default in [*((k, False) for k in cfg), *((k, True) for k in applied)]:
        value = known[key] if is_default else cfg[key]
        row = Row(key, value, status="default" if is_default else "mapped")
        full_cfg = {**{k: known[k] for k in applied}, **cfg}
        try:
            if key in handlers:
                out = handlers[key](value, full_cfg, ctx)
            elif key in ctx.objective_params:
                out = [_set(f"objective.{key}", value)]
            elif key in IGNORED:
                raise _Ignored(IGNORED[key])
            elif value == known[key]:
                row.status, row.note, out = "at_default", "TRL's default, nothing to set", []
            else:
                raise _Unmapped(f"no modalforge counterpart for {plugin}")
            # a pair of arguments mapped by one handler (adam_beta1/2, bf16/fp16, save_*) emits once
            row.overrides = [o for o in out if o not in seen_outputs]
            seen_outputs.update(out)
            if not row.overrides and row.status != "at_default":
                row.note = f"see {PARTNERS[key]}" if key in PARTNERS else "nothing to set"
        except _Unmapped as why:
            row.status, row.note = "unmapped", str(why)
        except _Ignored as why:
            row.status, row.note = "ignored", str(why)
        rows.append(row)
    return Mapping(str(path), plugin, config_class, rows, {str(k): str(v) for k, v in env.items()})


def trl_config_overrides(path: str | Path, plugin: str) -> tuple[list[str], list[str]]:
    """(Hydra overrides, names of the arguments with no modalforge counterpart) for a TRL config file."""
    mapping = trl_config_mapping(path, plugin)
    return mapping.overrides, mapping.unmapped


def _override_key(arg: str) -> str:
    return arg.split("=", 1)[0].lstrip("+~")


def expand_argv(argv: Sequence[str]) -> list[str]:
    """``train`` arguments with ``trl_config=<file>`` replaced by its overrides.

    Overrides given on the command line win over the file's. Prints the mapping once;
    sets the file's ``env`` variables (as TrlParser does).

    Raises:
        TrlConfigError: as :func:`trl_config_mapping`, or when an argument has no counterpart.
    """
    argv = list(argv)
    positions = [i for i, a in enumerate(argv) if a.startswith("trl_config=")]
    if not positions:
        return argv
    if len(positions) > 1:
        raise TrlConfigError("trl_config= is given more than once")
    index = positions[0]
    path = argv[index].split("=", 1)[1]
    plugins = [a.split("=", 1)[1] for a in argv if a.startswith("plugin=")]
    if not plugins:
        raise TrlConfigError(f"trl_config={path} needs plugin=dpo, sft or grpo")
    mapping = trl_config_mapping(path, plugins[0])
    if mapping.unmapped:
        rows = [r for r in mapping.rows if r.status == "unmapped"]
        raise TrlConfigError(f"trl_config={path}: no modalforge counterpart for "
                             + "; ".join(f"{r.key}={json.dumps(r.value, default=str)} ({r.note})" for r in rows)
                             + ". Remove them from the file, or set them to TRL's defaults")
    given = {_override_key(a) for a in argv if "=" in a and not a.startswith("trl_config=")}
    overrides = [o for o in mapping.overrides if _override_key(o) not in given]
    print(mapping.describe())
    dropped = [o for o in mapping.overrides if o not in overrides]
    if dropped:
        print(f"  (overridden on the command line: {', '.join(dropped)})")
    sys.stdout.flush()
    os.environ.update(mapping.env)
    return argv[:index] + overrides + argv[index + 1:]


if __name__ == "__main__":  # pragma: no cover - maintainers refresh the snapshot after a trl upgrade
    if sys.argv[1:] == ["--snapshot"]:
        target = Path(__file__).with_name("trl_fields.json")
        target.write_text(json.dumps(snapshot(), indent=1, sort_keys=True) + "\n")
        print(f"wrote {target}")
    else:
        print("usage: python -m modalforge.trl_config --snapshot")
