"""Training steps: H-Tuning (fused ZO/FO), the zeroth-order steps (MeZO, ZO-sign, HiZOO, Sparse
MeZO, FZOO), backprop, and a linear probe; one function per step, named in REGISTRY.

H-Tuning estimates the gradient of the LoRA trunk (the "ZO set") from two forward passes over the
whole batch, L(θ + εz) and L(θ − εz), without building an autograd graph, and backpropagates only
the first `bp_batch` samples. Per tensor of the ZO set the two estimates are fused:

    g = c · g_fo + (1 − c) · ‖g_fo‖ · g_zo / (‖g_zo‖ + 1e-6),     g_zo = (L+ − L−) / (2ε) · z

so the ZO direction carries the whole batch's information and the FO gradient sets its scale
(`fusion` names two other rules, below). The two heads are outside the ZO set; by default
(head_rule "whole_batch", the parent repository's rule) they learn from the whole batch's loss on
the trunk's frozen features, taken during the second ZO pass at no extra forward; head_rule
"bp_batch" (the AdaGrad-Fusion fork's) gives them the FO gradient of the bp_batch samples.
g_zo is the plain two-point estimate unless `zo_estimator` names one of the newer estimates
(zo_estimators.ESTIMATORS; each method is described at its step: `hizoo_step`,
`sparse_mezo_step`, `fzoo_step`).

Every method has one name, the one `--zo_config` takes, and one row in REGISTRY: its step, which
parameters it trains, the settings its step reads and its ZO estimate. A step is
`step(trainer, inputs, labels, current, total, soft_targets)`: it reads the run's model, optimizer
and settings from the HalfTrainer, steps them, and returns the loss.
"""
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model_src_ecg import belongs_to_heads
from zo_estimators import ESTIMATORS, module_modes

COEF_EARLY, COEF_LATE, COEF_SWITCH = 0.99, 0.9, 0.2   # c while current/total < 0.2, then 0.9
NORM_EPS = 1e-6
PERTURBATIONS = ("gaussian", "rademacher")
# where H-Tuning's heads learn: the whole batch on frozen features (parent repository), or the
# bp_batch samples of the FO pass (the fork)
HEAD_RULES = ("whole_batch", "bp_batch")
# how H-Tuning fuses g_fo and g_zo of the ZO set; `htuning_step` defines each
FUSIONS = ("normalized", "agreement", "projection")
# where lora_bp_accum's backprop (BatchNorm on running statistics) takes them from: the backbone's
# pretrained ones for the whole run, or each batch's, folded in by a no-grad train-mode forward
BN_RUNNING_STATS = ("frozen", "refreshed")
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
        if self.fusion == "projection" and "fusion" in REGISTRY[self.method].reads and (
                self.zo_estimator == "fzoo" or int(self.q) != 1):
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
        if self.estimator is not None:
            ESTIMATORS[self.estimator].check(self)

    @property
    def estimator(self):
        """The ZO estimate of the method's trunk (a name in ESTIMATORS), or None: it has none. A
        step that reads zo_estimator (H-Tuning) takes the one it names."""
        method = REGISTRY[self.method]
        return self.zo_estimator if "zo_estimator" in method.reads else method.estimator

    @property
    def uses_zo(self):
        return self.estimator is not None

    def fields_read(self):
        """The fields this method's step reads, the others set as they are: a setting of any other
        field has no effect (main.py refuses such a flag)."""
        read = {"method", "aux_weight", *REGISTRY[self.method].reads}
        if self.fusion == "projection":   # the projection takes no c
            read.discard("coef")
        if self.estimator is not None:
            read.update(ESTIMATORS[self.estimator].reads)
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


# ---------------------------------------------------------------------------------------- the steps
def htuning_step(trainer, inputs, labels, current=0, total=1, soft_targets=None):
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
    cfg = trainer.cfg
    whole_batch_heads = cfg.head_rule == "whole_batch"
    trainer.optimizer.zero_grad(set_to_none=True)
    g_zo, loss = trainer.zo_gradient(inputs, labels, current=current, train_heads=whole_batch_heads)
    head_grads = [p.grad for p in trainer.head_params] if whole_batch_heads else None
    for p in trainer.head_params:  # else the FO pass's backward would add into the kept gradients
        p.grad = None
    bp = cfg.bp_batch
    with module_modes(trainer.model, "fo"), recomputing(trainer.model, cfg.recompute):
        trainer.loss(inputs[:bp], labels[:bp]).backward()
    if head_grads is not None:
        for p, g in zip(trainer.head_params, head_grads):
            p.grad = g
    c = cfg.coef if cfg.coef is not None else mixing_coefficient(current, total)
    with torch.no_grad():
        g_fo = [p.grad if p.grad is not None else torch.zeros_like(p) for p in trainer.zo_params]
        trainer.last_coef = _fuse(g_fo, g_zo, c, cfg.fusion, trainer.last_projected_grad)
        for p, g in zip(trainer.zo_params, g_fo):
            p.grad = g
    trainer.update()
    return loss


