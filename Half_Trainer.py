"""Training steps: H-Tuning (fused ZO/FO), pure ZO (MeZO) and ZO-sign, backprop, and a linear probe.

H-Tuning estimates the gradient of the LoRA trunk (the "ZO set") from two forward passes over the
whole batch, L(θ + εz) and L(θ − εz), without building an autograd graph, and backpropagates only
the first `bp_batch` samples. Per tensor of the ZO set the two estimates are fused:

    g = c · g_fo + (1 − c) · ‖g_fo‖ · g_zo / (‖g_zo‖ + 1e-6),     g_zo = (L+ − L−) / (2ε) · z

so the ZO direction carries the whole batch's information and the FO gradient sets its scale.

The ZO set is handled as one flat buffer: z is drawn once per step into it from a dedicated
seeded generator (never the global RNG), the parameters are perturbed with `torch._foreach_*`
ops, and a flat copy taken before the passes restores them bit-exactly afterwards. Both buffers
are allocated once and reused, so a step allocates nothing per parameter.

Every method has one name, the one `--zo_config` takes; METHODS says which step trains it and
which parameters it trains.
"""
import contextlib
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

# method -> which parameters it trains: the LoRA set (adapters, biases, classifier.1.weight),
# every parameter, or the two heads alone on the frozen pretrained trunk
METHODS = {
    "htuning": "lora",      # fused ZO (whole batch) + FO (first bp_batch samples)
    "lora_bp": "lora",      # backprop
    "ft": "all",            # backprop, every parameter (the student trains this way too)
    "zo": "lora",           # MeZO: two-point ZO for the trunk, heads by backprop on frozen features
    "zo_sign": "lora",      # ZO-sign: sign of the two-point estimate
    "probe": "heads",       # linear probe: the floor any fine-tuning should beat
}
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

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.perturbation_mode not in PERTURBATIONS:
            raise ValueError(f"unknown perturbation_mode {self.perturbation_mode!r}; choose from {PERTURBATIONS}")
        if int(self.q) < 1:
            raise ValueError(f"q (ZO directions per step) must be >= 1, got {self.q}")

    @property
    def uses_zo(self):
        return self.method in ("htuning", "zo", "zo_sign")

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
def recomputing(model):
    """Ask the model to recompute activations in backward instead of storing them, where it can
    (an attribute `recompute_in_backward`; other models run as they are). Same gradients, far
    less memory: H-Tuning's FO pass is then lighter than its whole-batch ZO passes."""
    if not hasattr(model, "recompute_in_backward"):
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
                       "lora_bp": self.backprop_step, "ft": self.backprop_step, "probe": self.probe_step}
        self.last_seed = None
        self.last_projected_grad = None
        self.last_zo_grad = {}
        self.last_coef = None
        self._seeds = torch.Generator().manual_seed(int(seed))
        named = zo_parameters(model) if cfg.uses_zo else []
        self.zo_names = [n for n, _ in named]
        self.zo_params = [p for _, p in named]
        if cfg.uses_zo and not self.zo_params:
            raise ValueError("no trainable parameter outside the heads: nothing for the ZO estimate")
        if not self.zo_params:
            return
        device, dtype = self.zo_params[0].device, self.zo_params[0].dtype
        sizes = [p.numel() for p in self.zo_params]
        self._z_flat = torch.empty(sum(sizes), device=device, dtype=dtype)
        self._backup_flat = torch.empty_like(self._z_flat)
        self.z = [v.view_as(p) for v, p in zip(self._z_flat.split(sizes), self.zo_params)]
        self._backup = [v.view_as(p) for v, p in zip(self._backup_flat.split(sizes), self.zo_params)]
        self._zo_sum_flat = torch.zeros_like(self._z_flat) if int(cfg.q) > 1 else None
        self._z_generator = torch.Generator(device=device)
        self._sparsity = self._sparsities()

    def _sparsities(self):
        """Fraction of z zeroed per ZO tensor, from cfg.gradient_sparsity (None: dense z)."""
        sparsity = self.cfg.gradient_sparsity
        if sparsity is None:
            return None
        if not isinstance(sparsity, dict):
            return [float(sparsity)] * len(self.zo_names)
        return [float(sparsity.get(name, 0.0)) for name in self.zo_names]

    # ------------------------------------------------------------------ the shared pieces
    def _loss(self, inputs, labels, soft_targets=None):
        aux, main = self.model(inputs)
        return compute_loss(aux, main, labels, self.cfg.aux_weight, soft_targets)

    def _draw_z(self):
        """Fill z for this step from a fresh seed; the sparsity mask is applied once, so every use agrees."""
        self.last_seed = int(torch.randint(0, 2**62, (1,), generator=self._seeds))
        self._z_generator.manual_seed(self.last_seed)
        self._z_flat.normal_(generator=self._z_generator)
        if self.cfg.perturbation_mode == "rademacher":
            self._z_flat.sign_()
        if self._sparsity is not None:
            for z, sparsity in zip(self.z, self._sparsity):
                drop_random_(z, sparsity, self._z_generator)

    @torch.no_grad()
    def _two_point(self, inputs, labels):
        """(L(θ+εz) − L(θ−εz)) / 2ε for a fresh z; the ZO set is restored bit-exactly."""
        eps = self.cfg.zo_eps
        self._draw_z()
        torch._foreach_copy_(self._backup, self.zo_params)
        with module_modes(self.model, "zo"):
            torch._foreach_add_(self.zo_params, self.z, alpha=eps)
            loss_plus = self._loss(inputs, labels)
            torch._foreach_add_(self.zo_params, self.z, alpha=-2 * eps)
            loss_minus = self._loss(inputs, labels)
        torch._foreach_copy_(self.zo_params, self._backup)
        return float((loss_plus - loss_minus) / (2 * eps)), float(loss_plus + loss_minus) / 2

    @torch.no_grad()
    def zo_gradient(self, inputs, labels, use_sign=False):
        """The ZO passes alone: g_zo for the ZO set (averaged over q directions) and the mean loss.

        Also kept as `last_zo_grad` / `last_projected_grad`; the ZO set is left bit-identical.
        """
        q = int(self.cfg.q)
        if q > 1:
            self._zo_sum_flat.zero_()
        projections, losses = [], []
        for _ in range(q):
            projected, loss = self._two_point(inputs, labels)
            scale = float((projected > 0) - (projected < 0)) if use_sign else projected
            projections.append(projected)
            losses.append(loss)
            if q > 1:
                self._zo_sum_flat.add_(self._z_flat, alpha=scale / q)
            else:
                self._z_flat.mul_(scale)
        grads = self.z if q == 1 else [v.view_as(p) for v, p in zip(
            self._zo_sum_flat.split([p.numel() for p in self.zo_params]), self.zo_params)]
        self.last_projected_grad = sum(projections) / q
        self.last_zo_grad = dict(zip(self.zo_names, grads))
        return grads, sum(losses) / q

    def _apply(self):
        self.optimizer.step()
        self.lr_scheduler.step()

    # ------------------------------------------------------------------ the steps
    def htuning_step(self, inputs, labels, current, total, soft_targets=None):
        """H-Tuning: ZO over the whole batch for the trunk, FO over the first bp_batch samples, fused."""
        g_zo, loss = self.zo_gradient(inputs, labels)
        self.optimizer.zero_grad(set_to_none=True)
        bp = self.cfg.bp_batch
        with module_modes(self.model, "fo"), recomputing(self.model):
            self._loss(inputs[:bp], labels[:bp]).backward()
        c = self.last_coef = self.cfg.coef if self.cfg.coef is not None else mixing_coefficient(current, total)
        with torch.no_grad():
            g_fo = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.zo_params]
            fo_norms = torch._foreach_norm(g_fo)
            zo_norms = torch._foreach_norm(g_zo)
            scales = [(1 - c) * f / (z + NORM_EPS) for f, z in zip(fo_norms, zo_norms)]
            torch._foreach_mul_(g_fo, c)
            torch._foreach_addcmul_(g_fo, g_zo, scales)
            for p, g in zip(self.zo_params, g_fo):
                p.grad = g
        self._apply()
        return loss

    def zo_step(self, inputs, labels, current=0, total=1, soft_targets=None):
        """MeZO (ZO-sign when the method is "zo_sign"): trunk from the two-point estimate, heads
        from the FO gradient of the full-batch loss on frozen features."""
        g_zo, loss = self.zo_gradient(inputs, labels, use_sign=self.cfg.method == "zo_sign")
        self.optimizer.zero_grad(set_to_none=True)
        with module_modes(self.model, "zo"):
            with torch.no_grad():
                features = self.model.feature_extraction(inputs)
            aux, main = self.model.heads(features)
            compute_loss(aux, main, labels, self.cfg.aux_weight).backward()
        for p, g in zip(self.zo_params, g_zo):
            p.grad = g
        self._apply()
        return loss

    def backprop_step(self, inputs, labels, current=0, total=1, soft_targets=None):
        """Plain backprop on the full batch (LoRA or full, whatever is trainable); with soft targets, KD."""
        self.optimizer.zero_grad(set_to_none=True)
        self.model.train()
        loss = self._loss(inputs, labels, soft_targets)
        loss.backward()
        self._apply()
        return float(loss.detach())

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
        """State of the generator the step seeds come from: a resumed run restores it to draw the same z."""
        return self._seeds.get_state()

    def set_rng_state(self, state):
        self._seeds.set_state(state)

    def step(self, inputs, labels, current, total, soft_targets=None):
        """One training step of the method on (inputs, labels); iteration `current` of `total`.
        Returns the loss (the mean of L+ and L- for the ZO methods)."""
        return self._steps[self.cfg.method](inputs, labels, current, total, soft_targets=soft_targets)
