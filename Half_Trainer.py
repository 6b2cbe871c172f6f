"""Training steps: H-Tuning (fused ZO/FO), the zeroth-order steps (MeZO, ZO-sign, HiZOO, Sparse
MeZO, FZOO), backprop, and a linear probe.

H-Tuning estimates the gradient of the LoRA trunk (the "ZO set") from two forward passes over the
whole batch, L(θ + εz) and L(θ − εz), without building an autograd graph, and backpropagates only
the first `bp_batch` samples. Per tensor of the ZO set the two estimates are fused:

    g = c · g_fo + (1 − c) · ‖g_fo‖ · g_zo / (‖g_zo‖ + 1e-6),     g_zo = (L+ − L−) / (2ε) · z

so the ZO direction carries the whole batch's information and the FO gradient sets its scale
(`fusion` names two other rules, below). The two heads are outside the ZO set; by default
(head_rule "whole_batch", the parent repository's rule) they learn from the whole batch's loss on
the trunk's frozen features, taken during the second ZO pass at no extra forward; head_rule
"bp_batch" (the AdaGrad-Fusion fork's) gives them the FO gradient of the bp_batch samples.
g_zo is the plain two-point estimate unless `zo_estimator` names one of the newer estimators
(ESTIMATORS; each is described at its step: `hizoo_step`, `sparse_mezo_step`, `fzoo_step`).

The ZO set is handled as one flat buffer: z is drawn once per direction into it from a dedicated
seeded generator (never the global RNG), the parameters are perturbed with `torch._foreach_*`
ops, and a flat copy taken before the passes restores them bit-exactly afterwards. Every buffer
(z, the copy, and what an estimator keeps: HiZOO's Hessian diagonal, Sparse MeZO's mask, a sum
of directions) is allocated once and reused, so a step allocates nothing per parameter.

Every method has one name, the one `--zo_config` takes; METHODS says which step trains it and
which parameters it trains.
"""
import contextlib
import statistics
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gradient_pruning import drop_random_
from model_src_ecg import belongs_to_heads

COEF_EARLY, COEF_LATE, COEF_SWITCH = 0.99, 0.9, 0.2   # c while current/total < 0.2, then 0.9
NORM_EPS = 1e-6
NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)
PERTURBATIONS = ("gaussian", "rademacher")
# where H-Tuning's heads learn: the whole batch on frozen features (parent repository), or the
# bp_batch samples of the FO pass (the fork)
HEAD_RULES = ("whole_batch", "bp_batch")
# how H-Tuning fuses g_fo and g_zo of the ZO set; `htuning_step` defines each
FUSIONS = ("normalized", "agreement", "projection")
# where lora_bp_accum's backprop (BatchNorm on running statistics) takes them from: the backbone's
# pretrained ones for the whole run, or each batch's, folded in by a no-grad train-mode forward
BN_RUNNING_STATS = ("frozen", "refreshed")
# HiZOO probes coordinate i at ε / sqrt(max(|D_i|, floor)): at most 10x MeZO's radius where the
# curvature estimate D_i has drifted towards zero, so the finite differences stay local
HESSIAN_FLOOR = 1e-2

# method -> which parameters it trains: the LoRA set (adapters, biases, classifier.1.weight),
# every parameter, or the two heads alone on the frozen pretrained trunk
METHODS = {
    "htuning": "lora",      # fused ZO (whole batch) + FO (first bp_batch samples)
    "lora_bp": "lora",      # backprop
    "lora_bp_accum": "lora",  # backprop in micro-batches of bp_batch: H-Tuning's FO memory, the whole batch's gradient
    "ft": "all",            # backprop, every parameter (the student trains this way too)
    "zo": "lora",           # MeZO: two-point ZO for the trunk, heads by backprop on frozen features
    "zo_sign": "lora",      # ZO-sign: sign of the two-point estimate
    "hizoo": "lora",        # HiZOO: MeZO with a diagonal-Hessian preconditioned perturbation
    "sparse_mezo": "lora",  # Sparse MeZO: MeZO on the small-magnitude weights of the trunk only
    "fzoo": "lora",         # FZOO: batched one-sided estimates, step size from the losses' spread
    "probe": "heads",       # linear probe: the floor any fine-tuning should beat
}
# the methods that backpropagate through the trunk (H-Tuning in its FO pass): where recomputation applies
BACKPROP_METHODS = ("htuning", "lora_bp", "lora_bp_accum", "ft")
# the ZO estimates; htuning takes any of them (cfg.zo_estimator), the other ZO methods their own
ESTIMATORS = ("two_point", "hizoo", "sparse_mezo", "fzoo")
ESTIMATOR_OF = {"zo": "two_point", "zo_sign": "two_point", "hizoo": "hizoo", "sparse_mezo": "sparse_mezo",
                "fzoo": "fzoo"}
