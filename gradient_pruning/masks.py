"""Exact random masks and a global magnitude threshold turned into per-parameter sparsities."""
import torch


def _dropped_count(numel, sparsity):
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}")
    return int(round(sparsity * numel))


def drop_random_(tensor, sparsity, generator):
    """Zero exactly round(sparsity * numel) entries of `tensor` in place, chosen uniformly at random.

    One randperm from `generator` (on the tensor's device) picks them, so the same generator state
    gives the same mask; returns `tensor`.
    """
    flat = tensor.view(-1)
    dropped = _dropped_count(flat.numel(), sparsity)
    if dropped:
        flat[torch.randperm(flat.numel(), generator=generator, device=flat.device)[:dropped]] = 0
    return tensor


def random_mask(shape, sparsity, generator, device=None):
    """Boolean mask of `shape`, False at exactly round(sparsity * numel) uniformly chosen entries."""
    mask = torch.ones(shape, dtype=torch.bool, device=device)
    return drop_random_(mask, sparsity, generator)


@torch.no_grad()
def magnitude_sparsities(named_parameters, sparsity):
    """One global |w| threshold over all given tensors, as the fraction of each tensor below it.

    The `sparsity` fraction of all entries with the smallest magnitudes (ties broken by order)
    is the global cut; each parameter gets the fraction of its own entries that fall in it.
    """
    named = [(n, p.detach().reshape(-1)) for n, p in named_parameters]
    if not named:
        return {}
    magnitudes = torch.cat([p.abs().float().cpu() for _, p in named])
    dropped = _dropped_count(magnitudes.numel(), sparsity)
    in_cut = torch.zeros(magnitudes.numel(), dtype=torch.bool)
    in_cut[torch.argsort(magnitudes, stable=True)[:dropped]] = True
    fractions, start = {}, 0
    for name, p in named:
        fractions[name] = float(in_cut[start:start + p.numel()].float().mean())
        start += p.numel()
    return fractions
