"""Bring your TRL config: ``train plugin=<name> trl_config=config.yaml``.

Reads the YAML (or JSON) file that TRL's ``TrlParser`` takes with a trainer's config
class (``DPOConfig``, ``SFTConfig``...) plus ``ModelConfig``, ``ScriptArguments`` and
``DatasetMixtureConfig``, as TRL's scripts parse them, and turns each argument into
modalforge Hydra overrides, before Hydra composes. The run is the one TRL would do:
TRL's defaults for the optimisation (learning rate, linear schedule, AdamW betas,
batch size, epochs...) apply where the file is silent, since modalforge's defaults
differ. An argument TRL does not know is an error; one TRL knows but modalforge
cannot honour is an error naming all of them (:func:`expand_argv`); arguments that
only steer TRL's bookkeeping (hub uploads, logging verbosity) are listed as ignored.

This module holds the mapping every trainer shares (``transformers.TrainingArguments``,
``ModelConfig``, ``ScriptArguments``). A plugin opts in with its ``Plugin.trl`` hook,
a :class:`TrlPlugin` naming the config classes it reads and its own argument handlers,
built from the helpers here (:func:`override`, :func:`direct`, :func:`must_be`,
:class:`Unmapped`, :class:`Ignored`). Plugin-specific arguments that share a name with
a parameter of the plugin's Objective map onto ``objective.<name>``.

The argument names and defaults are a snapshot of TRL 1.16.0 on transformers 5.24
(``trl_fields.json``, written by ``python -m modalforge.cli.trl_config --snapshot``), so
no trl install is needed; ``tests/test_trl_config.py`` checks the snapshot against
the installed trl where there is one.
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
from typing import Any, Callable, Mapping as MappingType, Sequence

from modalforge.overrides import hydra_value
from modalforge.errors import ModalforgeError
from modalforge.overrides import override_key

#: Always parsed beside the trainer's config class by TRL's scripts.
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


class Unmapped(Exception):
    """Raised by a handler: the argument has no modalforge counterpart (the message says why)."""


class Ignored(Exception):
    """Raised by a handler: the argument changes nothing here (the message says why)."""


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


@dataclass
class Context:
    """What a handler may read besides the file: the plugin and TRL's defaults for every argument."""

    plugin: str
    defaults: dict[str, Any]
    objective_params: frozenset[str]
    pretrained_model: str | None  # the ``model=`` option that model_name_or_path selects, if any


#: ``handler(value, whole file with TRL's optimisation defaults, context)`` -> overrides, or raises Unmapped / Ignored.
Handler = Callable[[Any, dict, Context], list[str]]


@dataclass(frozen=True)
class TrlPlugin:
    """What a plugin's ``Plugin.trl`` hook declares so that ``trl_config=`` reads TRL files for it.

    Args:
        config_classes: TRL config class names the plugin reads (``("DPOConfig",)``); a file is read
            as the first unless a caller names another. Each must be in ``trl_fields.json``.
        handlers: the plugin's own argument handlers, by TRL argument name; they take precedence
            over the shared ones (so a plugin may refine ``max_length`` or ``truncation_mode``).
        objective: dotted path of the class whose parameters take same-named TRL arguments as
            ``objective.<name>``; None: the plugin's Objective.
        pretrained_model: the ``model=`` option that ``model_name_or_path`` selects (``"dpo/pretrained"``);
            None: only ``model.name_or_path`` is set.
    """

    config_classes: tuple[str, ...]
    handlers: MappingType[str, Handler] = field(default_factory=dict)
    objective: str | None = None
    pretrained_model: str | None = None


# ---- the snapshot of TRL's argument names ----------------------------------------------------


