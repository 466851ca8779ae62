"""dpo objective: the preference-optimisation family behind one ``loss`` switch.

Chosen and rejected sequences go through the policy in one concatenated forward.
``loss`` takes TRL's ``loss_type`` names, one or several with ``loss_weights`` (MPO
is ``[sigmoid, bco_pair, sft]`` with ``[0.8, 0.2, 1.0]``), plus modalforge's ``cdpo``,
``simpo``, ``orpo``, ``cpo`` and ``kto``. The reference policy is a frozen copy
(``reference=copy``), the same weights with the PEFT adapter disabled
(``reference=adapter``: no second copy in memory), log-probabilities computed once
before training and cached (``reference=precomputed``), or none (``reference=none``:
log pi_ref = 0, as CPO); ``auto`` picks ``adapter`` under a PEFT adapter and ``copy``
otherwise, and ``none`` when every loss is reference-free. With ``sync_ref_model``
the copy moves towards the policy (TR-DPO).
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from torch import nn
from torchmetrics import MeanMetric

from modalforge.adapters import continues_adapter
from modalforge.data.cache import cache_root, write_atomic
from modalforge.errors import ModalforgeError
from modalforge.interfaces import ModelObjective, StepOutput
from modalforge.losses import token_logprobs
from modalforge.progress import preparing
from modalforge.text.models import block_classes_for
from modalforge.text.generate import answer
from modalforge.text.stops import set_generation_stops
from modalforge.plugins.text.dpo import losses
from modalforge.plugins.text.dpo.divergences import DIVERGENCES, Divergence

PAIRED = losses.PAIRED
REFERENCE_FREE = losses.REFERENCE_FREE
LossName = Literal["sigmoid", "cdpo", "robust", "ipo", "hinge", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
                   "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft", "simpo", "orpo", "cpo",
                   "kto"]
Reference = Literal["auto", "copy", "adapter", "precomputed", "none"]


def token_logps(model: nn.Module, batch: dict[str, torch.Tensor], with_sum_sq: bool = False, impl: str = "dense"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token log-probabilities of each sequence's next tokens, zero outside the completion; the
    (shifted) completion mask; and, for WPO, ``log sum_v p(v)^2`` per token.

    ``impl`` is ``module.loss_impl``: chunked never holds the ``[2B, T, vocab]`` logits. WPO's
    weights need the whole distribution, so ``with_sum_sq`` is always dense."""
    mask = batch["completion_mask"][:, 1:]
    if not with_sum_sq:
        logp, _ = token_logprobs(model, batch["input_ids"], impl=impl, attention_mask=batch["attention_mask"])
        return logp * mask, mask, None
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logp_all = torch.log_softmax(logits[:, :-1].float(), -1)
    logp = logp_all.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1) * mask
    sum_sq = torch.logsumexp(2 * logp_all.detach(), -1) * mask
    return logp, mask, sum_sq


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor], impl: str = "dense"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each sequence's completion tokens, and their count."""
    logp, mask, _ = token_logps(model, batch, impl=impl)
    return logp.sum(-1), mask.sum(-1).clamp(min=1)


def disable_dropout(module: nn.Module) -> None:
    """Zero every dropout (``nn.Dropout`` modules, as TRL does, and HF attention's ``attention_dropout``)."""
    for sub in module.modules():
        if isinstance(sub, nn.Dropout):
            sub.p = 0.0
        if isinstance(getattr(sub, "attention_dropout", None), float):
            sub.attention_dropout = 0.0


def _check_range(name: str, value: float | None, low: float, high: float, why: str, *, open_high: bool = False,
                 open_low: bool = False) -> None:
    if value is None:
        return
    below = value <= low if open_low else value < low
    above = value >= high if open_high else value > high
    if below or above:
        interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise ModalforgeError(f"objective.{name}={value} is out of range {interval}: {why}")


