"""Half_Trainer against a plain per-parameter reference of the step, and its memory/RNG/mode guarantees."""
import copy

import pytest
import torch
import torch.nn as nn

import main
from Half_Trainer import HalfTrainer, compute_loss, mixing_coefficient
from model_src_ecg import build_model, mark_only_lora_as_trainable
from zo_estimators import module_modes, zo_parameters

SAMPLES = 1024          # 16 tokens: every code path of the backbone, at a fraction of the cost
NUM_CLASS = 5
BATCH, BP_BATCH = 6, 2
LR = 0.05

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def make_args(method="htuning", **overrides):
    """The step's settings: main.py's defaults (zo_eps 1e-3, q 1, aux_weight 1, ...) with these."""
    return main.step_config(zo_config=method, **{"bp_batch": BP_BATCH, **overrides})


def make_trainer(model, args, seed=7):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=LR)
    return HalfTrainer(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), args, seed)


def lora_model(device, seed=0, r=4, dtype=torch.float32):
    torch.manual_seed(seed)
    model = build_model("tinylight", NUM_CLASS, r=r, positive_probably=0.3).to(device, dtype)
    with torch.no_grad():  # random adapters, so the LoRA path is not a no-op
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    mark_only_lora_as_trainable(model)
    return model


def batch(device, seed=1, batch_size=BATCH, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 12, 1, SAMPLES, generator=g)
    y = (torch.rand(batch_size, NUM_CLASS, generator=g) < 0.4).float()
    return x.to(device, dtype), y.to(device, dtype)


# ------------------------------------------------------------------------------------------------
# The reference: the step written parameter by parameter, on a deep copy, from the same step seed.
# ------------------------------------------------------------------------------------------------
def reference_z(params, seed, args):
    """z as the trainer defines it: one flat normal draw from `seed`, split in parameter order."""
    g = torch.Generator(device=params[0].device).manual_seed(seed)
    flat = torch.empty(sum(p.numel() for p in params), device=params[0].device, dtype=params[0].dtype)
    flat.normal_(generator=g)
    if args.perturbation_mode == "rademacher":
        flat = flat.sign()
    zs = [v.view_as(p).clone() for v, p in zip(flat.split([p.numel() for p in params]), params)]
    if args.gradient_sparsity is not None:
        for z in zs:
            dropped = int(round(args.gradient_sparsity * z.numel()))
            z.view(-1)[torch.randperm(z.numel(), generator=g, device=z.device)[:dropped]] = 0
    return zs


def reference_loss(model, x, y, args, soft=None):
    aux, main = model(x)
    return compute_loss(aux, main, y, args.aux_weight, soft)