def trl_fields(config_class: str) -> dict[str, Any]:
    """Argument name -> TRL default for ``config_class`` and the classes TRL's scripts parse beside it."""
    data = json.loads(resources.files("modalforge.cli").joinpath("trl_fields.json").read_text())
    if config_class not in data["configs"]:
        raise TrlConfigError(f"no snapshot of TRL's {config_class} in modalforge's trl_fields.json (it holds "
                             f"{', '.join(sorted(data['configs']))}); refresh it with "
                             "`python -m modalforge.cli.trl_config --snapshot`")
    merged: dict[str, Any] = dict(LEGACY)
    for name in (config_class, *COMMON_CONFIGS):
        merged.update(data["configs"][name])
    return merged


def snapshot() -> dict[str, Any]:
    """The argument names and defaults of the installed trl for every installed plugin's config classes.

    Needs ``pip install trl``.
    """
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

    names = sorted({name for hook in trl_plugins().values() for name in hook.config_classes})
    classes = {name: getattr(trl, name) for name in names}
    classes.update({c.__name__: c for c in (trl.ModelConfig, trl.ScriptArguments, DatasetMixtureConfig)})
    return {"trl_version": trl.__version__, "transformers_version": transformers.__version__,
            "configs": {name: {f.name: default(f) for f in dataclasses.fields(cls) if f.init}
                        for name, cls in classes.items()}}


# ---- the handler toolkit (also for plugins' own handlers) -------------------------------------


def format_value(value: Any) -> str:
    """A Hydra override value; strings always quoted, so the printed mapping reads the same for every key.

    Quoting follows Hydra's grammar (:func:`modalforge.cli.lightning_args.hydra_value`): backslashes are
    literal, so ``C:\\runs`` or a regex reaches the config unchanged.
    """
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    text = hydra_value(value)
    if isinstance(value, str) and not text.startswith("'"):
        text = f"'{text}'"  # hydra_value leaves it bare only when it holds no quote or backslash
    return text


def override(key: str, value: Any) -> str:
    """``key=value`` as a Hydra override."""
    return f"{key}={format_value(value)}"


# ---- the shared mapping (TrainingArguments, ModelConfig, ScriptArguments) ---------------------


def _scheduler(value: Any, cfg: dict, ctx: Context) -> list[str]:
    names = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant",
             "cosine_with_min_lr": "cosine"}
    if value not in names:
        raise Unmapped(f"modalforge schedules are {', '.join(sorted(set(names)))} (optim.scheduler)")
    kwargs = cfg.get("lr_scheduler_kwargs") or {}
    floor = 0.0  # transformers' linear and cosine decay to 0; modalforge's default floor is 0.1
    if value == "cosine_with_min_lr":
        if "min_lr_rate" not in kwargs:
            raise Unmapped("cosine_with_min_lr needs lr_scheduler_kwargs.min_lr_rate (min_lr is not supported)")
        floor = float(kwargs["min_lr_rate"])
    return [override("optim.scheduler", names[value]), override("optim.min_lr_ratio", floor)]


def _scheduler_kwargs(value: Any, cfg: dict, ctx: Context) -> list[str]:
    rest = set(value or {}) - ({"min_lr_rate"} if cfg.get("lr_scheduler_type") == "cosine_with_min_lr" else set())
    if rest:
        raise Unmapped(f"no counterpart for {sorted(rest)}")
    return []


def _warmup_steps(value: Any, cfg: dict, ctx: Context) -> list[str]:
    if isinstance(value, float) and 0 < value < 1:  # transformers 5: a float below 1 is a ratio
        return [override("optim.warmup_ratio", value), override("optim.warmup_steps", 0)]
    return [override("optim.warmup_steps", int(value))]


def _betas(value: Any, cfg: dict, ctx: Context) -> list[str]:
    b1 = cfg.get("adam_beta1", ctx.defaults["adam_beta1"])
    b2 = cfg.get("adam_beta2", ctx.defaults["adam_beta2"])
    return [override("optim.betas", [float(b1), float(b2)])]


