"""Batch augmentation (CutMix over leads x time) and lead masking for reduced-lead students."""
import math

import torch

from helper_code import LEADS

CUTMIX_ALPHA = 0.75  # lambda ~ Beta(alpha, alpha)
KEPT_LEADS = {12: LEADS, 3: ("II", "V1", "V5"), 1: ("I",)}


def cutmix(x, y, rng):
    """Paste a random (lead window x time window) of a shuffled partner into each record.

    x (B, leads, 1, samples), y (B, C); rng a numpy Generator, the only source of randomness.
    Both window sides are sqrt(1 - lambda) of the full side, lambda ~ Beta(0.75, 0.75); labels
    are mixed by the exact pasted fraction of the leads x samples area. Inputs are not modified.
    """
    batch, leads, _, samples = x.shape
    lam = rng.beta(CUTMIX_ALPHA, CUTMIX_ALPHA)
    partner = torch.from_numpy(rng.permutation(batch)).to(x.device)
    side = math.sqrt(1.0 - lam)
    cut_leads, cut_samples = int(leads * side), int(samples * side)
    lead0 = int(rng.integers(0, leads - cut_leads + 1))
    start = int(rng.integers(0, samples - cut_samples + 1))
    window = (slice(None), slice(lead0, lead0 + cut_leads), slice(None), slice(start, start + cut_samples))
    mixed = x.clone()
    mixed[window] = x[partner][window]
    pasted = cut_leads * cut_samples / (leads * samples)
    return mixed, (1.0 - pasted) * y + pasted * y[partner]


def mask_leads(x, n_leads):
    """Zero every lead but the kept ones (1: I; 3: II, V1, V5; 12: all) of x (B, 12, 1, samples)."""
    if n_leads not in KEPT_LEADS:
        raise ValueError(f"n_leads must be one of {sorted(KEPT_LEADS)}, got {n_leads}")
    if x.shape[1] != len(LEADS):
        raise ValueError(f"lead masking expects {len(LEADS)} leads in dim 1, got shape {tuple(x.shape)}")
    keep = torch.tensor([name in KEPT_LEADS[n_leads] for name in LEADS], dtype=x.dtype, device=x.device)
    return x * keep.view(1, -1, 1, 1)