class DPOObjective(ModelObjective):
    """Preference optimisation.

    Args:
        model: the ``model`` config (``build_causal_lm``; ``model.name_or_path`` may be an sft run's ``final``).
        loss: one name or a list (TRL's ``loss_type``): ``sigmoid`` (DPO), ``cdpo``, ``robust``, ``ipo``, ``hinge``,
            ``exo_pair``, ``nca_pair``, ``bco_pair``, ``sppo_hard``, ``aot``, ``aot_unpaired``, ``apo_zero``,
            ``apo_down``, ``discopop``, ``sigmoid_norm``, ``sft``, ``simpo``, ``orpo``, ``cpo``; or ``kto``
            alone (needs ``data.kind=kto``).
        loss_weights: one weight per loss (default 1.0 each).
        beta: inverse temperature (for ORPO: the weight lambda of the odds-ratio term; for IPO: tau).
        label_smoothing: preference-noise rate of cdpo, robust, exo_pair, aot, aot_unpaired, cpo, simpo.
        gamma_beta_ratio: SimPO's target margin over beta.
        discopop_tau: DiscoPOP's temperature.
        cpo_alpha: weight of CPO's NLL (behaviour cloning) term.
        f_divergence_type: ``reverse_kl`` (DPO), ``forward_kl``, ``js_divergence``, ``alpha_divergence`` (f-DPO).
        f_alpha_divergence_coef: alpha of the alpha-divergence, in [0, 1].
        ld_alpha: LD-DPO's weight of the tokens past the shorter completion, in [0, 1] (``None``: off).
        use_weighting: WPO's weighting of each pair by the policy's probability of it.
        sync_ref_model / ref_model_mixup_alpha / ref_model_sync_steps: TR-DPO: every ``ref_model_sync_steps``
            optimizer steps, reference <- alpha * policy + (1 - alpha) * reference (needs ``reference=copy``).
        disable_dropout: zero dropout in the policy (and so its reference copy), as TRL does by default.
        desirable_weight / undesirable_weight: KTO's class weights.
        reference: ``auto``, ``copy``, ``adapter``, ``precomputed`` or ``none``.
        sample_max_new_tokens: length of logged answers.
    """

    def __init__(self, model: Mapping[str, Any] | None = None, loss: LossName | list[LossName] = "sigmoid",
                 loss_weights: list[float] | None = None, beta: float = 0.1, label_smoothing: float = 0.0,
                 gamma_beta_ratio: float = 0.5, discopop_tau: float = 0.05, cpo_alpha: float = 1.0,
                 f_divergence_type: Divergence = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
                 ld_alpha: float | None = None, use_weighting: bool = False, sync_ref_model: bool = False,
                 ref_model_mixup_alpha: float = 0.6, ref_model_sync_steps: int = 512, disable_dropout: bool = True,
                 desirable_weight: float = 1.0, undesirable_weight: float = 1.0, reference: Reference = "auto",
                 sample_max_new_tokens: int = 8) -> None:
        super().__init__(model)
        names = [loss] if isinstance(loss, str) else list(loss)
        self._validate(names, loss_weights, beta, label_smoothing, discopop_tau, f_divergence_type,
                       f_alpha_divergence_coef, ld_alpha, use_weighting, sync_ref_model, ref_model_mixup_alpha,
                       ref_model_sync_steps, reference)
        self.loss_names = names
        self.loss_name = names[0] if len(names) == 1 else "+".join(names)
        self.loss_weights = [float(w) for w in loss_weights] if loss_weights is not None else [1.0] * len(names)
        self.beta, self.label_smoothing = beta, label_smoothing
        self.gamma_beta_ratio, self.weights = gamma_beta_ratio, (desirable_weight, undesirable_weight)
        self.options = dict(beta=beta, label_smoothing=label_smoothing, gamma_beta_ratio=gamma_beta_ratio,
                            discopop_tau=discopop_tau, cpo_alpha=cpo_alpha, f_divergence_type=f_divergence_type,
                            f_alpha_divergence_coef=f_alpha_divergence_coef)
        self.ld_alpha, self.use_weighting, self.disable_dropout = ld_alpha, use_weighting, disable_dropout
        self.sync_ref_model, self.mixup_alpha, self.sync_steps = sync_ref_model, ref_model_mixup_alpha, ref_model_sync_steps
        if sync_ref_model:  # a buffer, so resume continues the sync schedule where it stopped
            self.register_buffer("optimizer_steps", torch.zeros((), dtype=torch.long))
        self.reference_mode, self.sample_max_new_tokens = reference, sample_max_new_tokens
        self.reference: nn.Module | None = None
        self._reference_ready = False  # settled at the first set_adapter_target; export's merged model keeps it
        self._table: dict[str, torch.Tensor] | None = None
        self.val_accuracy, self.val_margin = MeanMetric(), MeanMetric()

    @staticmethod
    def _validate(names, weights, beta, eps, tau, divergence, alpha, ld_alpha, use_weighting, sync, mixup, sync_steps,
                  reference) -> None:
        known = (*PAIRED, "kto")
        for name in names:
            if name not in known:
                raise ModalforgeError(f"objective.loss={name!r} is not one of: {', '.join(known)}")
        if not names:
            raise ModalforgeError(f"objective.loss is an empty list; give one or more of: {', '.join(known)}")
        if "kto" in names and len(names) > 1:
            raise ModalforgeError(f"objective.loss={names}: kto is unpaired and cannot be combined with paired losses")
        if weights is not None and len(weights) != len(names):
            raise ModalforgeError(f"objective.loss_weights has {len(weights)} weight(s) for {len(names)} loss(es) "
                                  f"{names}; give one weight per loss")
        if reference not in ("auto", "copy", "adapter", "precomputed", "none"):
            raise ModalforgeError(f"objective.reference={reference!r} is not one of: auto, copy, adapter, "
                                  "precomputed, none")
        if divergence not in DIVERGENCES:
            raise ModalforgeError(f"objective.f_divergence_type={divergence!r} is not one of: {', '.join(DIVERGENCES)}")
        unsupported = [n for n in names if n not in losses.F_DIVERGENCE_LOSSES]
        if divergence != "reverse_kl" and unsupported:
            raise ModalforgeError(f"objective.f_divergence_type={divergence} works only with the margin losses "
                                  f"({', '.join(losses.F_DIVERGENCE_LOSSES)}), not {', '.join(unsupported)}")
        _check_range("f_alpha_divergence_coef", alpha, 0.0, 1.0,
                     "the alpha-divergence runs from forward KL (0) to reverse KL (1)")
        _check_range("ld_alpha", ld_alpha, 0.0, 1.0, "the weight of the tokens past the shorter completion")
        _check_range("beta", beta, 0.0, float("inf"), "beta must be positive", open_low=True)
        _check_range("discopop_tau", tau, 0.0, float("inf"), "DiscoPOP's temperature must be positive", open_low=True)
        if "robust" in names:
            _check_range("label_smoothing", eps, 0.0, 0.5, "robust DPO's flip rate must be below 0.5", open_high=True)
        if "exo_pair" in names:
            _check_range("label_smoothing", eps, 0.0, 1.0, "exo_pair needs 0 < label_smoothing < 1 (EXO recommends "
                         "1e-3)", open_low=True, open_high=True)
        _check_range("label_smoothing", eps, 0.0, 1.0, "a preference-noise rate", open_high=True)
        if eps and not set(names) & set(losses.SMOOTHED):
            raise ModalforgeError(f"objective.label_smoothing={eps} has no effect on {', '.join(names)}; it is read by "
                                  f"{', '.join(losses.SMOOTHED)} (conservative DPO is loss=cdpo)")
        if names == ["kto"] and (ld_alpha is not None or use_weighting or divergence != "reverse_kl"):
            raise ModalforgeError("objective.ld_alpha / use_weighting / f_divergence_type apply to paired losses, "
                                  "not kto")
        if use_weighting and set(names) & set(losses.SORTED):
            raise ModalforgeError("objective.use_weighting (WPO) cannot weight aot / aot_unpaired: they sort the "
                                  "batch, so per-pair weights would not line up")
        if reference == "precomputed" and names == ["kto"]:
            raise ModalforgeError("objective.reference=precomputed does not work with loss=kto: its KL estimate pairs "
                                  "completions across each batch; use reference=copy or adapter")
        if sync:
            _check_range("ref_model_mixup_alpha", mixup, 0.0, 1.0, "TR-DPO's share of the policy in the new reference")
            if sync_steps < 1:
                raise ModalforgeError(f"objective.ref_model_sync_steps={sync_steps} must be at least 1")
            if reference not in ("auto", "copy"):
                raise ModalforgeError(f"objective.sync_ref_model=true needs reference=copy (a reference to update), "
                                      f"not reference={reference}")

    # ---- building -----------------------------------------------------------------
    def set_adapter_target(self, module: nn.Module) -> None:
        self.model = module
        if self._reference_ready:  # export puts back the merged model: the reference is settled already
            return
        self._reference_ready = True
        if self.disable_dropout:
            disable_dropout(module)
        if all(n in REFERENCE_FREE for n in self.loss_names) and self.reference_mode == "auto":
            self.reference_mode = "none"
        if self.reference_mode == "none":
            return
        if self.reference_mode == "auto":
            # a continued earlier-stage adapter (adapter.resume): disabled, it is the original base, not the start
            self.reference_mode = "adapter" if hasattr(module, "disable_adapter") and not continues_adapter(module) \
                else "copy"
        if self.reference_mode == "adapter" and not hasattr(module, "disable_adapter"):
            raise ModalforgeError("objective.reference=adapter needs a PEFT adapter (adapter=lora|qlora|dora|ia3)")
        if self.sync_ref_model and self.reference_mode != "copy":
            raise ModalforgeError("objective.sync_ref_model=true needs a full reference copy; under a PEFT adapter "
                                  "the reference is the adapter-disabled policy, which cannot be moved (as in TRL)")
        if self.reference_mode == "copy" and self.reference is None:
            self.reference = copy.deepcopy(module)  # the initial policy, before any step
            self.reference.requires_grad_(False)
            self.reference.eval()

    def frozen_modules(self) -> list[nn.Module]:
        # TR-DPO's reference changes, so it is saved with checkpoints instead of being rebuilt.
        return [self.reference] if self.reference is not None and not self.sync_ref_model else []

    def train(self, mode: bool = True) -> "DPOObjective":
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    def block_classes(self) -> set[type[nn.Module]]:
        return block_classes_for(self.model_config)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """TR-DPO (Gorbatovski et al. 2024): soft-update the reference every ``ref_model_sync_steps`` steps."""
        if not self.sync_ref_model or self.reference is None:
            return
        self.optimizer_steps += 1
        if int(self.optimizer_steps) % self.sync_steps == 0:
            for ref, cur in zip(self.reference.parameters(), self.model.parameters(), strict=True):
                ref.mul_(1.0 - self.mixup_alpha).add_(cur.detach(), alpha=self.mixup_alpha)

    # ---- reference log-probs ------------------------------------------------------
    @torch.no_grad()
    def _reference_logps(self, batch: dict[str, torch.Tensor], ld_alpha: float | None = None) -> torch.Tensor:
        if self.reference_mode == "none":
            return torch.zeros(batch["input_ids"].size(0), device=batch["input_ids"].device)
        if self.reference_mode in ("copy", "adapter"):
            if self.reference_mode == "copy":
                tokens, mask, _ = token_logps(self.reference, batch, impl=self.loss_impl)
            else:
                with self.model.disable_adapter():
                    tokens, mask, _ = token_logps(self.model, batch, impl=self.loss_impl)
            return losses.length_desensitised(tokens, mask.to(tokens.dtype), ld_alpha)
        split = "train" if self.model.training else "val"
        table = self._precomputed()[split].to(batch["index"].device)
        return torch.cat([table[batch["index"], 0], table[batch["index"], 1]])

    def _precomputed(self) -> dict[str, torch.Tensor]:
        """Reference log-probs of every train/val pair, computed once by the initial policy and cached."""
        if self._table is not None:
            return self._table
        dm = self.datamodule
        reference_sets = dm.reference_sets()
        digest = hashlib.sha256(repr((self.model_config, [d.items for d in reference_sets.values()],
                                      self.ld_alpha)).encode())
        for name, param in self.model.named_parameters():  # which initial weights: a from-scratch model depends on the seed
            digest.update(name.encode())
            digest.update(param.detach().flatten()[:64].float().cpu().numpy().tobytes())
        path = cache_root(dm.cache_dir) / "dpo_reference" / f"{digest.hexdigest()[:20]}.pt"
        if path.exists():
            self._table = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no code runs
            return self._table
        was_training = self.model.training
        self.model.eval()
        table = {}
        device = next(self.model.parameters()).device
        total = sum(len(dataset) for dataset in reference_sets.values())
        with preparing("dpo: reference log-probs of the initial policy", total=total, unit="example",
                       cached_in=path.parent) as progress, torch.no_grad():
            for split, dataset in reference_sets.items():
                rows = []
                for start in range(0, len(dataset), dm.batch_size):
                    items = [dataset[i] for i in range(start, min(start + dm.batch_size, len(dataset)))]
                    batch = {k: v.to(device) for k, v in dm._collate(items).items()}
                    tokens, mask, _ = token_logps(self.model, batch, impl=self.loss_impl)
                    logps = losses.length_desensitised(tokens, mask.to(tokens.dtype), self.ld_alpha).cpu()
                    rows.append(torch.stack(logps.chunk(2), dim=1))
                    progress.update(len(items))
                table[split] = torch.cat(rows)
        self.model.train(was_training)
        write_atomic(path, lambda tmp: torch.save(table, tmp))  # two runs at once: no torn file
        self._table = table
        return table

    # ---- losses -------------------------------------------------------------------
    def _paired(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        tokens, mask, sum_sq = token_logps(self.model, batch, with_sum_sq=self.use_weighting, impl=self.loss_impl)
        rc, rr = self._reference_logps(batch, self.ld_alpha).chunk(2)
        loss, terms, pc, pr = losses.paired_loss(self.loss_names, self.loss_weights, tokens, mask, rc, rr,
                                                 ld_alpha=self.ld_alpha, log_sum_sq=sum_sq, **self.options)
        beta = self.beta
        if self.loss_names in (["simpo"], ["orpo"]):
            nc, nr = mask.sum(-1).clamp(min=1).chunk(2)
            reward_c, reward_r = beta * pc.detach() / nc, beta * pr.detach() / nr
        else:
            reward_c, reward_r = beta * (pc - rc).detach(), beta * (pr - rr).detach()
        correct = (reward_c > reward_r).float()
        metrics = {"rewards/chosen": reward_c.mean(), "rewards/rejected": reward_r.mean(),
                   "rewards/margin": (reward_c - reward_r).mean(), "rewards/accuracy": correct.mean(),
                   "logps/chosen": pc.detach().mean(), "logps/rejected": pr.detach().mean()}
        if len(terms) > 1:
            metrics.update({f"loss/{name}": value.detach() for name, value in terms.items()})
        return loss, metrics, correct

    def _kto(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        logps, _ = sequence_logps(self.model, batch, impl=self.loss_impl)
        reference = self._reference_logps(batch)
        policy, kl_policy = logps.chunk(2)
        ref, kl_ref = reference.chunk(2)
        desirable = batch["desirable"].bool()
        per_example, z0 = losses.kto(policy, ref, kl_policy, kl_ref, desirable, self.beta, *self.weights)
        rewards = self.beta * (policy - ref).detach()
        correct = ((rewards > 0) == desirable).float()
        metrics = {"kl": z0, "rewards/accuracy": correct.mean()}
        if desirable.any():
            metrics["rewards/desirable"] = rewards[desirable].mean()
        if (~desirable).any():
            metrics["rewards/undesirable"] = rewards[~desirable].mean()
        return per_example.mean(), metrics, correct

    def _step(self, batch: dict[str, torch.Tensor]) -> tuple[StepOutput, torch.Tensor]:
        loss, metrics, correct = self._kto(batch) if self.loss_names == ["kto"] else self._paired(batch)
        size = len(correct)
        # Every loss here is a mean over pairs (KTO: over examples), as the papers define it; the core
        # makes it the mean over the optimizer step's pairs, however accumulation and ranks split them.
        return StepOutput(loss=loss, metrics=metrics, num_tokens=int(batch["attention_mask"].sum()),
                          batch_size=size, num_learned_tokens=batch["completion_mask"].sum(), mean_over=size), correct

    def training_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        return self._step(batch)[0]

    def validation_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        out, correct = self._step(batch)
        self.val_accuracy.update(correct)
        if "rewards/margin" in out.metrics:
            self.val_margin.update(out.metrics["rewards/margin"], weight=len(correct))
        return out

    def validation_epoch_metrics(self) -> dict[str, torch.Tensor]:
        metrics = {"preference_accuracy": self.val_accuracy.compute()}
        if self.val_margin.update_called:
            metrics["margin"] = self.val_margin.compute()
        self.val_accuracy.reset()
        self.val_margin.reset()
        return metrics

    def sample(self, inputs: list[list[dict]]) -> list[str]:
        return answer(self.model, self.datamodule.processor, inputs, self.sample_max_new_tokens)

    def save_pretrained(self, directory: str | Path) -> None:
        # final/: plain ``model.generate`` stops at the template's end of turn (generation_config.eos_token_id)
        set_generation_stops(self.adapter_target(), getattr(self.datamodule, "processor", None))
        super().save_pretrained(directory)
