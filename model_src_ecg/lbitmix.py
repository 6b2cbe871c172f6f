"""L-BiTMix: a lightweight, bidirectional, channel-mixing temporal convolutional backbone.

Design (temporal convolutions only, no attention):
- Stem, down-sampling 32x with two strided convs over all channels: a 1x15 conv with stride 8 over
  the leads -> BatchNorm -> leaky_relu, then a 1x5 conv with stride 4 to the trunk width ->
  BatchNorm -> leaky_relu. 6144 samples at 500 Hz become 192 steps of 64 ms. The second conv mixes
  channels at the 16 ms rate, where P waves and QRS complexes still have their shape.
- Mix blocks at that rate, residual: x + BN(project(leaky_relu(expand(BN(depthwise(x)))))).
  Temporal mixing is per channel (a depthwise 1x7 conv, dilated); channel mixing is pointwise
  (expand: width -> expansion*width, project: back), so each block mixes time, then channels.
- Bidirectional: every conv is non-causal with symmetric ("same") zero padding, so each output
  step sees as much of the future as of the past.
- Dilations grow block by block; the receptive field of one trunk output step is
  `receptive_field(cfg)` input samples, each layer adding (kernel-1)*dilation*(input samples per
  step at its rate):
      1 + (15-1) + (5-1)*8 + sum_i (7-1)*dilation_i*32
  lbitmix-tiny (dilations 1, 2, 4, 8): 2,927 samples = 5.9 s at 500 Hz, several beats, so a block
  can compare neighbouring RR intervals; lbitmix (dilations 1, 2, 4, 8 twice): 5,807 samples = 11.6 s.
- Features: mean and max over time, concatenated (2*width): the mean of a beat detector counts
  beats (the rate), the max finds the most abnormal beat.
- The two heads, the gating and the merge are those of every family (`TwoHeadNet`).

The stem's second conv was first a depthwise 1x9 conv followed by a pointwise one, at the same
latency; the full conv distilled into better students in 8 of 9 paired runs (docs/lbitmix.md has them).

LoRA adapts every layer that mixes channels: both stem convs, each block's expand and project, and
the heads' first layers (classifier.0, auxiliary_classifier.0). Depthwise convs stay plain: their
weights are few and per channel, and only their biases train under the LoRA rule. rank_list holds
one rank per counted layer, in forward order: stem.conv, stem.down, then expand and project of each
block, then classifier.0 and classifier.1 (never adapted, its entry is ignored;
auxiliary_classifier.0 takes classifier.0's rank).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .heads import TwoHeadNet, ranks_per_layer
from .lora import LoRAConv2d

STEM_ADAPTED = 2            # stem.conv, stem.down
ADAPTED_PER_BLOCK = 2       # expand, project
CLASSIFIER_LAYERS = 2       # classifier.0 (adapted), classifier.1 (never)


@dataclass(frozen=True)
class LBiTMixConfig:
    stem_channels: int
    width: int
    dilations: tuple
    expansion: int = 2
    kernel: int = 7
    stem_kernel: int = 15
    stem_stride: int = 8
    down_kernel: int = 5
    down_stride: int = 4

    @property
    def downsample(self):
        """Input samples per trunk step."""
        return self.stem_stride * self.down_stride

    @property
    def num_layers(self):
        """Entries of a rank list: the adapted layers plus the task layer."""
        return STEM_ADAPTED + ADAPTED_PER_BLOCK * len(self.dilations) + CLASSIFIER_LAYERS


LBITMIX_CONFIGS = {
    "lbitmix-tiny": LBiTMixConfig(stem_channels=48, width=96, dilations=(1, 2, 4, 8)),
    "lbitmix": LBiTMixConfig(stem_channels=64, width=256, dilations=(1, 2, 4, 8) * 2, expansion=4),
}


def receptive_field(cfg):
    """Input samples that one trunk output step depends on (each layer adds (kernel-1)*dilation*jump)."""
    return (1 + (cfg.stem_kernel - 1) + (cfg.down_kernel - 1) * cfg.stem_stride
            + sum((cfg.kernel - 1) * d * cfg.downsample for d in cfg.dilations))


class Depthwise(nn.Conv2d):
    """Per-channel temporal conv, non-causal: symmetric zero padding, so each output is centred.

    The padding is applied explicitly: oneDNN's depthwise kernel runs about 2x slower at batch 1
    when asked to pad by more than the kernel (the dilated blocks), and a pad is cheaper.
    """

    def __init__(self, channels, kernel, dilation):
        super().__init__(channels, channels, (1, kernel), dilation=(1, dilation), groups=channels)
        self.side = dilation * (kernel // 2)

    def forward(self, x):
        return self._conv_forward(F.pad(x, (self.side, self.side)), self.weight, self.bias)


class Stem(nn.Module):
    """Down-sampling by stem_stride * down_stride: two strided convs over all channels."""

    def __init__(self, inputchannel, cfg, ranks):
        super().__init__()
        self.conv = LoRAConv2d(inputchannel, cfg.stem_channels, (1, cfg.stem_kernel), r=ranks[0],
                               stride=(1, cfg.stem_stride), padding=(0, cfg.stem_kernel // 2))
        self.bn1 = nn.BatchNorm2d(cfg.stem_channels)
        self.down = LoRAConv2d(cfg.stem_channels, cfg.width, (1, cfg.down_kernel), r=ranks[1],
                               stride=(1, cfg.down_stride), padding=(0, cfg.down_kernel // 2))
        self.bn2 = nn.BatchNorm2d(cfg.width)

    def forward(self, x):
        return F.leaky_relu(self.bn2(self.down(F.leaky_relu(self.bn1(self.conv(x))))))


class MixBlock(nn.Module):
    """x + BN(project(leaky_relu(expand(BN(depthwise_dilated(x)))))): time per channel, then channels."""

    def __init__(self, cfg, dilation, ranks):
        super().__init__()
        hidden = cfg.expansion * cfg.width
        self.depthwise = Depthwise(cfg.width, cfg.kernel, dilation=dilation)
        self.bn1 = nn.BatchNorm2d(cfg.width)
        self.expand = LoRAConv2d(cfg.width, hidden, (1, 1), r=ranks[0])
        self.project = LoRAConv2d(hidden, cfg.width, (1, 1), r=ranks[1])
        self.bn2 = nn.BatchNorm2d(cfg.width)

    def forward(self, x):
        y = F.leaky_relu(self.expand(self.bn1(self.depthwise(x))))
        return x + self.bn2(self.project(y))


class LBiTMix(TwoHeadNet):
    """Stem -> mix blocks -> [mean, max] over time -> the two heads. Input (B, inputchannel, 1, samples)."""

    def __init__(self, nOUT, cfg, inputchannel, rank_list, positive_probably=0.1):
        super().__init__()
        if len(rank_list) != cfg.num_layers:
            raise ValueError(f"rank_list has {len(rank_list)} entries, expected one per layer ({cfg.num_layers})")
        if not all(k % 2 for k in (cfg.kernel, cfg.stem_kernel, cfg.down_kernel)):
            raise ValueError(f"kernels must be odd so the padding is symmetric, got {cfg}")
        if cfg.stem_kernel < cfg.stem_stride or cfg.down_kernel < cfg.down_stride:
            raise ValueError(f"a stem kernel shorter than its stride skips samples, got {cfg}")
        ranks = [int(r) for r in rank_list]
        self.inputchannel = inputchannel
        self.downsample = cfg.downsample
        self.stem = Stem(inputchannel, cfg, ranks[:STEM_ADAPTED])
        block_ranks = ranks[STEM_ADAPTED:-CLASSIFIER_LAYERS]
        self.blocks = nn.ModuleList(
            MixBlock(cfg, d, block_ranks[ADAPTED_PER_BLOCK * i:ADAPTED_PER_BLOCK * (i + 1)])
            for i, d in enumerate(cfg.dilations))
        self.add_heads(2 * cfg.width, nOUT, ranks[-CLASSIFIER_LAYERS], positive_probably)

    def feature_map(self, x):
        """(B, inputchannel, 1, samples) -> (B, width, 1, ceil(samples / downsample)): the trunk before pooling."""
        self.check_input(x)
        if x.shape[-1] < self.downsample:
            raise ValueError(f"samples per lead must be at least {self.downsample}, got {x.shape[-1]}")
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x

    def feature_extraction(self, x):
        """(B, inputchannel, 1, samples) -> (B, 2*width): mean and max of the trunk over time."""
        steps = self.feature_map(x).flatten(1, 2)
        return torch.cat([steps.mean(dim=-1), steps.amax(dim=-1)], dim=1)


def build_lbitmix(config, num_class, r=0, positive_probably=0.1, inputchannel=12):
    """LBiTMix of a named config; r is one rank for every layer or a list of cfg.num_layers ranks."""
    cfg = LBITMIX_CONFIGS[config]
    return LBiTMix(num_class, cfg, inputchannel, ranks_per_layer(r, cfg.num_layers), positive_probably)
