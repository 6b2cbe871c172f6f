"""The zeroth-order (ZO) estimates of the trunk's gradient: MeZO's two-point estimate, HiZOO's, Sparse
MeZO's and FZOO's, one class each behind one interface, named in ESTIMATORS.

An estimate is built once per run on the model, the step settings (a Half_Trainer.StepConfig), the
generator the step seeds come from and the loss of a batch, and holds everything it needs:

    gradient(inputs, labels, current, train_heads, use_sign) -> Estimate   the forward passes of one step
    state_dict() / load_state_dict(state)     what it keeps between steps (HiZOO's Hessian diagonal,
                                              Sparse MeZO's mask), for a resumed run
    reads, check(cfg)                         the StepConfig fields it reads (beyond its method's),
                                              and a refusal of settings it cannot take

The ZO set (the trunk's trainable parameters, zo_parameters) is handled as one flat buffer: z is
drawn once per direction into it from a generator seeded per direction from the step seeds (never
the global RNG), the parameters are perturbed with `torch._foreach_*` ops, and a flat copy taken
before the passes restores them bit-exactly afterwards. Every buffer (z, the copy, and what an
estimate keeps: HiZOO's Hessian diagonal, Sparse MeZO's mask, a sum of directions) is allocated
once and reused, so a step allocates nothing per parameter.
"""
import contextlib
import statistics
from typing import NamedTuple

import torch
import torch.nn as nn

from gradient_pruning import drop_random_
from model_src_ecg import belongs_to_heads

NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)
# HiZOO probes coordinate i at ε / sqrt(max(|D_i|, floor)): at most 10x MeZO's radius where the
# curvature estimate D_i has drifted towards zero, so the finite differences stay local
HESSIAN_FLOOR = 1e-2


def zo_parameters(model):
    """The ZO set: trainable parameters of the trunk, in a fixed (named) order.

    The rule, for any backbone family: the heads are the top-level children named `classifier`
    and `auxiliary_classifier` (model_src_ecg.HEAD_NAMES); they are FO-only, everything else
    trainable is in the ZO set.
    """
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and not belongs_to_heads(n)]


@contextlib.contextmanager
def module_modes(model, phase):
    """Set the modules' modes for `phase` ("zo" or "fo"), then restore every module's own mode.

    zo: every normalisation layer of the trunk (any module outside the heads, see zo_parameters)
    in train mode, since it normalises by the batch; everything else, the heads included, in eval
    mode. fo: train mode with BatchNorm in eval mode.
    """
    saved = [(m, m.training) for m in model.modules()]
    if phase == "zo":
        model.eval()
        for name, m in model.named_modules():
            if isinstance(m, NORM_LAYERS) and not belongs_to_heads(name):
                m.train()
    else:
        model.train()
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.eval()
    try:
        yield
    finally:
        for m, training in saved:
            m.training = training


class Estimate(NamedTuple):
    """One step's estimate: g_zo per ZO tensor (views of a buffer the next estimate overwrites), the
    loss (L(θ) where the estimate evaluates it, else the mean of L±), the seed of its (last)
    direction, and the projected gradient (L+ − L−)/(2ε) of a two-point estimate (averaged over q)
    or the spread of FZOO's losses."""
    grads: list
    loss: float
    seed: int
    projected: float | None = None
    spread: float | None = None


