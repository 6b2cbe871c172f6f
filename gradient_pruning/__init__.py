"""Sparse ZO perturbations: which entries of z to zero, as exact fractions per parameter.

`gradient_sparsity` (a float, or {parameter name: fraction}) tells the trainer what fraction of
each ZO tensor's perturbation to zero; these helpers draw the masks and derive per-parameter
fractions from weight magnitudes or from WANDA scores.
"""
from .masks import drop_random_, magnitude_sparsities, random_mask
from .wanda import wanda_sparsities

__all__ = ["drop_random_", "random_mask", "magnitude_sparsities", "wanda_sparsities"]