def _fuse(g_fo, g_zo, c, fusion, projected):
    """g_fo becomes the fused gradient of `fusion` (see htuning_step; `projected` is p), in place;
    returns the FO weight used (its mean over tensors for agreement; None for projection)."""
    if fusion == "projection":
        # g_zo = p z, so (p − z·g_fo) / ‖z‖² · z = (p² − g_zo·g_fo) / ‖g_zo‖² · g_zo
        p = projected
        zo_square = sum(torch.dot(g.view(-1), g.view(-1)) for g in g_zo)
        if float(zo_square) > 0:   # p = 0, or z masked out: nothing measured, g_fo stays
            fo_along = sum(torch.dot(z.view(-1), g.view(-1)) for z, g in zip(g_zo, g_fo))
            torch._foreach_addcmul_(g_fo, g_zo, [(p * p - fo_along) / zo_square] * len(g_fo))
        return None
    fo_norms = torch._foreach_norm(g_fo)
    zo_norms = torch._foreach_norm(g_zo)
    if fusion == "agreement":
        cosines = [torch.dot(f.view(-1), z.view(-1)) / (fn * zn + NORM_EPS)
                   for f, z, fn, zn in zip(g_fo, g_zo, fo_norms, zo_norms)]
        coefs = [1 - (1 - c) * cos.clamp(min=0) for cos in cosines]
    else:
        coefs = [torch.tensor(c, dtype=g_fo[0].dtype, device=g_fo[0].device)] * len(g_fo)
    scales = [(1 - ct) * f / (z + NORM_EPS) for ct, f, z in zip(coefs, fo_norms, zo_norms)]
    torch._foreach_mul_(g_fo, coefs)
    torch._foreach_addcmul_(g_fo, g_zo, scales)
    return c if fusion == "normalized" else float(torch.stack(coefs).mean())


def zo_step(trainer, inputs, labels, current=0, total=1, soft_targets=None, *, use_sign=False):
    """MeZO (and the steps built on it: ZO-sign, HiZOO, Sparse MeZO): the trunk's ZO estimate as its
    gradient for the optimizer, the heads' from the FO gradient of the full-batch loss on frozen
    features."""
    trainer.optimizer.zero_grad(set_to_none=True)
    g_zo, loss = trainer.zo_gradient(inputs, labels, use_sign=use_sign, current=current, train_heads=True)
    for p, g in zip(trainer.zo_params, g_zo):
        p.grad = g
    trainer.update()
    return loss


def zo_sign_step(trainer, inputs, labels, current=0, total=1, soft_targets=None):
    """ZO-sign: MeZO with the sign of the projected gradient, sign((L+ − L−) / 2ε) · z."""
    return zo_step(trainer, inputs, labels, current, total, soft_targets, use_sign=True)