class Estimator:
    """What every estimate shares: the ZO set's flat buffers, the drawing of z, and no state of its
    own to carry (`kept` names the buffers that a subclass carries in its state_dict)."""
    reads = ("zo_eps", "gradient_sparsity")
    kept = ()

    def __init__(self, model, cfg, seeds, loss):
        named = zo_parameters(model)
        if not named:
            raise ValueError("no trainable parameter outside the heads: nothing for the ZO estimate")
        self.model, self.cfg, self.seeds, self.loss = model, cfg, seeds, loss
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        device, dtype = self.params[0].device, self.params[0].dtype
        self._sizes = [p.numel() for p in self.params]
        self.z_flat = torch.empty(sum(self._sizes), device=device, dtype=dtype)
        self.backup_flat = torch.empty_like(self.z_flat)
        self.z, self.backup = self._views(self.z_flat), self._views(self.backup_flat)
        self.z_generator = torch.Generator(device=device)
        self.sparsity = self._sparsities()
        self.seed = None

    @classmethod
    def check(cls, cfg):
        """Raise ValueError where the estimate cannot take cfg's settings."""

    def state_dict(self):
        return {name: getattr(self, name).clone() for name in self.kept}

    def load_state_dict(self, state):
        for name in self.kept:
            getattr(self, name).copy_(state[name])

    def _views(self, flat):
        """`flat` split into one view per ZO tensor, shaped like it."""
        return [v.view_as(p) for v, p in zip(flat.split(self._sizes), self.params)]

    def _sparsities(self):
        """Fraction of z zeroed per ZO tensor, from cfg.gradient_sparsity (None: dense z)."""
        sparsity = self.cfg.gradient_sparsity
        if sparsity is None:
            return None
        if not isinstance(sparsity, dict):
            return [float(sparsity)] * len(self.names)
        return [float(sparsity.get(name, 0.0)) for name in self.names]

    def _new_seed(self):
        self.seed = int(torch.randint(0, 2**62, (1,), generator=self.seeds))
        self.z_generator.manual_seed(self.seed)

    def _fill_z(self, rademacher):
        """Draw z from the z generator, with the random sparsity (gradient_sparsity) applied once so
        that every use agrees."""
        self.z_flat.normal_(generator=self.z_generator)
        if rademacher:
            self.z_flat.sign_()
        if self.sparsity is not None:
            for z, sparsity in zip(self.z, self.sparsity):
                drop_random_(z, sparsity, self.z_generator)


class TwoPoint(Estimator):
    """MeZO's two-point estimate, g = (L(θ + εz) − L(θ − εz)) / (2ε) · z (ZO-sign, use_sign: the
    difference's sign times z), averaged over q directions."""
    reads = (*Estimator.reads, "q", "perturbation_mode")

    def __init__(self, model, cfg, seeds, loss):
        super().__init__(model, cfg, seeds, loss)
        summing = int(cfg.q) > 1
        self.sum_flat = torch.zeros_like(self.z_flat) if summing else None
        self.sum = self._views(self.sum_flat) if summing else None

    def _draw_z(self):
        """Fill z for this direction from a fresh seed."""
        self._new_seed()
        self._fill_z(rademacher=self.cfg.perturbation_mode == "rademacher")

    @torch.no_grad()
    def _two_point(self, inputs, labels, heads_backward=False):
        """L(θ+εz) and L(θ−εz) for a fresh z, as 0-dim tensors; the ZO set is restored bit-exactly.
        heads_backward: the second pass also gives the heads their gradient (HalfTrainer.loss)."""
        eps = self.cfg.zo_eps
        self._draw_z()
        torch._foreach_copy_(self.backup, self.params)
        with module_modes(self.model, "zo"):
            torch._foreach_add_(self.params, self.z, alpha=eps)
            loss_plus = self.loss(inputs, labels)
            torch._foreach_add_(self.params, self.z, alpha=-2 * eps)
            loss_minus = self.loss(inputs, labels, heads_backward=heads_backward)
        torch._foreach_copy_(self.params, self.backup)
        return loss_plus, loss_minus

    def _start(self, inputs, labels, current, train_heads):
        """What the estimate does before its directions at iteration `current`; returns L(θ) where
        it evaluates it (with train_heads, the heads then learn in that pass), else None."""
        return None

    def _observe(self, loss_plus, loss_minus, loss_at_theta):
        """What the estimate learns from one direction's losses besides g."""

    @torch.no_grad()
    def gradient(self, inputs, labels, current=0, train_heads=False, use_sign=False):
        """g_zo for the ZO set and the loss. With train_heads, one of the passes (L(θ) where the
        estimate evaluates it, else the first L(θ−εz)) also accumulates the heads' gradient of the
        whole batch's loss on its features. The ZO set is left bit-identical."""
        loss_at_theta = self._start(inputs, labels, current, train_heads)
        heads_backward = train_heads and loss_at_theta is None
        q = int(self.cfg.q)
        if q > 1:
            self.sum_flat.zero_()
        projections, losses = [], []
        for _ in range(q):
            loss_plus, loss_minus = self._two_point(inputs, labels, heads_backward=heads_backward)
            heads_backward = False
            projected = float((loss_plus - loss_minus) / (2 * self.cfg.zo_eps))
            self._observe(loss_plus, loss_minus, loss_at_theta)
            scale = float((projected > 0) - (projected < 0)) if use_sign else projected
            projections.append(projected)
            losses.append(float(loss_plus + loss_minus) / 2)
            if q > 1:
                self.sum_flat.add_(self.z_flat, alpha=scale / q)
            else:
                self.z_flat.mul_(scale)
        loss = sum(losses) / q if loss_at_theta is None else loss_at_theta
        return Estimate(self.z if q == 1 else self.sum, loss, self.seed, projected=sum(projections) / q)