def reference_step(model, x, y, args, seed, current, total, soft=None):
    """One fused step on `model`, per parameter and without any of the trainer's machinery."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    zo = [p for _, p in zo_parameters(model)]
    heads = [p for n, p in model.named_parameters() if p.requires_grad and "classifier" in n]
    head_grads = None
    if args.method in ("htuning", "zo", "zo_sign"):
        zs = reference_z(zo, seed, args)
        with torch.no_grad(), module_modes(model, "zo"):
            for p, z in zip(zo, zs):
                p.add_(args.zo_eps * z)
            loss_plus = reference_loss(model, x, y, args)
            for p, z in zip(zo, zs):
                p.sub_(2 * args.zo_eps * z)
            features = model.feature_extraction(x)  # one forward: BatchNorm's running statistics move once
            with torch.enable_grad():
                aux, main = model.heads(features)
                loss_minus = compute_loss(aux, main, y, args.aux_weight)
                if args.method != "htuning" or args.head_rule == "whole_batch":  # heads: whole batch, at θ − εz
                    head_grads = torch.autograd.grad(loss_minus, heads)
            for p, z in zip(zo, zs):
                p.add_(args.zo_eps * z)
        projected = float((loss_plus - loss_minus.detach()) / (2 * args.zo_eps))
        scale = float(torch.sign(torch.tensor(projected))) if args.method == "zo_sign" else projected
        g_zo = [scale * z for z in zs]
    optimizer.zero_grad()
    if args.method == "htuning":
        with module_modes(model, "fo"):
            reference_loss(model, x[:args.bp_batch], y[:args.bp_batch], args).backward()
        c = args.coef if args.coef is not None else mixing_coefficient(current, total)
        if args.fusion == "projection":
            along = (projected - sum(float((z * p.grad).sum()) for z, p in zip(zs, zo))) / sum(
                float((z * z).sum()) for z in zs)
            for p, z in zip(zo, zs):
                p.grad = p.grad + along * z
        for p, gz in zip(zo, g_zo):
            if args.fusion == "agreement":
                cos = float((p.grad * gz).sum()) / (float(p.grad.norm() * gz.norm()) + 1e-6)
                c_t = 1 - (1 - c) * max(cos, 0.0)
            elif args.fusion == "normalized":
                c_t = c
            else:
                continue
            p.grad = c_t * p.grad + (1 - c_t) * p.grad.norm() * gz / (gz.norm() + 1e-6)
    elif args.method in ("zo", "zo_sign"):
        for p, gz in zip(zo, g_zo):
            p.grad = gz
    elif args.method == "lora_bp_accum":  # the whole batch at once, in the FO pass's modes
        with module_modes(model, "fo"):
            reference_loss(model, x, y, args).backward()
    else:
        model.train()
        reference_loss(model, x, y, args, soft).backward()
    if head_grads is not None:
        for p, g in zip(heads, head_grads):
            p.grad = g
    optimizer.step()
    return projected if args.method in ("htuning", "zo", "zo_sign") else None


STEP_CASES = [
    ("htuning", {}),
    ("htuning", {"coef": 0.5}),
    ("htuning", {"gradient_sparsity": 0.4}),
    ("htuning", {"perturbation_mode": "rademacher"}),
    ("htuning", {"head_rule": "bp_batch"}),
    ("htuning", {"fusion": "agreement"}),
    ("htuning", {"fusion": "projection"}),
    ("htuning", {"fusion": "projection", "gradient_sparsity": 0.4}),
    ("zo", {}),
    ("zo_sign", {}),
    ("lora_bp", {}),
    ("lora_bp_accum", {}),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("trainer_name,overrides", STEP_CASES)
def test_step_matches_reference(device, trainer_name, overrides):
    """In float64, so that the comparison sees the algorithm, not float32 rounding of L+ - L-."""
    model = lora_model(device, dtype=torch.float64)
    reference = copy.deepcopy(model)
    x, y = batch(device, dtype=torch.float64)
    args = make_args(trainer_name, **overrides)
    trainer = make_trainer(model, args)
    for current in (0, 30):  # both sides of the coefficient switch at 20% of 100 iterations
        trainer.step(x, y, current, 100)
        projected = reference_step(reference, x, y, args, trainer.last_seed, current, 100)
        if projected is not None:
            assert trainer.last_projected_grad == pytest.approx(projected, rel=1e-5, abs=1e-7)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=f"{name} differs from the reference")


@pytest.mark.parametrize("device", DEVICES)
def test_distillation_step_matches_reference(device):
    model = lora_model(device, dtype=torch.float64)
    reference = copy.deepcopy(model)
    x, y = batch(device, dtype=torch.float64)
    soft = torch.sigmoid(torch.randn_like(y))
    args = make_args("lora_bp")
    make_trainer(model, args).step(x, y, 0, 10, soft_targets=soft)
    reference_step(reference, x, y, args, None, 0, 10, soft=soft)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_projected_grad_is_the_central_difference_of_the_same_loss():
    """The Fix: both sides evaluate the full loss (aux term and gating included)."""
    model = lora_model("cpu", dtype=torch.float64)
    x, y = batch("cpu", dtype=torch.float64)
    trainer = make_trainer(model, make_args())
    trainer.zo_gradient(x, y)
    zo = [p for _, p in zo_parameters(model)]
    zs = reference_z(zo, trainer.last_seed, trainer.cfg)
    losses = []
    for sign in (1, -1):
        probe = copy.deepcopy(model)
        with torch.no_grad(), module_modes(probe, "zo"):
            for p, z in zip([p for _, p in zo_parameters(probe)], zs):
                p.add_(sign * 1e-3 * z)
            losses.append(float(reference_loss(probe, x, y, trainer.cfg)))
    assert trainer.last_projected_grad == pytest.approx((losses[0] - losses[1]) / 2e-3, rel=1e-6)


class SmoothNet(nn.Module):
    """A small smooth stand-in with the backbone's interface, for derivative checks in float64."""

    def __init__(self):
        super().__init__()
        self.encoder_layers = nn.ModuleList([nn.Linear(6, 8), nn.LayerNorm(8)])
        self.transformer_layers = nn.ModuleList([nn.Linear(8, 8)])
        self.classifier = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3))
        self.auxiliary_classifier = nn.Sequential(nn.Linear(8, 4), nn.LeakyReLU(), nn.Linear(4, 1))

    def feature_extraction(self, x):
        h = torch.tanh(self.encoder_layers[1](self.encoder_layers[0](x)))
        return torch.tanh(self.transformer_layers[0](h))

    def heads(self, features):
        return self.auxiliary_classifier(features), self.classifier(features)

    def forward(self, x):
        return self.heads(self.feature_extraction(x))