# the published code's spellings, accepted on the command line
ALIASES = {"evolution": "htuning", "H-Tuning": "htuning", "ho": "htuning", "purebp": "lora_bp", "bp": "lora_bp",
           "FT": "ft", "zo_opt": "zo", "mezo": "zo", "zo_sign_opt": "zo_sign"}


@dataclass(frozen=True)
class StepConfig:
    """What a step reads. main.step_config() builds one from the experiment's defaults."""
    method: str                       # a key of METHODS
    zo_eps: float                     # ε of the two-point estimate
    q: int                            # ZO directions per step, averaged
    bp_batch: int                     # samples of H-Tuning's FO pass
    aux_weight: float                 # weight of the auxiliary head's loss
    gradient_sparsity: object         # None, a fraction of z to zero, or {parameter name: fraction}
    perturbation_mode: str            # "gaussian" or "rademacher" z
    coef: float | None                # H-Tuning's c; None: the schedule (0.99, then 0.9 after 20%)
    head_rule: str                    # H-Tuning's heads: a name in HEAD_RULES
    fusion: str                       # H-Tuning's fusion of g_fo and g_zo: a name in FUSIONS
    zo_estimator: str                 # H-Tuning's g_zo: a name in ESTIMATORS
    hizoo_smoothing: float            # HiZOO: α, weight of each new Hessian estimate in the moving average
    sparse_mezo_sparsity: float       # Sparse MeZO: fraction of each ZO tensor (largest |w|) left out
    sparse_mezo_interval: int         # Sparse MeZO: steps between recomputing the mask
    fzoo_directions: int              # FZOO: one-sided estimates per step
    recompute: bool                   # backprop keeps each block's input only and runs the block again in backward
    bn_running_stats: str             # lora_bp_accum's BatchNorm statistics: a name in BN_RUNNING_STATS

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.perturbation_mode not in PERTURBATIONS:
            raise ValueError(f"unknown perturbation_mode {self.perturbation_mode!r}; choose from {PERTURBATIONS}")
        if self.head_rule not in HEAD_RULES:
            raise ValueError(f"unknown head_rule {self.head_rule!r}; choose from {', '.join(HEAD_RULES)}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {self.fusion!r}; choose from {', '.join(FUSIONS)}")
        if self.fusion == "projection" and self.method == "htuning" and (self.zo_estimator == "fzoo"
                                                                         or int(self.q) != 1):
            raise ValueError("fusion projection corrects g_fo along the one direction of a two-point estimate; "
                             "FZOO's estimate and q > 1 have several: use fusion normalized")
        if self.bn_running_stats not in BN_RUNNING_STATS:
            raise ValueError(f"unknown bn_running_stats {self.bn_running_stats!r}; choose from "
                             f"{', '.join(BN_RUNNING_STATS)}")
        if self.zo_estimator not in ESTIMATORS:
            raise ValueError(f"unknown zo_estimator {self.zo_estimator!r}; choose from {', '.join(ESTIMATORS)}")
        if int(self.q) < 1:
            raise ValueError(f"q (ZO directions per step) must be >= 1, got {self.q}")
        if not 0 <= self.hizoo_smoothing <= 1:
            raise ValueError(f"hizoo_smoothing must lie in [0, 1], got {self.hizoo_smoothing}")
        if not 0 <= self.sparse_mezo_sparsity < 1:
            raise ValueError(f"sparse_mezo_sparsity must lie in [0, 1), got {self.sparse_mezo_sparsity}")
        if int(self.sparse_mezo_interval) < 1:
            raise ValueError(f"sparse_mezo_interval must be >= 1, got {self.sparse_mezo_interval}")
        if int(self.fzoo_directions) < 2:
            raise ValueError(f"fzoo_directions must be >= 2 (FZOO's step size is their losses' spread), "
                             f"got {self.fzoo_directions}")
        if self.estimator == "hizoo" and (self.perturbation_mode != "gaussian" or self.gradient_sparsity is not None):
            raise ValueError("HiZOO's curvature estimate needs dense Gaussian directions (u_i^2 - 1 is 0 for a "
                             "Rademacher u, and -1 where z is dropped): use perturbation_mode gaussian and no "
                             "gradient_sparsity")

    @property
    def estimator(self):
        """The ZO estimate of the method's trunk (a name in ESTIMATORS), or None: it has none."""
        return self.zo_estimator if self.method == "htuning" else ESTIMATOR_OF.get(self.method)

    @property
    def uses_zo(self):
        return self.estimator is not None

    def fields_read(self):
        """The fields this method's step reads, the others set as they are: a setting of any other
        field has no effect (main.py refuses such a flag)."""
        read = {"method", "aux_weight"}
        if self.method in BACKPROP_METHODS:
            read.add("recompute")
        if self.method in ("htuning", "lora_bp_accum"):
            read.add("bp_batch")
        if self.method == "lora_bp_accum":
            read.add("bn_running_stats")
        if self.method == "htuning":
            read |= {"head_rule", "fusion", "zo_estimator"} | ({"coef"} if self.fusion != "projection" else set())
        estimator = self.estimator
        if estimator is not None:
            read |= {"zo_eps", "gradient_sparsity"} | ({"fzoo_directions"} if estimator == "fzoo"
                                                        else {"q", "perturbation_mode"})
            read |= {"hizoo": {"hizoo_smoothing"},
                     "sparse_mezo": {"sparse_mezo_sparsity", "sparse_mezo_interval"}}.get(estimator, set())
        return read


