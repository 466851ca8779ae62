"""The small hand-computed case the DPO loss tests share: two pairs of summed log-probs.

policy (p) and reference (r) log-probs of chosen (c) and rejected (r), and token counts (n).
"""

from __future__ import annotations

import math

import torch

pc, pr = torch.tensor([-4.0, -6.0]), torch.tensor([-5.0, -5.5])
rc, rr = torch.tensor([-4.5, -6.2]), torch.tensor([-4.8, -5.0])
nc, nr = torch.tensor([2.0, 3.0]), torch.tensor([4.0, 1.0])
B = 0.5


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))