def smooth_setup(seed=0):
    torch.manual_seed(seed)
    model = SmoothNet().double()
    x = torch.randn(16, 6, dtype=torch.float64)
    y = (torch.rand(16, 3) < 0.5).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # estimates only: parameters stay put
    trainer = HalfTrainer(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                          make_args("zo"), seed)
    with module_modes(model, "zo"):
        loss = reference_loss(model, x, y, trainer.cfg)
    true_grad = torch.autograd.grad(loss, trainer.zo_params)
    return model, x, y, trainer, true_grad


def test_projected_grad_agrees_with_the_directional_derivative():
    model, x, y, trainer, true_grad = smooth_setup()
    for _ in range(5):
        trainer.zo_gradient(x, y)
        zs = reference_z(trainer.zo_params, trainer.last_seed, trainer.cfg)
        directional = sum(float((z * g).sum()) for z, g in zip(zs, true_grad))
        assert trainer.last_projected_grad == pytest.approx(directional, rel=0.05)


def test_zo_gradient_points_along_the_true_gradient_on_average():
    model, x, y, trainer, true_grad = smooth_setup(seed=3)
    average = [torch.zeros_like(g) for g in true_grad]
    draws = 2000
    for _ in range(draws):
        g_zo, _ = trainer.zo_gradient(x, y)
        torch._foreach_add_(average, g_zo, alpha=1 / draws)
    flat_avg, flat_true = torch.cat([a.view(-1) for a in average]), torch.cat([g.view(-1) for g in true_grad])
    assert float(torch.nn.functional.cosine_similarity(flat_avg, flat_true, dim=0)) > 0.9


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("trainer_name", ["htuning", "zo", "zo_sign", "lora_bp", "probe"])
def test_frozen_parameters_are_bit_identical(device, trainer_name):
    model = lora_model(device)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen
    x, y = batch(device)
    make_trainer(model, make_args(trainer_name)).step(x, y, 0, 10)
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name


@pytest.mark.parametrize("device", DEVICES)
def test_zo_passes_restore_the_zo_set_bit_exactly(device):
    model = lora_model(device)
    x, y = batch(device)
    trainer = make_trainer(model, make_args(zo_eps=0.37))  # a large eps: +e, -2e, +e would not round-trip
    before = [p.detach().clone() for p in trainer.zo_params]
    for _ in range(3):
        trainer.zo_gradient(x, y)
    assert all(torch.equal(p, b) for p, b in zip(trainer.zo_params, before))


def test_zo_passes_save_no_activations():
    model = lora_model("cpu")
    x, y = batch("cpu")
    trainer = make_trainer(model, make_args())
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.zo_gradient(x, y)
        assert sum(saved) == 0
        reference_loss(model, x, y, trainer.cfg)  # control: a graph-building forward is seen
    assert sum(saved) > 0


def test_module_modes_in_each_phase_and_restored_after():
    model = lora_model("cpu")
    x, y = batch("cpu")
    watched = {"bn": model.encoder_layers[0].bn1, "ln": model.transformer_layers[0].norm1,
               "conv": model.encoder_layers[0].conv1, "head": model.classifier[0]}
    seen = []  # the heads run in every pass, the second ZO pass's included (it trains them)
    model.classifier.register_forward_pre_hook(lambda m, a: seen.append({k: w.training for k, w in watched.items()}))
    trainer = make_trainer(model, make_args())
    for initial in (True, False):
        model.train(initial)
        modes_before = [m.training for m in model.modules()]
        seen.clear()
        trainer.step(x, y, 0, 10)
        zo_mode = {"bn": True, "ln": True, "conv": False, "head": False}
        fo_mode = {"bn": False, "ln": True, "conv": True, "head": True}
        assert seen == [zo_mode, zo_mode, fo_mode]
        assert [m.training for m in model.modules()] == modes_before