class HiZOO(TwoPoint):
    """HiZOO's estimate (the method and its assumptions: Half_Trainer.hizoo_step): z = P^(-1/2) u,
    P = max(|D|, HESSIAN_FLOOR), with D a moving average of diag(H) learnt from L(θ), one more
    forward per step."""
    reads = (*TwoPoint.reads, "hizoo_smoothing")
    kept = ("hessian",)

    def __init__(self, model, cfg, seeds, loss):
        super().__init__(model, cfg, seeds, loss)
        self.hessian = torch.ones_like(self.z_flat)   # D, the diagonal of the Hessian: from the identity

    @classmethod
    def check(cls, cfg):
        if cfg.perturbation_mode != "gaussian" or cfg.gradient_sparsity is not None:
            raise ValueError("HiZOO's curvature estimate needs dense Gaussian directions (u_i^2 - 1 is 0 for a "
                             "Rademacher u, and -1 where z is dropped): use perturbation_mode gaussian and no "
                             "gradient_sparsity")

    def _draw_z(self):
        """z is u ~ N(0, I) scaled by P^(-1/2)."""
        super()._draw_z()
        scale = torch.abs(self.hessian, out=self.backup_flat)   # the copy of the ZO set is taken after this
        self.z_flat.mul_(scale.clamp_min_(HESSIAN_FLOOR).rsqrt_())

    def _start(self, inputs, labels, current, train_heads):
        with module_modes(self.model, "zo"):
            return float(self.loss(inputs, labels, heads_backward=train_heads))

    def _observe(self, loss_plus, loss_minus, loss_at_theta):
        self._update_hessian(float(loss_plus) + float(loss_minus) - 2 * loss_at_theta)

    @torch.no_grad()
    def _update_hessian(self, second_difference):
        """The moving average of diag(H) from the direction in z and L+ + L− − 2 L(θ):
        D ← (1 − α) D + α · ĥ,  ĥ = (L+ + L− − 2L) / (2ε²) · P ⊙ (u ⊙ u − 1),  u = P^(1/2) z,
        computed in place, with the copy of the ZO set (restored already) as scratch."""
        alpha = self.cfg.hizoo_smoothing
        weight = alpha * second_difference / (2 * self.cfg.zo_eps ** 2)
        curvature = torch.abs(self.hessian, out=self.backup_flat).clamp_min_(HESSIAN_FLOOR)   # P
        self.hessian.mul_(1 - alpha).sub_(curvature, alpha=weight)                # − α c P
        root_u = curvature.mul_(self.z_flat)                                      # P z = P^(1/2) u
        self.hessian.addcmul_(root_u, root_u, value=weight)                       # + α c P u²


