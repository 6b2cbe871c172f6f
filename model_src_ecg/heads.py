"""What every backbone family shares: the two heads, the gating between them, and the LoRA merge.

A family subclasses `TwoHeadNet`, builds its trunk, calls `add_heads`, and implements
`feature_extraction` (input (B, inputchannel, 1, samples) -> (B, features)). The training steps
rely only on what is here: the heads are the top-level children named in HEAD_NAMES, everything
else is the trunk.
"""
import math

import torch
import torch.nn as nn

from .lora import LoRALayer, LoRALinear

HEAD_NAMES = ("classifier", "auxiliary_classifier")


def ranks_per_layer(r, num_layers):
    """One LoRA rank per counted layer: `r` repeated, or `r` itself when it is already a list."""
    return [r] * num_layers if isinstance(r, int) else list(r)


def draw_heads(net, seed):
    """Draw the heads' layers afresh from a generator of their own, seeded by `seed`, by nn.Linear's
    own rule (adapters keep theirs). Every method then starts from the same heads, whatever it drew
    before them (a LoRA model draws its trunk's adapters first); a backbone file then overwrites
    the layer it holds (classifier.0)."""
    generator = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name in HEAD_NAMES:
            for layer in getattr(net, name).modules():
                if isinstance(layer, nn.Linear):
                    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
                    bound = 1 / math.sqrt(layer.in_features)
                    nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


def heads_state(net):
    """The heads' weights as a model without adapters holds them (adapters left out: B is zero at
    the start, so they change nothing there)."""
    return {k: v for k, v in net.state_dict().items() if belongs_to_heads(k) and "lora_" not in k}


def belongs_to_heads(name):
    """True for the name of a parameter, buffer or module inside one of the two heads (top-level children)."""
    return name.partition(".")[0] in HEAD_NAMES


class TwoHeadNet(nn.Module):
    """A trunk with a main head and a gating auxiliary head ("any label present").

    classifier: LoRA linear features -> features, then linear features -> nOUT, no activation
    between (the second layer is task-specific and never adapted). auxiliary_classifier: LoRA
    linear features -> features/2, LeakyReLU, linear features/2 -> 1.
    """

    def add_heads(self, features, nOUT, rank, positive_probably):
        self.classifier = nn.Sequential(LoRALinear(features, features, r=rank), nn.Linear(features, nOUT))
        self.auxiliary_classifier = nn.Sequential(LoRALinear(features, features // 2, r=rank), nn.LeakyReLU(),
                                                  nn.Linear(features // 2, 1))
        self.positive_probably = positive_probably

    def check_input(self, x):
        if x.dim() != 4 or x.shape[1] != self.inputchannel or x.shape[2] != 1:
            raise ValueError(f"expected input (batch, {self.inputchannel}, 1, samples), got {tuple(x.shape)}")

    def feature_extraction(self, x):
        raise NotImplementedError(f"{type(self).__name__} must define feature_extraction")

    def forward(self, x):
        return self.heads(self.feature_extraction(x))

    def heads(self, features):
        """(aux, main) from features; split from forward so a step can train the heads on frozen features."""
        aux = self.auxiliary_classifier(features)
        main = self.classifier(features)
        # Same values; gradient reaches the main head only through rows the aux head calls abnormal.
        gate = (torch.sigmoid(aux) > self.positive_probably).to(main.dtype)
        main = gate * main + (1 - gate) * main.detach()
        return aux, main

    def lora_layers(self):
        return [m for m in self.modules() if isinstance(m, LoRALayer) and m.r > 0]

    @property
    def merged(self):
        return any(layer.merged for layer in self.lora_layers())

    def merge_net(self):
        """Fold every adapter into its weight (once; calling again changes nothing)."""
        for layer in self.lora_layers():
            layer.merge()