def _optimizer(value: Any, cfg: dict, ctx: Context) -> list[str]:
    names = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "adamw": "adamw",
             "adamw_bnb_8bit": "adamw_8bit", "adamw_8bit": "adamw_8bit", "paged_adamw_8bit": "paged_adamw_8bit",
             "paged_adamw_32bit": "paged_adamw_32bit", "sgd": "sgd"}
    if value not in names:
        raise Unmapped(f"modalforge optimizers: adamw ({', '.join(k for k, v in names.items() if v == 'adamw')}), "
                       "adamw_8bit (adamw_bnb_8bit), paged_adamw_8bit, paged_adamw_32bit, sgd")
    return [override("optim.name", names[value])]


def _epochs(value: Any, cfg: dict, ctx: Context) -> list[str]:
    if float(cfg.get("max_steps", -1) or -1) > 0:
        return []  # max_steps wins, as in transformers
    if float(value) != int(value):
        raise Unmapped("Lightning counts whole epochs; use max_steps")
    return [override("trainer.max_epochs", int(value)), override("trainer.max_steps", -1)]


def _max_steps(value: Any, cfg: dict, ctx: Context) -> list[str]:
    return [override("trainer.max_steps", int(value)), override("trainer.max_epochs", -1)] if int(value) > 0 else []


def _precision(value: Any, cfg: dict, ctx: Context) -> list[str]:
    bf16, fp16 = cfg.get("bf16"), cfg.get("fp16")
    if bf16 and fp16:
        raise Unmapped("bf16 and fp16 are both true")
    if bf16:
        return [override("trainer.precision", "bf16-mixed")]
    if fp16:
        return [override("trainer.precision", "16-mixed")]
    if bf16 is False and not fp16:
        return [override("trainer.precision", "32-true")]
    return []


def _eval_strategy(value: Any, cfg: dict, ctx: Context) -> list[str]:
    if value == "no":
        return [override("trainer.limit_val_batches", 0)]
    if value == "steps":
        every = cfg.get("eval_steps") or cfg.get("logging_steps", ctx.defaults["logging_steps"])
        if float(every) < 1:
            raise Unmapped("a fractional eval_steps (a ratio of the run) has no counterpart")
        return [override("trainer.val_check_interval", int(every))]
    if value == "epoch":
        return [override("trainer.val_check_interval", 1.0), override("trainer.check_val_every_n_epoch", 1)]
    raise Unmapped("eval_strategy is no, steps or epoch")


def _save(value: Any, cfg: dict, ctx: Context) -> list[str]:
    strategy = cfg.get("save_strategy", "steps")
    if strategy == "no":
        return [override("trainer.enable_checkpointing", False)]
    if strategy != "steps":
        raise Unmapped("modalforge checkpoints every checkpoint.every_n_train_steps steps")
    steps = cfg.get("save_steps", ctx.defaults["save_steps"])
    if float(steps) < 1:
        raise Unmapped("a fractional save_steps (a ratio of the run) has no counterpart")
    return [override("checkpoint.every_n_train_steps", int(steps))]


def _report_to(value: Any, cfg: dict, ctx: Context) -> list[str]:
    names = [value] if isinstance(value, str) else list(value or [])
    if names in ([], ["none"]):
        return ["logger=none"]
    if len(names) == 1 and names[0] in ("wandb", "tensorboard", "mlflow"):
        return [f"logger={names[0]}"]
    raise Unmapped("one of none, wandb, tensorboard, mlflow (several at once: logger=many)")


def _resume(value: Any, cfg: dict, ctx: Context) -> list[str]:
    if value in (None, False):
        return []
    return [override("ckpt_path", "last" if value is True else str(value))]


def _grad_clip(value: Any, cfg: dict, ctx: Context) -> list[str]:
    return [override("trainer.gradient_clip_val", float(value) if value else None)]


def _logging_steps(value: Any, cfg: dict, ctx: Context) -> list[str]:
    if float(value) < 1:
        raise Unmapped("a fractional logging_steps (a ratio of the run) has no counterpart")
    return [override("trainer.log_every_n_steps", int(value))]