class SparseMeZO(TwoPoint):
    """Sparse MeZO's estimate (the method and its assumptions: Half_Trainer.sparse_mezo_step): z
    masked to the small weights of each ZO tensor, the mask (one flat bool buffer, True where a
    weight is left out) recomputed every sparse_mezo_interval steps."""
    reads = (*TwoPoint.reads, "sparse_mezo_sparsity", "sparse_mezo_interval")
    kept = ("frozen",)

    def __init__(self, model, cfg, seeds, loss):
        super().__init__(model, cfg, seeds, loss)
        self.frozen = torch.zeros(self.z_flat.numel(), device=self.z_flat.device, dtype=torch.bool)
        self._frozen_views = self._views(self.frozen)
        self._cuts = torch.empty(len(self.params), device=self.z_flat.device, dtype=self.z_flat.dtype)
        self._cut_at = torch.empty(len(self.params), device=self.z_flat.device, dtype=torch.long)
        self._perturbed = [n - int(round(cfg.sparse_mezo_sparsity * n)) for n in self._sizes]
        self._mask_ready = False

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self._mask_ready = True

    def _fill_z(self, rademacher):
        """z with the magnitude mask applied once, so that every use agrees."""
        super()._fill_z(rademacher)
        self.z_flat.masked_fill_(self.frozen, 0)

    def _start(self, inputs, labels, current, train_heads):
        if not self._mask_ready or current % self.cfg.sparse_mezo_interval == 0:
            self._refresh_mask()
        return None

    @torch.no_grad()
    def _refresh_mask(self):
        """The mask from the current weights: in each ZO tensor, the weights whose |w| is above its
        k-th smallest (k = numel − round(sparsity · numel)) are left out of z; ties at the cut are
        kept in, so a tensor of equal weights (a LoRA B at zero) is perturbed whole."""
        torch._foreach_copy_(self.z, self.params)  # |w| in z's buffer: z is drawn after this
        self.z_flat.abs_()
        for i, (magnitude, frozen, kept) in enumerate(zip(self.z, self._frozen_views, self._perturbed)):
            if kept == 0:
                frozen.fill_(True)
                continue
            torch.kthvalue(magnitude.view(-1), kept, out=(self._cuts[i], self._cut_at[i]))
            torch.gt(magnitude, self._cuts[i], out=frozen)
        self._mask_ready = True

    @torch.no_grad()
    def restore_frozen(self):
        """Put the weights outside the mask back from the copy taken before the passes."""
        for p, frozen, before in zip(self.params, self._frozen_views, self.backup):
            torch.where(frozen, before, p, out=p)


class FZOO(Estimator):
    """FZOO's estimate (the method and its assumptions: Half_Trainer.fzoo_step):
    ĝ = (1/N) Σ_i (L(θ + ε u_i) − L(θ)) / ε · u_i over N Rademacher u_i, drawn in turn from one seed,
    and the spread (standard deviation) of the N losses. perturbation_mode and q are not read."""
    reads = (*Estimator.reads, "fzoo_directions")

    def __init__(self, model, cfg, seeds, loss):
        super().__init__(model, cfg, seeds, loss)
        self.sum_flat = torch.zeros_like(self.z_flat)
        self.sum = self._views(self.sum_flat)

    @torch.no_grad()
    def gradient(self, inputs, labels, current=0, train_heads=False, use_sign=False):
        """ĝ and L(θ); with train_heads, the L(θ) pass gives the heads their gradient. `current` and
        `use_sign` have no effect."""
        eps, directions = self.cfg.zo_eps, int(self.cfg.fzoo_directions)
        self._new_seed()
        self.sum_flat.zero_()
        torch._foreach_copy_(self.backup, self.params)
        losses = []
        with module_modes(self.model, "zo"):
            loss_at_theta = float(self.loss(inputs, labels, heads_backward=train_heads))
            for _ in range(directions):
                self._fill_z(rademacher=True)
                torch._foreach_add_(self.params, self.z, alpha=eps)
                losses.append(float(self.loss(inputs, labels)))
                torch._foreach_copy_(self.params, self.backup)
                self.sum_flat.add_(self.z_flat, alpha=(losses[-1] - loss_at_theta) / (directions * eps))
        return Estimate(self.sum, loss_at_theta, self.seed, spread=statistics.stdev(losses))


# the ZO estimates by name: H-Tuning takes any of them (cfg.zo_estimator), the other ZO methods their own
ESTIMATORS = {"two_point": TwoPoint, "hizoo": HiZOO, "sparse_mezo": SparseMeZO, "fzoo": FZOO}
