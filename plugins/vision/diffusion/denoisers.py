"""The denoisers diffusers offers, built from a config, and one way to call them all.

diffusers' denoisers do not share a call signature: ``UNet2DModel(x, t, class_labels=)``,
``UNet2DConditionModel(x, t, encoder_hidden_states=)``, ``DiTTransformer2DModel(x, timestep=,
class_labels=)`` and ``SD3Transformer2DModel(x, encoder_hidden_states=, pooled_projections=,
timestep=)`` (the transformers also want one timestep per image). :func:`denoise` maps the
objective's condition onto each of them, so the loss and the sampling loop are written once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from modalforge.errors import ModalforgeError

DenoiserKind = Literal["unet", "dit", "sd3"]
# The repeated block of each transformer: FSDP wraps each one, activation checkpointing recomputes it.
BLOCK_CLASSES = {"DiTTransformer2DModel": "BasicTransformerBlock", "SD3Transformer2DModel": "JointTransformerBlock"}
KIND_CLASSES = {"dit": "DiTTransformer2DModel", "sd3": "SD3Transformer2DModel"}


def base_model(module: nn.Module) -> nn.Module:
    """The diffusers model under ``torch.compile`` and a PEFT wrapper."""
    module = getattr(module, "_orig_mod", module)
    get_base = getattr(module, "get_base_model", None)
    return get_base() if callable(get_base) else module


def kind_of(module: nn.Module) -> str:
    """The denoiser's diffusers class name (``UNet2DModel``, ``DiTTransformer2DModel``...)."""
    return type(base_model(module)).__name__


def null_class(module: nn.Module) -> int | None:
    """Index of the "no class" embedding of a class-conditional denoiser (classifier-free guidance).

    ``UNet2DModel`` built here has one embedding per class plus a last null one; DiT's
    label embedding keeps its null entry right after its ``num_embeds_ada_norm`` classes.
    """
    config = base_model(module).config
    if kind_of(module) == "DiTTransformer2DModel":
        return int(config.num_embeds_ada_norm)
    count = getattr(config, "num_class_embeds", None)
    return int(count) - 1 if count else None


def denoise(denoiser: nn.Module, x: torch.Tensor, t: torch.Tensor | float, *, class_labels: torch.Tensor | None = None,
            states: torch.Tensor | None = None, pooled: torch.Tensor | None = None) -> torch.Tensor:
    """The denoiser's prediction for ``x`` at timesteps ``t`` (a scalar or one per image), given its condition."""
    t = torch.as_tensor(t, device=x.device)
    t = t.expand(len(x)) if t.ndim == 0 else t
    kind = kind_of(denoiser)
    if kind == "SD3Transformer2DModel":
        out = denoiser(hidden_states=x, encoder_hidden_states=states, pooled_projections=pooled, timestep=t).sample
    elif kind == "DiTTransformer2DModel":
        out = denoiser(x, timestep=t, class_labels=class_labels).sample
    else:
        kwargs: dict[str, Any] = {}
        if class_labels is not None:
            kwargs["class_labels"] = class_labels
        if states is not None:
            kwargs["encoder_hidden_states"] = states
        out = denoiser(x, t, **kwargs).sample
    if out.shape[1] == 2 * x.shape[1]:
        # A pretrained DiT also predicts its variance (learn_sigma); the loss and the samplers use the mean part.
        out = out[:, : x.shape[1]]
    return out


def freeze_unused(module: nn.Module) -> None:
    """Freeze what the forward pass never reaches, so DDP finds no unused parameter and EMA no dead weight.

    SD3's last block is ``context_pre_only``: its caption stream's output is dropped, so the
    query projection of the caption (``attn.add_q_proj``) gets no gradient there.
    """
    for block in getattr(base_model(module), "transformer_blocks", []):
        attn = getattr(block, "attn", None)
        if getattr(block, "context_pre_only", False) and getattr(attn, "add_q_proj", None) is not None:
            attn.add_q_proj.requires_grad_(False)


def input_multiple(module: nn.Module) -> int:
    """What the denoiser's input side must be a multiple of: the patch size, or 2^(levels-1) of a UNet."""
    config = base_model(module).config
    if getattr(config, "patch_size", None):
        return int(config.patch_size)
    return 2 ** max(len(getattr(config, "block_out_channels", []) or [1]) - 1, 0)