def _dataset(value: Any, cfg: dict, ctx: Context) -> list[str]:
    out = [override("data.train", f"hf:{value}:{cfg.get('dataset_train_split', 'train')}")]
    if cfg.get("eval_strategy", "no") != "no":
        out.append(override("data.val", f"hf:{value}:{cfg.get('dataset_test_split', 'test')}"))
    return out


def _model_path(value: Any, cfg: dict, ctx: Context) -> list[str]:
    out = [f"model={ctx.pretrained_model}"] if ctx.pretrained_model else []
    return out + [override("model.name_or_path", value)]


def _needs_model(target: str) -> Handler:
    def handler(value: Any, cfg: dict, ctx: Context) -> list[str]:
        if not cfg.get("model_name_or_path"):
            raise Unmapped("applies to a pretrained model (model_name_or_path)")
        return [override(target, value)]
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
    out = [f"adapter={kind}", override("adapter.r", get("lora_r")), override("adapter.alpha", get("lora_alpha")),
           override("adapter.dropout", get("lora_dropout"))]
    if get("lora_target_modules") is not None:
        out.append(override("adapter.target_modules", get("lora_target_modules")))
    if get("lora_modules_to_save") is not None:
        out.append(override("adapter.modules_to_save", get("lora_modules_to_save")))
    if kind == "lora":
        out.append(override("adapter.use_rslora", bool(get("use_rslora"))))
    if kind == "qlora":
        out += [override("adapter.quant_type", get("bnb_4bit_quant_type")),
                override("adapter.double_quant", bool(get("use_bnb_nested_quant")))]
    return out


def _consumed_by_peft(value: Any, cfg: dict, ctx: Context) -> list[str]:
    if not cfg.get("use_peft"):
        raise Ignored("TRL ignores LoRA / quantisation arguments without use_peft")
    if value and cfg.get("load_in_4bit") and cfg.get("use_dora"):
        raise Unmapped("DoRA on a 4-bit base (modalforge: qlora or dora)")
    return []  # mapped, with the other LoRA arguments, by use_peft


def max_length(value: Any, cfg: dict, ctx: Context) -> list[str]:
    """``max_length`` -> ``data.max_length`` (a plugin that truncates as TRL does adds its own option)."""
    if value is None:
        raise Unmapped("modalforge needs a data.max_length")
    return [override("data.max_length", int(value))]


def _truncation(value: Any, cfg: dict, ctx: Context) -> list[str]:
    if value != "keep_start":
        raise Unmapped(f"only keep_start (TRL's own default) with plugin={ctx.plugin}")
    return []


def must_be(expected: Any, why: str) -> Handler:
    """A handler for an argument modalforge honours only at ``expected`` (``why`` otherwise)."""
    def handler(value: Any, cfg: dict, ctx: Context) -> list[str]:
        if value != expected:
            raise Unmapped(why)
        return []
    return handler


def direct(target: str) -> Handler:
    """A handler setting ``target`` to the argument's value as it is."""
    return lambda value, cfg, ctx: [override(target, value)]