@pytest.mark.parametrize("size, bp_batch", [(BATCH, BP_BATCH), (7, 3)])
def test_accumulated_gradient_is_the_whole_batch_gradient(size, bp_batch):
    """lora_bp_accum: micro-batches of bp_batch (the last one shorter where they do not divide the
    batch), each weighted by its share, sum to the gradient of the whole batch in the FO pass's
    modes (BatchNorm on its running statistics), to 1e-6 in float64."""
    model = lora_model("cpu", dtype=torch.float64)
    with torch.no_grad():  # running statistics that are not the identity, so eval-mode BatchNorm matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(std=0.1)
                m.running_var.uniform_(0.5, 1.5)
    reference = copy.deepcopy(model)
    x, y = batch("cpu", batch_size=size, dtype=torch.float64)
    trainer = make_trainer(model, make_args("lora_bp_accum", bp_batch=bp_batch))
    micro_batches = []
    model.classifier.register_forward_pre_hook(lambda m, a: micro_batches.append(len(a[0])))
    loss = trainer.step(x, y, 0, 10)   # the step leaves its gradients in .grad
    assert micro_batches == [min(bp_batch, size - start) for start in range(0, size, bp_batch)]
    with module_modes(reference, "fo"):
        whole = reference_loss(reference, x, y, trainer.cfg)
        whole.backward()
    assert loss == pytest.approx(float(whole.detach()), rel=1e-9)
    trained = [(name, p, q) for (name, p), q in zip(model.named_parameters(), reference.parameters()) if p.requires_grad]
    assert max(float(q.grad.abs().max()) for _, _, q in trained) > 1e-3   # not a comparison of zeros
    for name, p, q in trained:
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-6, msg=f"{name}: accumulated gradient differs")


@pytest.mark.parametrize("running_stats", ["frozen", "refreshed"])
def test_accumulation_refreshes_batch_norm_statistics_only_when_asked(running_stats):
    """bn_running_stats "refreshed": one no-grad train-mode forward of the batch folds its moments
    into the running statistics (once), and the micro-batches then backpropagate on them; "frozen"
    leaves the backbone's statistics as they are. Either way the gradient is the whole batch's in
    the FO pass's modes, on the statistics in force."""
    model = lora_model("cpu", dtype=torch.float64)
    reference = copy.deepcopy(model)
    x, y = batch("cpu", dtype=torch.float64)
    trainer = make_trainer(model, make_args("lora_bp_accum", bn_running_stats=running_stats))
    trainer.step(x, y, 0, 1)
    if running_stats == "refreshed":
        with torch.no_grad(), module_modes(reference, "zo"):
            reference.feature_extraction(x)
    with module_modes(reference, "fo"):
        reference_loss(reference, x, y, trainer.cfg).backward()
    norms = [(a, b) for a, b in zip(model.modules(), reference.modules()) if isinstance(a, nn.BatchNorm2d)]
    assert all(int(a.num_batches_tracked) == (running_stats == "refreshed") for a, _ in norms)
    for a, b in norms:
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=0, atol=1e-12)
    for p, q in zip(model.parameters(), reference.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-6)


def test_coefficient_schedule():
    assert mixing_coefficient(0, 100) == 0.99
    assert mixing_coefficient(19, 100) == 0.99
    assert mixing_coefficient(20, 100) == 0.9
    assert mixing_coefficient(99, 100) == 0.9


@pytest.mark.parametrize("sparsity", [0.25, {"encoder_layers.0.conv1.lora_A": 0.5}])
def test_sparsity_is_exact_and_one_mask_serves_every_use_of_z(sparsity):
    model = lora_model("cpu")
    x, y = batch("cpu")
    trainer = make_trainer(model, make_args(gradient_sparsity=sparsity))
    base = [p.detach().clone() for p in trainer.zo_params]
    perturbations = []
    model.classifier.register_forward_pre_hook(
        lambda m, a: perturbations.append([(p - b).ne(0) for p, b in zip(trainer.zo_params, base)]))
    trainer.zo_gradient(x, y)
    fractions = sparsity if isinstance(sparsity, dict) else dict.fromkeys(trainer.zo_names, sparsity)
    for i, name in enumerate(trainer.zo_names):
        g = trainer.last_zo_grad[name]
        expected_zeros = int(round(fractions.get(name, 0.0) * g.numel()))
        assert int((g == 0).sum()) == expected_zeros, name
        assert torch.equal(perturbations[0][i], g.ne(0)) and torch.equal(perturbations[1][i], g.ne(0)), name


@pytest.mark.parametrize("trainer_name", ["htuning", "zo", "zo_sign"])
def test_global_rng_untouched_and_steps_deterministic(trainer_name):
    x, y = batch("cpu")
    finals = []
    for _ in range(2):
        model = lora_model("cpu")
        trainer = make_trainer(model, make_args(trainer_name))
        torch.manual_seed(1234)
        state = torch.get_rng_state()
        for step in range(2):
            trainer.step(x, y, step, 10)
        assert torch.equal(torch.get_rng_state(), state)
        finals.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*finals))


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown method 'adam'"):
        make_trainer(lora_model("cpu"), make_args("adam"))
