"""Dropout with a cheaper mask on the CPU, shared by both architectures."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Dropout(nn.Dropout):
    """nn.Dropout with a cheaper mask on the CPU; GPUs keep PyTorch's fused kernel.

    On the CPU, nn.Dropout's bernoulli_ costs ~9 ns an element: the slowest elementwise work of a step (11% of
    it). Here each element takes 32 bits of int64 words drawn from the same generator, two elements a word
    (~3 ns), and is kept when they lie at or above p·2³², so with probability 1 − p to within 2⁻³³; what is
    kept is scaled by 1 / (1 − p), as before.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        words = torch.empty((x.numel() + 1) // 2, dtype=torch.int64).random_(-(2**63), None)  # all 64 bits
        bits = words.view(torch.int32)[: x.numel()].view(x.shape)  # uniform over [-2³¹, 2³¹)
        keep = bits >= round(self.p * 2**32) - 2**31
        return x * keep.to(x.dtype).mul_(1 / (1 - self.p))