COMMON: dict[str, Handler] = {
    "learning_rate": direct("optim.lr"),
    "lr_scheduler_type": _scheduler,
    "lr_scheduler_kwargs": _scheduler_kwargs,
    "warmup_steps": _warmup_steps,
    "warmup_ratio": direct("optim.warmup_ratio"),
    "weight_decay": direct("optim.weight_decay"),
    "adam_beta1": _betas,
    "adam_beta2": _betas,
    "adam_epsilon": direct("optim.eps"),
    "optim": _optimizer,
    "max_grad_norm": _grad_clip,
    "per_device_train_batch_size": direct("data.batch_size"),
    "gradient_accumulation_steps": direct("trainer.accumulate_grad_batches"),
    "num_train_epochs": _epochs,
    "max_steps": _max_steps,
    "bf16": _precision,
    "fp16": _precision,
    "gradient_checkpointing": direct("module.gradient_checkpointing"),
    "activation_checkpointing": lambda v, c, x: [] if v is None else [override("module.gradient_checkpointing", v)],
    "gradient_checkpointing_kwargs": must_be(None, "modalforge checkpoints with use_reentrant=False"),
    "seed": direct("seed"),
    "output_dir": direct("run_dir"),
    "logging_steps": _logging_steps,
    "eval_strategy": _eval_strategy,
    "eval_steps": lambda v, c, x: [] if c.get("eval_strategy") == "steps" else _raise_ignored(
        "no effect unless eval_strategy=steps (as in TRL)"),
    "evaluation_strategy": _eval_strategy,
    "save_strategy": _save,
    "save_steps": _save,
    "report_to": _report_to,
    "dataloader_num_workers": direct("data.num_workers"),
    "resume_from_checkpoint": _resume,
    "torch_compile": direct("module.compile"),
    "use_cpu": lambda v, c, x: [override("trainer.accelerator", "cpu")] if v else [],
    "full_determinism": lambda v, c, x: [override("trainer.deterministic", True)] if v else [],
    "push_to_hub": must_be(False, "modalforge does not upload; push final/ with huggingface_hub"),
    "trust_remote_code": direct("model.trust_remote_code"),
    "model_init_kwargs": must_be(None, "set model.* options instead (dtype, attn_implementation)"),
    "max_length": max_length,
    "truncation_mode": _truncation,
    # ModelConfig
    "model_name_or_path": _model_path,
    "model_revision": must_be("main", "model.name_or_path takes a local folder or a hub id at its main revision"),
    "dtype": lambda v, c, x: [] if v in (None, "auto") else _needs_model("model.dtype")(v, c, x),
    "attn_implementation": lambda v, c, x: [] if v is None else _needs_model("model.attn_implementation")(v, c, x),
    "use_peft": _peft,
    **{k: _consumed_by_peft for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
                                      "lora_modules_to_save", "use_rslora", "use_dora", "load_in_4bit",
                                      "bnb_4bit_quant_type", "use_bnb_nested_quant")},
    "lora_task_type": must_be("CAUSAL_LM", "modalforge's text plugins train causal LMs"),
    # ScriptArguments
    "dataset_name": _dataset,
    "dataset_train_split": lambda v, c, x: [] if c.get("dataset_name") else _raise_ignored("without dataset_name"),
    "dataset_test_split": lambda v, c, x: [] if c.get("dataset_name") else _raise_ignored("without dataset_name"),
}


def _raise_ignored(why: str) -> list[str]:
    raise Ignored(why)


# ---- finding the plugin ---------------------------------------------------------------------


def _hook(name: str) -> TrlPlugin | None:
    """Plugin ``name``'s TRL hook, imported now; None when it sets none."""
    from modalforge import registry

    hook = registry.hook(name, "trl")
    if hook is not None and not isinstance(hook, TrlPlugin):
        raise TrlConfigError(f"plugin {name!r}: its trl hook {registry.get(name).plugin.trl!r} is a "
                             f"{type(hook).__name__}, expected modalforge.cli.trl_config.TrlPlugin")
    return hook


def trl_plugins() -> dict[str, TrlPlugin]:
    """Installed plugins that read TRL config files, by name."""
    from modalforge import registry

    return {name: hook for name, hook in registry.hooks("trl").items() if isinstance(hook, TrlPlugin)}


def _choices() -> str:
    """``trl_config works with plugin=a or b (TRL's AConfig, BConfig)``, from the installed plugins."""
    plugins = trl_plugins()
    if not plugins:
        return "trl_config works with no installed plugin"
    names = list(plugins)
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    classes = ", ".join(c for hook in plugins.values() for c in hook.config_classes)
    return f"trl_config works with plugin={listed} (TRL's {classes})"