def build_transformer(kind: DenoiserKind, settings: dict[str, Any] | None, *, sample_size: int, channels: int,
                      conditioning: str, num_classes: int, text_dim: int | None = None,
                      pooled_dim: int | None = None) -> nn.Module:
    """A ``DiTTransformer2DModel`` (class-conditional) or ``SD3Transformer2DModel`` (text) from its arguments.

    DiT's label embedding has a null entry after the classes and drops 10% of the labels
    itself in training (as the DiT paper trains it); ``conditioning=none`` always feeds it the
    null label. SD3 reads the text encoder's token states (``joint_attention_dim``) and its
    pooled embedding (``pooled_projection_dim``).
    """
    from diffusers import DiTTransformer2DModel, SD3Transformer2DModel

    cfg = dict(settings or {})
    if kind == "dit":
        if conditioning == "text":
            raise ModalforgeError("model.denoiser=dit (DiTTransformer2DModel) is class-conditional; use "
                                  "objective.conditioning.kind=class (or none), or model=diffusion/sd3_tiny for text")
        if conditioning == "class" and num_classes < 1:
            raise ModalforgeError("objective.conditioning.kind=class needs labelled data (data.label_field); none found")
        defaults = {"num_layers": 4, "num_attention_heads": 4, "attention_head_dim": 32, "patch_size": 2}
        return DiTTransformer2DModel(**{**defaults, **cfg, "sample_size": sample_size, "in_channels": channels,
                                        "out_channels": channels, "num_embeds_ada_norm": max(num_classes, 1)})
    if kind == "sd3":
        if conditioning != "text":
            raise ModalforgeError("model.denoiser=sd3 (SD3Transformer2DModel) is text-conditional; use "
                                  "objective.conditioning.kind=text")
        defaults = {"num_layers": 4, "num_attention_heads": 4, "attention_head_dim": 32, "patch_size": 2}
        cfg = {**defaults, **cfg}
        cfg.setdefault("caption_projection_dim", cfg["num_attention_heads"] * cfg["attention_head_dim"])
        cfg.setdefault("pos_embed_max_size", max(sample_size // cfg["patch_size"], 1))
        return SD3Transformer2DModel(**{**cfg, "sample_size": sample_size, "in_channels": channels,
                                        "out_channels": channels, "joint_attention_dim": text_dim,
                                        "pooled_projection_dim": pooled_dim})
    raise ModalforgeError(f"model.denoiser={kind!r} is not one of: unet, dit, sd3")


def _pretrained_class(path: str) -> str | None:
    folder = Path(path).expanduser()
    for sub in ("transformer", "unet"):
        config = folder / sub / "config.json"
        if config.is_file():
            return json.loads(config.read_text()).get("_class_name")
    return None


def block_classes_for(model_cfg: dict[str, Any]) -> set[type[nn.Module]]:
    """The transformer block classes of the denoiser a model config would build, without building it.

    A UNet names none (FSDP then wraps the whole denoiser, with a warning from the core).
    """
    import diffusers.models.attention as attention

    name = KIND_CLASSES.get(str(model_cfg.get("denoiser") or "unet"))
    if model_cfg.get("name_or_path"):
        name = _pretrained_class(str(model_cfg["name_or_path"]))
    block = BLOCK_CLASSES.get(name or "")
    return {getattr(attention, block)} if block else set()


class PipelinePromptEncoder(nn.Module):
    """A pretrained SD3 pipeline's text encoders (two CLIPs and an optional T5), frozen, run through the
    pipeline's own ``encode_prompt``: captions -> (token states, pooled embedding), as SD3 was trained."""

    def __init__(self, pipe: Any, max_sequence_length: int = 77) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict({name: getattr(pipe, name) for name in ("text_encoder", "text_encoder_2",
                                                                                "text_encoder_3")
                                       if getattr(pipe, name, None) is not None})
        self.pipe, self.max_sequence_length = pipe, max_sequence_length  # a pipeline is no Module: not registered

    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.parameters()).device
        states, _, pooled, _ = self.pipe.encode_prompt(prompt=list(captions), prompt_2=None, prompt_3=None,
                                                       device=device, do_classifier_free_guidance=False,
                                                       max_sequence_length=self.max_sequence_length)
        return states, pooled


def encode_text(encoder: nn.Module, captions: list[str], input_ids: torch.Tensor | None) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor | None]:
    """(token states, pooled embedding) of captions from a frozen text encoder.

    A ``PipelinePromptEncoder`` reads the captions; a ``CLIPTextModel`` (or the text tower of a
    clip run) reads their token ids: its last hidden states, and its projected ``text_embeds``
    when it has them, else its ``pooler_output``.
    """
    if isinstance(encoder, PipelinePromptEncoder):
        return encoder(captions)
    device = next(encoder.parameters()).device
    out = encoder(input_ids.to(device))
    pooled = getattr(out, "text_embeds", None)
    if pooled is None:
        pooled = getattr(out, "pooler_output", None)
    return out.last_hidden_state, pooled
