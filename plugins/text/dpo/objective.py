"""dpo objective: the preference-optimisation family behind one ``loss`` switch.

Chosen and rejected sequences go through the policy in one concatenated forward.
The reference policy is a frozen copy (``reference=copy``), the same weights with
the PEFT adapter disabled (``reference=adapter``: no second copy in memory), or
log-probabilities computed once before training and cached (``reference=precomputed``);
``auto`` picks ``adapter`` under a PEFT adapter and ``copy`` otherwise. SimPO and
ORPO need no reference.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any, Mapping

import torch
from torch import nn
from torchmetrics import MeanMetric

from modalforge.data.cache import cache_root
from modalforge.errors import ModalforgeError
from modalforge.interfaces import ModelObjective, StepOutput
from modalforge.plugins.text.causal_lm.model import block_classes_for
from modalforge.plugins.text.chat.generate import answer
from modalforge.plugins.text.dpo import losses

PAIRED = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each sequence's completion tokens, and their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["completion_mask"][:, 1:]
    return (logp * mask).sum(-1), mask.sum(-1).clamp(min=1)


class DPOObjective(ModelObjective):
    """Preference optimisation.

    Args:
        model: the ``model`` config (``build_causal_lm``; ``model.name_or_path`` may be an sft run's ``final``).
        loss: ``sigmoid`` (DPO), ``ipo``, ``hinge``, ``robust``, ``simpo``, ``orpo`` or ``kto`` (needs ``data.kind=kto``).
        beta: inverse temperature (for ORPO: the weight lambda of the odds-ratio term).
        label_smoothing: cDPO / robust DPO preference-noise rate.
        gamma_beta_ratio: SimPO's target margin over beta.
        desirable_weight / undesirable_weight: KTO's class weights.
        reference: ``auto``, ``copy``, ``adapter`` or ``precomputed``.
        sample_max_new_tokens: length of logged answers.
    """

    def __init__(self, model: Mapping[str, Any] | None = None, loss: str = "sigmoid", beta: float = 0.1,
                 label_smoothing: float = 0.0, gamma_beta_ratio: float = 0.5, desirable_weight: float = 1.0,
                 undesirable_weight: float = 1.0, reference: str = "auto", sample_max_new_tokens: int = 8) -> None:
        super().__init__(model)
        if loss not in (*PAIRED, "kto"):
            raise ModalforgeError(f"objective.loss={loss!r} is not one of: {', '.join((*PAIRED, 'kto'))}")
        if reference not in ("auto", "copy", "adapter", "precomputed"):
            raise ModalforgeError(f"objective.reference={reference!r} is not one of: auto, copy, adapter, precomputed")
        if reference == "precomputed" and loss == "kto":
            raise ModalforgeError("objective.reference=precomputed does not work with loss=kto: its KL estimate pairs "
                                  "completions across each batch; use reference=copy or adapter")
        self.loss_name, self.beta, self.label_smoothing = loss, beta, label_smoothing
        self.gamma_beta_ratio, self.weights = gamma_beta_ratio, (desirable_weight, undesirable_weight)
        self.reference_mode, self.sample_max_new_tokens = reference, sample_max_new_tokens
        self.reference: nn.Module | None = None
        self._table: dict[str, torch.Tensor] | None = None
        self.val_accuracy, self.val_margin = MeanMetric(), MeanMetric()

    # ---- building -----------------------------------------------------------------
    def set_adapter_target(self, module: nn.Module) -> None:
        self.model = module
        if self.loss_name in REFERENCE_FREE:
            self.reference_mode = "none"
            return
        if self.reference_mode == "auto":
            self.reference_mode = "adapter" if hasattr(module, "disable_adapter") else "copy"
        if self.reference_mode == "adapter" and not hasattr(module, "disable_adapter"):
            raise ModalforgeError("objective.reference=adapter needs a PEFT adapter (adapter=lora|qlora|dora|ia3)")
        if self.reference_mode == "copy" and self.reference is None:
            self.reference = copy.deepcopy(module)  # the initial policy, before any step

    def frozen_modules(self) -> list[nn.Module]:
        return [self.reference] if self.reference is not None else []

    def block_classes(self) -> set[type[nn.Module]]:
        return block_classes_for(self.model_config)

    # ---- reference log-probs ------------------------------------------------------
    @torch.no_grad()
    def _reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.reference_mode == "copy":
            return sequence_logps(self.reference, batch)[0]
        if self.reference_mode == "adapter":
            with self.model.disable_adapter():
                return sequence_logps(self.model, batch)[0]
        split = "train" if self.model.training else "val"
        table = self._precomputed()[split].to(batch["index"].device)
        return torch.cat([table[batch["index"], 0], table[batch["index"], 1]])

    def _precomputed(self) -> dict[str, torch.Tensor]:
        """Reference log-probs of every train/val pair, computed once by the initial policy and cached."""
        if self._table is not None:
            return self._table
        dm = self.datamodule
        digest = hashlib.sha256(repr((self.model_config, [dm.train_set.items, dm.val_set.items])).encode())
        for name, param in self.model.named_parameters():  # which initial weights: a from-scratch model depends on the seed
            digest.update(name.encode())
            digest.update(param.detach().flatten()[:64].float().cpu().numpy().tobytes())
        path = cache_root(dm.cache_dir) / "dpo_reference" / f"{digest.hexdigest()[:20]}.pt"
        if path.exists():
            self._table = torch.load(path, map_location="cpu")
            return self._table
        was_training = self.model.training
        self.model.eval()
        table = {}
        device = next(self.model.parameters()).device
        for split, dataset in (("train", dm.train_set), ("val", dm.val_set)):
            rows = []
            for start in range(0, len(dataset), dm.batch_size):
                items = [dataset[i] for i in range(start, min(start + dm.batch_size, len(dataset)))]
                batch = {k: v.to(device) for k, v in dm._collate(items).items()}
                logps = sequence_logps(self.model, batch)[0].cpu()
                rows.append(torch.stack(logps.chunk(2), dim=1))
            table[split] = torch.cat(rows)
        self.model.train(was_training)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(table, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)
        self._table = table
        return table

    # ---- losses -------------------------------------------------------------------
    def _paired(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        logps, counts = sequence_logps(self.model, batch)
        pc, pr = logps.chunk(2)
        nc, nr = counts.chunk(2)
        name, beta = self.loss_name, self.beta
        if name in REFERENCE_FREE:
            if name == "simpo":
                per_example = losses.simpo(pc, pr, nc, nr, beta, self.gamma_beta_ratio)
            else:
                per_example, _ = losses.orpo(pc, pr, nc, nr, beta)
            reward_c, reward_r = beta * pc / nc, beta * pr / nr
        else:
            rc, rr = self._reference_logps(batch).chunk(2)
            if name == "sigmoid":
                per_example = losses.dpo_sigmoid(pc, pr, rc, rr, beta, self.label_smoothing)
            elif name == "robust":
                per_example = losses.dpo_robust(pc, pr, rc, rr, beta, self.label_smoothing)
            elif name == "ipo":
                per_example = losses.ipo(pc, pr, rc, rr, nc, nr, beta)
            else:
                per_example = losses.hinge(pc, pr, rc, rr, beta)
            reward_c, reward_r = beta * (pc - rc).detach(), beta * (pr - rr).detach()
        correct = (reward_c > reward_r).float()
        metrics = {"rewards/chosen": reward_c.mean(), "rewards/rejected": reward_r.mean(),
                   "rewards/margin": (reward_c - reward_r).mean(), "rewards/accuracy": correct.mean(),
                   "logps/chosen": pc.detach().mean(), "logps/rejected": pr.detach().mean()}
        return per_example.mean(), metrics, correct

    def _kto(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        logps, _ = sequence_logps(self.model, batch)
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
        loss, metrics, correct = self._kto(batch) if self.loss_name == "kto" else self._paired(batch)
        size = len(correct)
        return StepOutput(loss=loss, metrics=metrics, num_tokens=int(batch["attention_mask"].sum()),
                          batch_size=size), correct

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