def resolve(target: str) -> tuple[str, TrlPlugin, str]:
    """(plugin name, its hook, config class) for a plugin name or a TRL config class name."""
    from modalforge import registry

    if target in registry.discover() or target in registry.FAILED:
        hook = _hook(target)
        if hook is not None:
            return target, hook, hook.config_classes[0]
    else:
        readers = [(name, hook) for name, hook in trl_plugins().items() if target in hook.config_classes]
        if len(readers) == 1:
            return readers[0][0], readers[0][1], target
        if readers:
            raise TrlConfigError(f"TRL's {target} is read by plugins {', '.join(n for n, _ in readers)}: "
                                 "choose one with plugin=<name>")
    raise TrlConfigError(f"{_choices()}, not plugin={target}")


def _objective_params(plugin: str, hook: TrlPlugin) -> frozenset[str]:
    """Parameter names of the class the plugin's same-named TRL arguments go to."""
    from modalforge import registry

    cls = registry.load_object(hook.objective or registry.get(plugin).plugin.objective)
    return frozenset(p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "model"))


# ---- reading and translating a file --------------------------------------------------------


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
    """Translate a TRL config file for ``plugin``, row by row.

    Args:
        path: the YAML / JSON file TRL's ``TrlParser`` takes (``--config``).
        plugin: the modalforge plugin it runs under, or the TRL config class it is written for
            (``DPOConfig``), found among the installed plugins' ``trl`` hooks.
        objective_params: the plugin Objective's parameter names (default: its signature).
        has_pretrained_option: False to select no ``model=`` option for ``model_name_or_path``
            (default: the plugin's ``pretrained_model``).

    Raises:
        TrlConfigError: unreadable file, a plugin without a TRL hook, or argument names TRL does not know.
    """
    plugin, hook, config_class = resolve(plugin)
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
    pretrained = hook.pretrained_model
    if has_pretrained_option is not None:
        pretrained = (pretrained or f"{plugin}/pretrained") if has_pretrained_option else None
    ctx = Context(plugin, known,
                  frozenset(objective_params) if objective_params is not None else _objective_params(plugin, hook),
                  pretrained)
    handlers = {**COMMON, **hook.handlers}
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
                out = [override(f"objective.{key}", value)]
            elif key in IGNORED:
                raise Ignored(IGNORED[key])
            elif value == known[key]:
                row.status, row.note, out = "at_default", "TRL's default, nothing to set", []
            else:
                raise Unmapped(f"no modalforge counterpart for {plugin}")
            # a pair of arguments mapped by one handler (adam_beta1/2, bf16/fp16, save_*) emits once
            row.overrides = [o for o in out if o not in seen_outputs]
            seen_outputs.update(out)
            if not row.overrides and row.status != "at_default":
                row.note = f"see {PARTNERS[key]}" if key in PARTNERS else "nothing to set"
        except Unmapped as why:
            row.status, row.note = "unmapped", str(why)
        except Ignored as why:
            row.status, row.note = "ignored", str(why)
        rows.append(row)
    return Mapping(str(path), plugin, config_class, rows, {str(k): str(v) for k, v in env.items()})


def trl_config_overrides(path: str | Path, plugin: str) -> tuple[list[str], list[str]]:
    """(Hydra overrides, names of the arguments with no modalforge counterpart) for a TRL config file."""
    mapping = trl_config_mapping(path, plugin)
    return mapping.overrides, mapping.unmapped


def _override_key(arg: str) -> str:
    return override_key(arg)


def expand_argv(argv: Sequence[str]) -> list[str]:
    """``train`` arguments with ``trl_config=<file>`` replaced by its overrides.

    The file is read for the chosen ``plugin=``. Overrides given on the command line win
    over the file's. Prints the mapping once; sets the file's ``env`` variables (as
    TrlParser does).

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
        raise TrlConfigError(f"trl_config={path} needs plugin=<name>; {_choices()}")
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
        print("usage: python -m modalforge.cli.trl_config --snapshot")
