"""WANDA-style scores (|W| times the norm of each input feature) turned into per-parameter sparsities.

Forward hooks on the linear layers collect the L2 norm of every input feature over a calibration
batch; score_ij = |W_ij| * ||x_j||. A global cut over all scores gives each weight its fraction,
and a LoRA layer's adapters inherit their weight's fraction, so the result can be passed as
`gradient_sparsity` whether the ZO set holds the weights themselves or their adapters.
"""
import torch
import torch.nn as nn

from model_src_ecg.lora import InputMajorLinear

from .masks import magnitude_sparsities


def _input_major(module):
    return isinstance(module, InputMajorLinear)


@torch.no_grad()
def wanda_sparsities(model, inputs, sparsity):
    """{parameter name: fraction} for the weights (and their adapters) of every linear layer."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, InputMajorLinear))}
    squared_norms = {}

    def collect(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            squared_norms[name] = squared_norms.get(name, 0) + (x * x).sum(dim=0)
        return hook

    handles = [m.register_forward_pre_hook(collect(name)) for name, m in layers.items()]
    was_training = model.training
    try:
        model.eval()
        model(inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    scores = []
    for name, m in layers.items():
        norms = squared_norms[name].sqrt()
        weight = m.weight.detach().float()
        scores.append((name, weight.abs() * (norms[:, None] if _input_major(m) else norms[None, :])))
    fractions = magnitude_sparsities([(f"{n}.weight" if n else "weight", s) for n, s in scores], sparsity)
    for name, m in layers.items():
        for adapter in ("lora_A", "lora_B"):
            if hasattr(m, adapter):
                fractions[f"{name}.{adapter}"] = fractions[f"{name}.weight"]
    return fractions
