"""gradient_pruning: exact random masks, global magnitude cut, WANDA scores as per-parameter sparsities."""
import pytest
import torch
import torch.nn as nn

from gradient_pruning import drop_random_, magnitude_sparsities, random_mask, wanda_sparsities
from model_src_ecg import build_model


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.73, 1.0])
def test_random_mask_drops_an_exact_fraction_deterministically(sparsity):
    shape = (37, 11)
    mask = random_mask(shape, sparsity, torch.Generator().manual_seed(3))
    assert mask.shape == shape and mask.dtype == torch.bool
    assert int((~mask).sum()) == round(sparsity * 37 * 11)
    assert torch.equal(mask, random_mask(shape, sparsity, torch.Generator().manual_seed(3)))
    if 0 < sparsity < 1:
        assert not torch.equal(mask, random_mask(shape, sparsity, torch.Generator().manual_seed(4)))


def test_drop_random_zeroes_in_place_and_rejects_bad_fractions():
    t = torch.ones(100)
    assert drop_random_(t, 0.3, torch.Generator().manual_seed(0)) is t
    assert int((t == 0).sum()) == 30
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        drop_random_(t, 1.5, torch.Generator())


def test_magnitude_sparsities_follow_one_global_threshold():
    small = torch.full((10,), 0.1)
    large = torch.full((30,), 5.0)
    mixed = torch.tensor([0.05, 10.0] * 5)
    fractions = magnitude_sparsities([("small", small), ("large", large), ("mixed", mixed)], 0.3)
    # 50 entries, 15 cut: the 5 smallest of `mixed` (0.05) and all 10 of `small` (0.1).
    assert fractions == {"small": 1.0, "large": 0.0, "mixed": 0.5}


def test_wanda_weighs_magnitudes_by_input_norms():
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 1.0]]))
    model = nn.Sequential(layer)
    x = torch.tensor([[10.0, 0.1]] * 4)  # feature 1 is nearly silent: its weight scores lowest
    fractions = wanda_sparsities(model, x, 0.5)
    assert fractions == {"0.weight": 0.5}
    assert model.training  # mode restored


def test_wanda_covers_every_linear_layer_and_its_adapters():
    torch.manual_seed(0)
    model = build_model("tinylight", 4, r=2)
    fractions = wanda_sparsities(model, torch.randn(2, 12, 1, 1024), 0.4)
    names = dict(model.named_parameters())
    assert "transformer_layers.0.self_attention.c_attn.weight" in fractions
    assert fractions["transformer_layers.0.fc1.lora_A"] == fractions["transformer_layers.0.fc1.weight"]
    assert all(name in names for name in fractions)
    linear_weights = [n for n in fractions if n.endswith(".weight")]
    total = sum(names[n].numel() for n in linear_weights)
    cut = sum(fractions[n] * names[n].numel() for n in linear_weights)
    assert cut == pytest.approx(0.4 * total, abs=1)