def hizoo_step(trainer, inputs, labels, current=0, total=1, soft_targets=None):
    """HiZOO (Zhao, Dang, Ye, Dai, Qian, Tsang, "Second-Order Fine-Tuning without Pain for LLMs:
    A Hessian Informed Zeroth-Order Optimizer", ICLR 2025): MeZO whose perturbation is shaped
    by a diagonal Hessian estimate D, learnt from one more forward pass, L(θ), per step
    (zo_estimators.HiZOO):

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
    return zo_step(trainer, inputs, labels, current, total, soft_targets)


def sparse_mezo_step(trainer, inputs, labels, current=0, total=1, soft_targets=None):
    """Sparse MeZO (Liu, Zhu, Gong, Cheng, Hsieh, You, "Sparse MeZO: Less Parameters for Better
    Performance in Zeroth-Order LLM Fine-Tuning", NeurIPS 2025): MeZO restricted to the small
    weights, where the paper finds the ZO noise does the least harm (zo_estimators.SparseMeZO):

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
    loss = zo_step(trainer, inputs, labels, current, total, soft_targets)
    trainer.estimator.restore_frozen()
    return loss


def fzoo_step(trainer, inputs, labels, current=0, total=1, soft_targets=None):
    """FZOO (Dang, Guo, Zhao, Ye, Zheng, Dai, Tsang, "FZOO: Fast Zeroth-Order Optimizer for
    Fine-Tuning Large Language Models towards Adam-Scale Speed", 2025): N one-sided estimates
    with Rademacher directions around one unperturbed loss, the step length set by the spread
    of their losses (zo_estimators.FZOO):

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
    trainer.optimizer.zero_grad(set_to_none=True)
    g_zo, loss = trainer.zo_gradient(inputs, labels, train_heads=True)
    group = trainer.zo_group
    lr, decay = group["lr"], group.get("weight_decay", 0.0)
    spread = trainer.last_loss_spread
    step = lr * trainer.cfg.zo_eps / spread if spread > 0 else 0.0   # equal losses: no direction to follow
    with torch.no_grad():
        torch._foreach_mul_(trainer.zo_params, 1 - lr * decay)
        torch._foreach_add_(trainer.zo_params, g_zo, alpha=-step)
    trainer.update()
    return loss


def backprop_step(trainer, inputs, labels, current=0, total=1, soft_targets=None):
    """Plain backprop on the full batch (LoRA or full, whatever is trainable), BatchNorm on the
    batch's statistics (and updating the running ones once); with soft targets, KD."""
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.model.train()
    with recomputing(trainer.model, trainer.cfg.recompute):
        loss = trainer.loss(inputs, labels, soft_targets)
        loss.backward()
    trainer.update()
    return float(loss.detach())


def accumulation_step(trainer, inputs, labels, current=0, total=1, soft_targets=None):
    """LoRA backprop at the memory of H-Tuning's FO pass: the batch in micro-batches of bp_batch,
    each backpropagated in the FO pass's modes (BatchNorm on its running statistics) with its
    loss weighted by its share of the batch. Every sample is then on its own, so the summed
    gradient is exactly the whole batch's; the time is a full backprop's (plus the
    recomputation, with cfg.recompute). The running statistics stay the pretrained ones
    (bn_running_stats "frozen"), or ("refreshed") take this batch's moments first, from one
    no-grad train-mode forward of the trunk, as H-Tuning's ZO passes and a train-mode
    backprop fold theirs in."""
    model, cfg = trainer.model, trainer.cfg
    trainer.optimizer.zero_grad(set_to_none=True)
    size, bp, loss_sum = len(inputs), cfg.bp_batch, 0.0
    if cfg.bn_running_stats == "refreshed":
        with torch.no_grad(), module_modes(model, "zo"):
            model.feature_extraction(inputs)
    with module_modes(model, "fo"), recomputing(model, cfg.recompute):
        for start in range(0, size, bp):
            part = slice(start, start + bp)
            share = (min(size, start + bp) - start) / size
            soft = None if soft_targets is None else soft_targets[part]
            loss = trainer.loss(inputs[part], labels[part], soft)
            (loss * share).backward()
            loss_sum += float(loss.detach()) * share
    trainer.update()
    return loss_sum


def probe_step(trainer, inputs, labels, current=0, total=1, soft_targets=None):
    """Linear probe: the heads by backprop on the features of the frozen trunk, in eval mode
    (its BatchNorm statistics stay the pretrained ones), so the trunk stores no activations."""
    model = trainer.model
    trainer.optimizer.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        features = model.feature_extraction(inputs)
    aux, main = model.heads(features)
    loss = compute_loss(aux, main, labels, trainer.cfg.aux_weight, soft_targets)
    loss.backward()
    trainer.update()
    return float(loss.detach())


# ------------------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class Method:
    """A method's row: its step; which parameters it trains (the LoRA set: adapters, biases,
    classifier.1.weight; every parameter; or the two heads alone on the frozen pretrained trunk);
    the StepConfig fields its step reads beyond method, aux_weight and its ZO estimate's (recompute:
    it backpropagates through the trunk; zo_estimator: it takes the estimate that names); and the
    ZO estimate of its trunk, if any (a name in ESTIMATORS)."""
    step: Callable
    trains: str
    reads: tuple = ()
    estimator: str | None = None


REGISTRY = {
    # fused ZO (whole batch) + FO (first bp_batch samples)
    "htuning": Method(htuning_step, "lora", ("bp_batch", "recompute", "head_rule", "fusion", "coef", "zo_estimator")),
    "lora_bp": Method(backprop_step, "lora", ("recompute",)),
    # backprop in micro-batches of bp_batch: H-Tuning's FO memory, the whole batch's gradient
    "lora_bp_accum": Method(accumulation_step, "lora", ("bp_batch", "recompute", "bn_running_stats")),
    "ft": Method(backprop_step, "all", ("recompute",)),           # the student trains this way too
    "zo": Method(zo_step, "lora", estimator="two_point"),         # MeZO; the heads by backprop on frozen features
    "zo_sign": Method(zo_sign_step, "lora", estimator="two_point"),
    "hizoo": Method(hizoo_step, "lora", estimator="hizoo"),
    "sparse_mezo": Method(sparse_mezo_step, "lora", estimator="sparse_mezo"),
    "fzoo": Method(fzoo_step, "lora", estimator="fzoo"),
    "probe": Method(probe_step, "heads"),                         # linear probe: the floor any fine-tuning should beat
}
# method -> which parameters it trains: "lora", "all" or "heads"
METHODS = {name: method.trains for name, method in REGISTRY.items()}


class HalfTrainer:
    """One object per run: the model, its optimizer and schedule, the step settings, the ZO estimate
    (`estimator`, of zo_estimators.ESTIMATORS, None without one) and the generator the step seeds
    come from; `step` runs the step of `cfg.method` on them, so the training loop has one call.

    cfg: a StepConfig. seed: where the per-step seeds of z come from.
    """

    def __init__(self, model, optimizer, lr_scheduler, cfg, seed=0):
        self.model, self.optimizer, self.lr_scheduler, self.cfg = model, optimizer, lr_scheduler, cfg
        self.last_seed = self.last_projected_grad = self.last_coef = self.last_loss_spread = None
        self.last_zo_grad = {}
        self._seeds = torch.Generator().manual_seed(int(seed))
        self.head_params = [p for n, p in model.named_parameters() if p.requires_grad and belongs_to_heads(n)]
        self.estimator = ESTIMATORS[cfg.estimator](model, cfg, self._seeds, self.loss) if cfg.uses_zo else None
        self.zo_names = self.estimator.names if self.estimator else []
        self.zo_params = self.estimator.params if self.estimator else []

    @property
    def zo_group(self):
        """The optimizer's parameter group holding the ZO set, whose lr and weight decay FZOO's own
        step reads (the scheduler keeps the lr current)."""
        ids = {id(p) for p in self.zo_params}
        holding = [g for g in self.optimizer.param_groups if ids & {id(p) for p in g["params"]}]
        if len(holding) != 1:
            raise ValueError(f"fzoo updates the ZO set itself at its group's lr: the set must lie in one "
                             f"parameter group of the optimizer, found it in {len(holding)}")
        return holding[0]

    def loss(self, inputs, labels, soft_targets=None, heads_backward=False):
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

    def zo_gradient(self, inputs, labels, use_sign=False, current=0, train_heads=False):
        """The ZO passes alone: g_zo for the ZO set by the estimator (two-point ones averaged over q
        directions) and the loss; `current` (the iteration) times Sparse MeZO's mask. With
        train_heads, one of the passes (L(θ) where the estimator evaluates it, else the first
        L(θ−εz)) also accumulates the heads' gradient of the whole batch's loss on its features.

        Also kept as `last_zo_grad` / `last_projected_grad` / `last_loss_spread` / `last_seed`; the
        ZO set is left bit-identical. The loss is L(θ) where the estimator evaluates it (HiZOO,
        FZOO), else the mean of L±.
        """
        estimate = self.estimator.gradient(inputs, labels, current, train_heads, use_sign)
        self.last_seed, self.last_projected_grad, self.last_loss_spread = (estimate.seed, estimate.projected,
                                                                           estimate.spread)
        self.last_zo_grad = dict(zip(self.zo_names, estimate.grads))
        return estimate.grads, estimate.loss

    def update(self):
        """The optimizer's step, then the schedule's."""
        self.optimizer.step()
        self.lr_scheduler.step()

    def rng_state(self):
        """What a resumed run needs to draw the same z: the state of the generator the step seeds
        come from, and with it, where the estimator keeps one, its buffers (HiZOO's Hessian
        diagonal "hessian" or Sparse MeZO's mask "frozen", both shape z)."""
        kept = self.estimator.state_dict() if self.estimator else {}
        return {"seeds": self._seeds.get_state(), **kept} if kept else self._seeds.get_state()

    def set_rng_state(self, state):
        if not isinstance(state, dict):
            self._seeds.set_state(state)
            return
        self._seeds.set_state(state["seeds"])
        self.estimator.load_state_dict(state)

    def step(self, inputs, labels, current, total, soft_targets=None):
        """One training step of the method on (inputs, labels); iteration `current` of `total`.
        Returns the loss: L(θ) for HiZOO and FZOO, the mean of L+ and L- for the other ZO steps."""
        return REGISTRY[self.cfg.method].step(self, inputs, labels, current, total, soft_targets=soft_targets)
