"""One rollout: the completions sampled for a batch of prompts and what a policy loss needs of them.

Kept in the objective's checkpointed buffer (``state()`` / ``Rollout(**state)``), so a resumed
run continues with the rollout's next minibatch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch


@dataclass
class Rollout:
    """One generation batch and what the loss needs of it (``N`` completions of ``T`` tokens at most)."""

    prompt_ids: torch.Tensor          # (N, P) left-padded
    prompt_mask: torch.Tensor         # (N, P)
    completion_ids: torch.Tensor      # (N, T)
    completion_mask: torch.Tensor     # (N, T) float: tokens that count in the loss
    attention_mask: torch.Tensor      # (N, T) long: tokens up to and including the stop token
    advantages: torch.Tensor          # (N,)
    old_logps: torch.Tensor | None    # (N, T), None when on-policy (one step per rollout)
    ref_logps: torch.Tensor | None    # (N, T), None when beta = 0
    num_items: float                  # completion tokens per optimiser step (dapo/cispo/vespo normaliser)
    values: torch.Tensor | None = None   # (N, T) value estimates at sampling time (a critic's)
    returns: torch.Tensor | None = None  # (N, T) the critic's targets (GAE returns)
    sampling_logps: torch.Tensor | None = None  # (N, T) log-probs of the engine that sampled (rollout_func)
    is_ratio: torch.Tensor | None = None  # (N, T) or (N, 1): its importance-sampling correction

    def select(self, index: torch.Tensor) -> "Rollout":
        return Rollout(**{f.name: (v[index] if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
                          for f in fields(self)})

    def to(self, device: torch.device) -> "Rollout":
        return Rollout(**{f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
                          for f in fields(self)})

    def state(self) -> dict[str, Any]:
        return {f.name: (v.detach().cpu() if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
                for f in fields(self)}

    @staticmethod
    def cat(parts: list["Rollout"], pad_id: int) -> "Rollout":
        """Rollouts sampled apart (grpo's refill draws) as one: prompts left-padded, completions right-padded, with
        masks (and log-probs) 0 in the padding, so the loss and the positions see what each part saw."""
        out: dict[str, Any] = {}
        for f in fields(Rollout):
            values = [getattr(p, f.name) for p in parts]
            if not isinstance(values[0], torch.Tensor):
                if any(isinstance(v, torch.Tensor) for v in values):
                    raise ValueError(f"Rollout.cat: {f.name} is set in some parts only")
                out[f.name] = values[0]
                continue
            if values[0].dim() == 1:
                out[f.name] = torch.cat(values)
                continue
            width = max(v.shape[1] for v in values)
            left, fill = f.name.startswith("prompt_"), pad_id if f.name.endswith("_ids") else 0
            out[f.name] = torch.cat([torch.nn.functional.pad(v, (width - v.shape[1], 0) if left else
                                                             (0, width - v.shape[1]), value=fill) for v in values])
        return Rollout(**out)

    def __len__(self) -> int:
        return self.completion_ids.shape[0]