def compute_loss(aux, main, labels, aux_weight, soft_targets=None):
    """BCE on the main head + aux_weight · BCE of the aux head on "any label" (+ BCE to soft targets)."""
    loss = F.binary_cross_entropy_with_logits(main, labels)
    any_label = (labels > 0).any(dim=1, keepdim=True).to(aux.dtype)
    loss = loss + aux_weight * F.binary_cross_entropy_with_logits(aux, any_label)
    if soft_targets is not None:
        loss = loss + F.binary_cross_entropy_with_logits(main, soft_targets)
    return loss


def mixing_coefficient(current, total):
    """Weight of the FO gradient: 0.99 for the first 20% of iterations, then 0.9."""
    return COEF_EARLY if current / max(total, 1) < COEF_SWITCH else COEF_LATE


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


@contextlib.contextmanager
def recomputing(model, enabled=True):
    """With `enabled`, ask the model to recompute activations in backward instead of storing them,
    where it can (an attribute `recompute_in_backward`; other models run as they are). Same
    gradients and running statistics, far less memory, one more forward of the trunk in time."""
    if not enabled or not hasattr(model, "recompute_in_backward"):
        yield
        return
    saved, model.recompute_in_backward = model.recompute_in_backward, True
    try:
        yield
    finally:
        model.recompute_in_backward = saved


