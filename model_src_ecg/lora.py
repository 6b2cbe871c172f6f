"""LoRA layers: a frozen base weight plus a trainable low-rank update B @ A, scaling 1.

The forward folds the update into the weight (W + B @ A) instead of running a separate low-rank
path x @ A^T @ B^T: the fold costs out*in*r multiply-adds once per call, while the low-rank path
costs tokens*r*(in+out) and an extra output-sized activation per call, and here tokens (B*96 in
the transformer, up to B*1536 in the encoder) far exceed out*in/(in+out). Measured on CPU
(`python benchmark.py model`, methods `lora_{fold,lowrank}_{linear,conv}_{train,nograd}`, base
width, batch 32) the fold is faster without autograd (the ZO passes, which see the whole batch)
and lighter everywhere; with backward it is faster for the convs, and for the linear layers about
10% slower (30-31 vs 27 ms) though still lighter (24-35 vs 44 MB).

Rank 0 means a plain layer: no adapter parameters, nothing frozen.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

LORA_A_STD = 0.02  # A ~ N(0, 0.02) for conv and linear adapters; B starts at 0


class LoRALayer:
    """Bookkeeping shared by the adapted layers: rank, the fold, and the one-time merge.

    Subclasses list it first among their bases (so its `effective_weight` wins) and provide
    `base_weight()` (the tensor the adapter updates) and `delta_weight()` (B @ A laid out like it).
    """

    def add_adapter(self, r, a_shape, b_shape, init_a):
        self.r = int(r)
        self.merged = False
        if self.r < 0:
            raise ValueError(f"LoRA rank must be >= 0, got {r}")
        if self.r > 0:
            self.lora_A = nn.Parameter(torch.empty(a_shape))
            self.lora_B = nn.Parameter(torch.zeros(b_shape))
            init_a(self.lora_A)
            self.base_weight().requires_grad_(False)

    def effective_weight(self):
        if self.r > 0 and not self.merged:
            return self.base_weight() + self.delta_weight()
        return self.base_weight()

    @torch.no_grad()
    def merge(self):
        """Fold B @ A into the weight once, then zero B.

        Zeroing B keeps the state_dict self-consistent: a merged state loaded into an unmerged
        model gives the same outputs, and a second merge adds nothing.
        """
        if self.r == 0 or self.merged:
            return
        self.base_weight().add_(self.delta_weight())
        self.lora_B.zero_()
        self.merged = True


def _init_normal(tensor):
    nn.init.normal_(tensor, std=LORA_A_STD)


def _init_kaiming(tensor):
    nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


class LoRAConv2d(LoRALayer, nn.Module):
    """Conv2d held as `.conv`; A (r, in*kh*kw), B (out, r), delta = (B @ A) viewed as (out, in, kh, kw)."""

    def __init__(self, in_channels, out_channels, kernel_size, r=0, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        kh, kw = self.conv.kernel_size
        self.add_adapter(r, (r, in_channels * kh * kw), (out_channels, r), _init_normal)

    def base_weight(self):
        return self.conv.weight

    def delta_weight(self):
        return (self.lora_B @ self.lora_A).view(self.conv.weight.shape)

    def forward(self, x):
        return self.conv._conv_forward(x, self.effective_weight(), self.conv.bias)


class LoRALinear(LoRALayer, nn.Linear):
    """nn.Linear (weight (out, in)) with A (r, in), B (out, r)."""

    def __init__(self, in_features, out_features, r=0):
        super().__init__(in_features, out_features)
        self.add_adapter(r, (r, in_features), (out_features, r), _init_normal)

    def base_weight(self):
        return self.weight

    def delta_weight(self):
        return self.lora_B @ self.lora_A

    def forward(self, x):
        return F.linear(x, self.effective_weight(), self.bias)


class InputMajorLinear(nn.Module):
    """x @ W + b with W stored (in, out), the layout of the published attention projections."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        nn.init.normal_(self.weight, std=0.02)

    def effective_weight(self):
        return self.weight

    def forward(self, x):
        flat = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.effective_weight())
        return flat.view(*x.shape[:-1], flat.shape[-1])


class LoRAQKV(LoRALayer, InputMajorLinear):
    """Fused q/k/v projection (W stored (width, 3*width)) with one adapter per block.

    lora_A (3r, width) and lora_B (3*width, r) stack the q, k, v adapters; block i's delta is
    B[i*width:(i+1)*width] @ A[i*r:(i+1)*r], and the stacked (3*width, width) delta is transposed
    into the stored input-major layout.
    """

    def __init__(self, width, r=0):
        super().__init__(width, 3 * width)
        self.width = width
        self.add_adapter(r, (3 * r, width), (3 * width, r), _init_kaiming)

    def base_weight(self):
        return self.weight

    def delta_weight(self):
        blocks = self.lora_B.view(3, self.width, self.r) @ self.lora_A.view(3, self.r, self.width)
        return blocks.reshape(3 * self.width, self.width).t()