class HalfTrainer:
    """One object per run; `step` runs the step of `cfg.method`, so the training loop has one call.

    cfg: a StepConfig. seed: where the per-step seeds of z come from.
    """

    def __init__(self, model, optimizer, lr_scheduler, cfg, seed=0):
        self.model, self.optimizer, self.lr_scheduler, self.cfg = model, optimizer, lr_scheduler, cfg
        self._steps = {"htuning": self.htuning_step, "zo": self.zo_step, "zo_sign": self.zo_step,
                       "hizoo": self.hizoo_step, "sparse_mezo": self.sparse_mezo_step, "fzoo": self.fzoo_step,
                       "lora_bp": self.backprop_step, "lora_bp_accum": self.accumulation_step,
                       "ft": self.backprop_step, "probe": self.probe_step}
        self.last_seed = None
        self.last_projected_grad = None
        self.last_zo_grad = {}
        self.last_coef = None
        self.last_loss_spread = None
        self._seeds = torch.Generator().manual_seed(int(seed))
        named = zo_parameters(model) if cfg.uses_zo else []
        self.zo_names = [n for n, _ in named]
        self.zo_params = [p for _, p in named]
        self.head_params = [p for n, p in model.named_parameters() if p.requires_grad and belongs_to_heads(n)]
        self._hessian_flat = self._frozen_flat = None
        if cfg.uses_zo and not self.zo_params:
            raise ValueError("no trainable parameter outside the heads: nothing for the ZO estimate")
        if not self.zo_params:
            return
        device, dtype = self.zo_params[0].device, self.zo_params[0].dtype
        self._sizes = [p.numel() for p in self.zo_params]
        self._z_flat = torch.empty(sum(self._sizes), device=device, dtype=dtype)
        self._backup_flat = torch.empty_like(self._z_flat)
        self.z, self._backup = self._views(self._z_flat), self._views(self._backup_flat)
        estimator = cfg.estimator
        summing = estimator == "fzoo" or int(cfg.q) > 1
        self._zo_sum_flat = torch.zeros_like(self._z_flat) if summing else None
        self._zo_sum = self._views(self._zo_sum_flat) if summing else None
        if estimator == "hizoo":  # D, the diagonal of the Hessian: HiZOO starts from the identity
            self._hessian_flat = torch.ones_like(self._z_flat)
        if estimator == "sparse_mezo":
            self._frozen_flat = torch.zeros(self._z_flat.numel(), device=device, dtype=torch.bool)
            self._frozen = self._views(self._frozen_flat)
            self._cuts = torch.empty(len(self.zo_params), device=device, dtype=dtype)
            self._cut_at = torch.empty(len(self.zo_params), device=device, dtype=torch.long)
            self._perturbed = [n - int(round(cfg.sparse_mezo_sparsity * n)) for n in self._sizes]
            self._mask_ready = False
        if cfg.method == "fzoo":
            self._zo_group = self._group_of_zo_set()
        self._z_generator = torch.Generator(device=device)
        self._sparsity = self._sparsities()

    def _views(self, flat):
        """`flat` split into one view per ZO tensor, shaped like it."""
        return [v.view_as(p) for v, p in zip(flat.split(self._sizes), self.zo_params)]

    def _group_of_zo_set(self):
        """The optimizer's parameter group holding the ZO set, whose lr and weight decay FZOO's own
        step reads (the scheduler keeps the lr current)."""
        ids = {id(p) for p in self.zo_params}
        holding = [g for g in self.optimizer.param_groups if ids & {id(p) for p in g["params"]}]
        if len(holding) != 1:
            raise ValueError(f"fzoo updates the ZO set itself at its group's lr: the set must lie in one "
                             f"parameter group of the optimizer, found it in {len(holding)}")
        return holding[0]

    def _sparsities(self):
        """Fraction of z zeroed per ZO tensor, from cfg.gradient_sparsity (None: dense z)."""
        sparsity = self.cfg.gradient_sparsity
        if sparsity is None:
            return None
        if not isinstance(sparsity, dict):
            return [float(sparsity)] * len(self.zo_names)
        return [float(sparsity.get(name, 0.0)) for name in self.zo_names]

    # ------------------------------------------------------------------ the shared pieces
    def _loss(self, inputs, labels, soft_targets=None, heads_backward=False):
        """The loss; with heads_backward, also its gradient for the two heads alone, accumulated in
        their .grad: the trunk runs without a graph (its features are frozen), the heads with one.
        The value is the same either way."""
        if not heads_backward or not self.head_params:
            aux, main = self.model(inputs)
            return compute_loss(aux, main, labels, self.cfg.aux_weight, soft_targets)
        with torch.no_grad():
            features = self.model.feature_extraction(inputs)
        with torch.enable_grad():
            aux, main = self.model.heads(features)
            loss = compute_loss(aux, main, labels, self.cfg.aux_weight, soft_targets)
            loss.backward()
        return loss.detach()

    def _new_seed(self):
        self.last_seed = int(torch.randint(0, 2**62, (1,), generator=self._seeds))
        self._z_generator.manual_seed(self.last_seed)

    def _fill_z(self, rademacher):
        """Draw z from the z generator, with the masks applied once so that every use agrees: the
        random sparsity (gradient_sparsity) and Sparse MeZO's magnitude mask."""
        self._z_flat.normal_(generator=self._z_generator)
        if rademacher:
            self._z_flat.sign_()
        if self._sparsity is not None:
            for z, sparsity in zip(self.z, self._sparsity):
                drop_random_(z, sparsity, self._z_generator)
        if self._frozen_flat is not None:
            self._z_flat.masked_fill_(self._frozen_flat, 0)

    def _draw_z(self):
        """Fill z for this direction from a fresh seed; HiZOO's z is u ~ N(0, I) scaled by P^(-1/2)."""
        self._new_seed()
        self._fill_z(rademacher=self.cfg.perturbation_mode == "rademacher")
        if self._hessian_flat is not None:  # the copy of the ZO set is taken after this: its buffer is free
            scale = torch.abs(self._hessian_flat, out=self._backup_flat)
            self._z_flat.mul_(scale.clamp_min_(HESSIAN_FLOOR).rsqrt_())

    @torch.no_grad()
    def _two_point(self, inputs, labels, heads_backward=False):
        """L(θ+εz) and L(θ−εz) for a fresh z, as 0-dim tensors; the ZO set is restored bit-exactly.
        heads_backward: the second pass also gives the heads their gradient (see _loss)."""
        eps = self.cfg.zo_eps
        self._draw_z()
        torch._foreach_copy_(self._backup, self.zo_params)
        with module_modes(self.model, "zo"):
            torch._foreach_add_(self.zo_params, self.z, alpha=eps)
            loss_plus = self._loss(inputs, labels)
            torch._foreach_add_(self.zo_params, self.z, alpha=-2 * eps)
            loss_minus = self._loss(inputs, labels, heads_backward=heads_backward)
        torch._foreach_copy_(self.zo_params, self._backup)
        return loss_plus, loss_minus

    @torch.no_grad()
    def _update_hessian(self, second_difference):
        """HiZOO's moving average of diag(H) from the direction in z and L+ + L− − 2 L(θ):
        D ← (1 − α) D + α · ĥ,  ĥ = (L+ + L− − 2L) / (2ε²) · P ⊙ (u ⊙ u − 1),  u = P^(1/2) z,
        computed in place, with the copy of the ZO set (restored already) as scratch."""
        alpha = self.cfg.hizoo_smoothing
        weight = alpha * second_difference / (2 * self.cfg.zo_eps ** 2)
        curvature = torch.abs(self._hessian_flat, out=self._backup_flat).clamp_min_(HESSIAN_FLOOR)   # P
        self._hessian_flat.mul_(1 - alpha).sub_(curvature, alpha=weight)          # − α c P
        root_u = curvature.mul_(self._z_flat)                                     # P z = P^(1/2) u
        self._hessian_flat.addcmul_(root_u, root_u, value=weight)                 # + α c P u²

    @torch.no_grad()
    def _refresh_mask(self):
        """Sparse MeZO's mask from the current weights: in each ZO tensor, the weights whose |w| is
        above its k-th smallest (k = numel − round(sparsity · numel)) are left out of z; ties at
        the cut are kept in, so a tensor of equal weights (a LoRA B at zero) is perturbed whole."""
        torch._foreach_copy_(self.z, self.zo_params)  # |w| in z's buffer: z is drawn after this
        self._z_flat.abs_()
        for i, (magnitude, frozen, kept) in enumerate(zip(self.z, self._frozen, self._perturbed)):
            if kept == 0:
                frozen.fill_(True)
                continue
            torch.kthvalue(magnitude.view(-1), kept, out=(self._cuts[i], self._cut_at[i]))
            torch.gt(magnitude, self._cuts[i], out=frozen)
        self._mask_ready = True

    @torch.no_grad()
    def zo_gradient(self, inputs, labels, use_sign=False, current=0, train_heads=False):
        """The ZO passes alone: g_zo for the ZO set by cfg.estimator (two-point ones averaged over
        q directions) and the loss; `current` (the iteration) times Sparse MeZO's mask. With
        train_heads, one of the passes (L(θ) where the estimator evaluates it, else the first
        L(θ−εz)) also accumulates the heads' gradient of the whole batch's loss on its features.

        Also kept as `last_zo_grad` / `last_projected_grad`; the ZO set is left bit-identical.
        The loss is L(θ) where the estimator evaluates it (HiZOO, FZOO), else the mean of L±.
        """
        estimator = self.cfg.estimator
        if estimator == "fzoo":
            return self._fzoo_gradient(inputs, labels, train_heads)
        if estimator == "sparse_mezo" and (not self._mask_ready or current % self.cfg.sparse_mezo_interval == 0):
            self._refresh_mask()
        loss_at_theta = None
        if estimator == "hizoo":
            with module_modes(self.model, "zo"):
                loss_at_theta = float(self._loss(inputs, labels, heads_backward=train_heads))
            train_heads = False
        q = int(self.cfg.q)
        if q > 1:
            self._zo_sum_flat.zero_()
        projections, losses = [], []
        for _ in range(q):
            loss_plus, loss_minus = self._two_point(inputs, labels, heads_backward=train_heads)
            train_heads = False
            projected = float((loss_plus - loss_minus) / (2 * self.cfg.zo_eps))
            if loss_at_theta is not None:
                self._update_hessian(float(loss_plus) + float(loss_minus) - 2 * loss_at_theta)
            scale = float((projected > 0) - (projected < 0)) if use_sign else projected
            projections.append(projected)
            losses.append(float(loss_plus + loss_minus) / 2)
            if q > 1:
                self._zo_sum_flat.add_(self._z_flat, alpha=scale / q)
            else:
                self._z_flat.mul_(scale)
        grads = self.z if q == 1 else self._zo_sum
        self.last_projected_grad = sum(projections) / q
        self.last_zo_grad = dict(zip(self.zo_names, grads))
        return grads, sum(losses) / q if loss_at_theta is None else loss_at_theta

    @torch.no_grad()
    def _fzoo_gradient(self, inputs, labels, train_heads=False):
        """FZOO's estimate: ĝ = (1/N) Σ_i (L(θ + ε u_i) − L(θ)) / ε · u_i over N Rademacher u_i,
        drawn in turn from one seed; also the spread (standard deviation) of the N losses. With
        train_heads, the L(θ) pass gives the heads their gradient."""
        eps, directions = self.cfg.zo_eps, int(self.cfg.fzoo_directions)
        self._new_seed()
        self._zo_sum_flat.zero_()
        torch._foreach_copy_(self._backup, self.zo_params)
        losses = []
        with module_modes(self.model, "zo"):
            loss_at_theta = float(self._loss(inputs, labels, heads_backward=train_heads))
            for _ in range(directions):
                self._fill_z(rademacher=True)
                torch._foreach_add_(self.zo_params, self.z, alpha=eps)
                losses.append(float(self._loss(inputs, labels)))
                torch._foreach_copy_(self.zo_params, self._backup)
                self._zo_sum_flat.add_(self._z_flat, alpha=(losses[-1] - loss_at_theta) / (directions * eps))
        self.last_loss_spread = statistics.stdev(losses)
        self.last_zo_grad = dict(zip(self.zo_names, self._zo_sum))
        return self._zo_sum, loss_at_theta

    def _apply(self):
        self.optimizer.step()
        self.lr_scheduler.step()

    # ------------------------------------------------------------------ the steps
    def htuning_step(self, inputs, labels, current, total, soft_targets=None):
        """H-Tuning: ZO over the whole batch for the trunk, FO over the first bp_batch samples, fused.

        The heads (head_rule): "whole_batch" takes their gradient of the whole batch's loss on
        frozen features in the second ZO pass, and the FO pass trains only the ZO set;
        "bp_batch" takes theirs from the FO pass. The ZO set's gradient (fusion), per tensor t:
          normalized:  g_t = c · g_fo + (1 − c) · ‖g_fo‖ · g_zo / (‖g_zo‖ + 1e-6)      (the paper's)
          agreement:   the same with c_t = 1 − (1 − c) · max(0, cos(g_fo, g_zo)): the ZO share
                       shrinks where the two directions disagree, and is c's where they coincide;
          projection:  g = g_fo + (p − z·g_fo) / ‖z‖² · z over the whole ZO set, where p = (L+ − L−)/(2ε)
                       is the whole batch's derivative along z: the FO estimate's component along z
                       replaced by the measured one (c is not used). Any one-direction estimate
                       (two-point, HiZOO's, Sparse MeZO's, q 1) gives z and p.
        """
        whole_batch_heads = self.cfg.head_rule == "whole_batch"
        self.optimizer.zero_grad(set_to_none=True)
        g_zo, loss = self.zo_gradient(inputs, labels, current=current, train_heads=whole_batch_heads)
        head_grads = [p.grad for p in self.head_params] if whole_batch_heads else None
        for p in self.head_params:  # else the FO pass's backward would add into the kept gradients
            p.grad = None
        bp = self.cfg.bp_batch
        with module_modes(self.model, "fo"), recomputing(self.model, self.cfg.recompute):
            self._loss(inputs[:bp], labels[:bp]).backward()
        if head_grads is not None:
            for p, g in zip(self.head_params, head_grads):
                p.grad = g
        c = self.cfg.coef if self.cfg.coef is not None else mixing_coefficient(current, total)
        with torch.no_grad():
            g_fo = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.zo_params]
            self.last_coef = self._fuse(g_fo, g_zo, c)
            for p, g in zip(self.zo_params, g_fo):
                p.grad = g
        self._apply()
        return loss

    def _fuse(self, g_fo, g_zo, c):
        """g_fo becomes the fused gradient of cfg.fusion (see htuning_step), in place; returns the
        FO weight used (its mean over tensors for agreement; None for projection)."""
        if self.cfg.fusion == "projection":
            # g_zo = p z, so (p − z·g_fo) / ‖z‖² · z = (p² − g_zo·g_fo) / ‖g_zo‖² · g_zo
            p = self.last_projected_grad
            zo_square = sum(torch.dot(g.view(-1), g.view(-1)) for g in g_zo)
            if float(zo_square) > 0:   # p = 0, or z masked out: nothing measured, g_fo stays
                fo_along = sum(torch.dot(z.view(-1), g.view(-1)) for z, g in zip(g_zo, g_fo))
                torch._foreach_addcmul_(g_fo, g_zo, [(p * p - fo_along) / zo_square] * len(g_fo))
            return None
        fo_norms = torch._foreach_norm(g_fo)
        zo_norms = torch._foreach_norm(g_zo)
        if self.cfg.fusion == "agreement":
            cosines = [torch.dot(f.view(-1), z.view(-1)) / (fn * zn + NORM_EPS)
                       for f, z, fn, zn in zip(g_fo, g_zo, fo_norms, zo_norms)]
            coefs = [1 - (1 - c) * cos.clamp(min=0) for cos in cosines]
        else:
            coefs = [torch.tensor(c, dtype=g_fo[0].dtype, device=g_fo[0].device)] * len(g_fo)
        scales = [(1 - ct) * f / (z + NORM_EPS) for ct, f, z in zip(coefs, fo_norms, zo_norms)]
        torch._foreach_mul_(g_fo, coefs)
        torch._foreach_addcmul_(g_fo, g_zo, scales)
        return c if self.cfg.fusion == "normalized" else float(torch.stack(coefs).mean())

    def zo_step(self, inputs, labels, current=0, total=1, soft_targets=None):
        """MeZO (ZO-sign when the method is "zo_sign"; HiZOO and Sparse MeZO through their steps):
        the trunk's ZO estimate as its gradient for the optimizer, the heads' from the FO gradient
        of the full-batch loss on frozen features."""
        self.optimizer.zero_grad(set_to_none=True)
        g_zo, loss = self.zo_gradient(inputs, labels, use_sign=self.cfg.method == "zo_sign", current=current,
                                      train_heads=True)
        for p, g in zip(self.zo_params, g_zo):
            p.grad = g
        self._apply()
        return loss

    def hizoo_step(self, inputs, labels, current=0, total=1, soft_targets=None):
        """HiZOO (Zhao, Dang, Ye, Dai, Qian, Tsang, "Second-Order Fine-Tuning without Pain for LLMs:
        A Hessian Informed Zeroth-Order Optimizer", ICLR 2025): MeZO whose perturbation is shaped
        by a diagonal Hessian estimate D, learnt from one more forward pass, L(θ), per step:

            z = P^(-1/2) u,  u ~ N(0, I),  P = max(|D|, HESSIAN_FLOOR)
            g = (L(θ + εz) − L(θ − εz)) / (2ε) · z        (in expectation ≈ P^-1 ∇L: a diagonal Newton step)
            D ← (1 − α) D + α · (L+ + L− − 2 L(θ)) / (2ε²) · P ⊙ (u ⊙ u − 1),   D₀ = 1

        The second difference is ε² u·P^(-1/2) H P^(-1/2) u to second order, and for Gaussian u,
        E[(u·A u)(u_i² − 1)] = 2 A_ii, so each step's ĥ is an unbiased estimate of diag(H) whatever
        P is. Assumed from our reading of the paper: it keeps Σ⁻¹ = D positive by averaging |ĥ|;
        the magnitude of one estimate has a larger mean than diag(H) (the share of tr(H P⁻¹) that
        every ĥ_i carries cancels on average only with its sign), so we average the signed ĥ,
        which converges to diag(H) (tests/test_zo_steps.py), and take the magnitude, floored, only
        where D is used. α defaults to 1e-6, the smoothing of the paper's scripts for RoBERTa-large
        (its LoRA example uses 1e-10): D then moves slowly from the identity.

        As with `zo`, g goes to p.grad and the run's AdamW applies it (the paper steps with SGD);
        AdamW rescales each coordinate, which undoes much of the diagonal's effect on the step
        length but not on which directions are probed, and keeps the learning rate comparable
        with the other methods. The heads train by backprop on frozen features.
        """
        return self.zo_step(inputs, labels, current, total, soft_targets)

    def sparse_mezo_step(self, inputs, labels, current=0, total=1, soft_targets=None):
        """Sparse MeZO (Liu, Zhu, Gong, Cheng, Hsieh, You, "Sparse MeZO: Less Parameters for Better
        Performance in Zeroth-Order LLM Fine-Tuning", NeurIPS 2025): MeZO restricted to the small
        weights, where the paper finds the ZO noise does the least harm:

            m_l = 1[|w| ≤ h_l] per ZO tensor l, h_l its k-th smallest |w|, k = n_l − round(s · n_l)
            z = m ⊙ u,   g = (L(θ + εz) − L(θ − εz)) / (2ε) · z

        The weights outside m are neither perturbed nor updated: z is masked once per draw, and
        after AdamW's step (whose momentum and decoupled weight decay would move them) they are
        put back from the copy taken before the passes. Assumed from our reading of the paper: its
        memory-efficient implementation derives the mask on the fly in every step from the current
        weights with per-layer thresholds, hence sparse_mezo_interval = 1 by default; we recompute
        the thresholds with it, as LoRA B starts at zero, where a threshold fixed at the start
        would freeze B after its first update; and its best results use sparsities around
        0.7-0.8, hence s = 0.75. The mask is one flat bool buffer. AdamW, the heads by backprop on
        frozen features, as `zo`.
        """
        loss = self.zo_step(inputs, labels, current, total, soft_targets)
        with torch.no_grad():
            for p, frozen, before in zip(self.zo_params, self._frozen, self._backup):
                torch.where(frozen, before, p, out=p)
        return loss

    def fzoo_step(self, inputs, labels, current=0, total=1, soft_targets=None):
        """FZOO (Dang, Guo, Zhao, Ye, Zheng, Dai, Tsang, "FZOO: Fast Zeroth-Order Optimizer for
        Fine-Tuning Large Language Models towards Adam-Scale Speed", 2025): N one-sided estimates
        with Rademacher directions around one unperturbed loss, the step length set by the spread
        of their losses:

            ℓ₀ = L(θ),  ℓ_i = L(θ + ε u_i),  u_i ∈ {±1}^d,  i = 1..N
            θ ← θ − η / σ · (1/N) Σ_i (ℓ_i − ℓ₀) u_i = θ − η (ε/σ) ĝ,   σ = std(ℓ_1, ..., ℓ_N)

        σ ≈ ε ‖∇L‖ (for Rademacher u, the spread of u·∇L is ‖∇L‖), so the step is a normalised-
        gradient step of length ~η whatever ε and the loss scale are: this is FZOO's own step size,
        so the ZO set is not handed to AdamW (it would rescale it again; and FZOO keeps no optimizer
        state for the trunk). η is the run's scheduled lr of the group holding the ZO set, and its
        decoupled weight decay is applied as AdamW would, so only the step rule differs from `zo`.
        The paper runs the N perturbed forwards in parallel on the GPU; here they run one after
        another over the whole batch, which costs time, not memory. Directions are always
        Rademacher, as in the paper (perturbation_mode is not read). Assumed: N = 8, a small batch
        of directions as in the paper's experiments (we could not check its exact default), and
        σ the sample standard deviation (N − 1). The heads train by backprop on frozen features
        with AdamW.
        """
        self.optimizer.zero_grad(set_to_none=True)
        g_zo, loss = self.zo_gradient(inputs, labels, train_heads=True)
        lr, decay = self._zo_group["lr"], self._zo_group.get("weight_decay", 0.0)
        spread = self.last_loss_spread
        step = lr * self.cfg.zo_eps / spread if spread > 0 else 0.0   # equal losses: no direction to follow
        with torch.no_grad():
            torch._foreach_mul_(self.zo_params, 1 - lr * decay)
            torch._foreach_add_(self.zo_params, g_zo, alpha=-step)
        self._apply()
        return loss

    def backprop_step(self, inputs, labels, current=0, total=1, soft_targets=None):
        """Plain backprop on the full batch (LoRA or full, whatever is trainable), BatchNorm on the
        batch's statistics (and updating the running ones once); with soft targets, KD."""
        self.optimizer.zero_grad(set_to_none=True)
        self.model.train()
        with recomputing(self.model, self.cfg.recompute):
            loss = self._loss(inputs, labels, soft_targets)
            loss.backward()
        self._apply()
        return float(loss.detach())

    def accumulation_step(self, inputs, labels, current=0, total=1, soft_targets=None):
        """LoRA backprop at the memory of H-Tuning's FO pass: the batch in micro-batches of bp_batch,
        each backpropagated in the FO pass's modes (BatchNorm on its running statistics) with its
        loss weighted by its share of the batch. Every sample is then on its own, so the summed
        gradient is exactly the whole batch's; the time is a full backprop's (plus the
        recomputation, with cfg.recompute). The running statistics stay the pretrained ones
        (bn_running_stats "frozen"), or ("refreshed") take this batch's moments first, from one
        no-grad train-mode forward of the trunk, as H-Tuning's ZO passes and a train-mode
        backprop fold theirs in."""
        self.optimizer.zero_grad(set_to_none=True)
        size, bp, loss_sum = len(inputs), self.cfg.bp_batch, 0.0
        if self.cfg.bn_running_stats == "refreshed":
            with torch.no_grad(), module_modes(self.model, "zo"):
                self.model.feature_extraction(inputs)
        with module_modes(self.model, "fo"), recomputing(self.model, self.cfg.recompute):
            for start in range(0, size, bp):
                part = slice(start, start + bp)
                share = (min(size, start + bp) - start) / size
                soft = None if soft_targets is None else soft_targets[part]
                loss = self._loss(inputs[part], labels[part], soft)
                (loss * share).backward()
                loss_sum += float(loss.detach()) * share
        self._apply()
        return loss_sum

    def probe_step(self, inputs, labels, current=0, total=1, soft_targets=None):
        """Linear probe: the heads by backprop on the features of the frozen trunk, in eval mode
        (its BatchNorm statistics stay the pretrained ones), so the trunk stores no activations."""
        self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        with torch.no_grad():
            features = self.model.feature_extraction(inputs)
        aux, main = self.model.heads(features)
        loss = compute_loss(aux, main, labels, self.cfg.aux_weight, soft_targets)
        loss.backward()
        self._apply()
        return float(loss.detach())

    def rng_state(self):
        """What a resumed run needs to draw the same z: the state of the generator the step seeds
        come from, and with it, where the estimator keeps one, HiZOO's Hessian diagonal or Sparse
        MeZO's mask (both shape z)."""
        kept = {name: buffer.clone() for name, buffer in (("hessian", self._hessian_flat),
                                                          ("frozen", self._frozen_flat)) if buffer is not None}
        return {"seeds": self._seeds.get_state(), **kept} if kept else self._seeds.get_state()

    def set_rng_state(self, state):
        if not isinstance(state, dict):
            self._seeds.set_state(state)
            return
        self._seeds.set_state(state["seeds"])
        if "hessian" in state:
            self._hessian_flat.copy_(state["hessian"])
        if "frozen" in state:
            self._frozen_flat.copy_(state["frozen"])
            self._mask_ready = True

    def step(self, inputs, labels, current, total, soft_targets=None):
        """One training step of the method on (inputs, labels); iteration `current` of `total`.
        Returns the loss: L(θ) for HiZOO and FZOO, the mean of L+ and L- for the other ZO steps."""
        return self._steps[self.cfg.method](inputs, labels, current, total, soft_targets=soft_targets)
