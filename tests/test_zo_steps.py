"""The zeroth-order steps beside H-Tuning (HiZOO, Sparse MeZO, FZOO) and H-Tuning with their
estimators: each estimate against what it estimates, and the guarantees every ZO step keeps."""
import copy
import statistics

import pytest
import torch
import torch.nn as nn

import main
from Half_Trainer import HalfTrainer
from test_trainer import SmoothNet, batch, lora_model, make_args, make_trainer, reference_loss, reference_step
from zo_estimators import HESSIAN_FLOOR, module_modes, zo_parameters

pytestmark = pytest.mark.usefixtures("one_thread")

NEW_ESTIMATORS = ("hizoo", "sparse_mezo", "fzoo")
# every step that uses a new estimate: the methods, and H-Tuning with each of their estimates
ZO_CASES = [(method, {}) for method in NEW_ESTIMATORS] + [
    ("htuning", {"zo_estimator": e, **({"fusion": "normalized"} if e == "fzoo" else {})}) for e in NEW_ESTIMATORS]
CASE_IDS = [f"{method}-{overrides.get('zo_estimator', 'own')}" for method, overrides in ZO_CASES]


def adamw_trainer(model, args, lr=0.05, weight_decay=0.1, seed=7):
    """A trainer with AdamW, as runs use (momentum and decoupled decay would move any coordinate)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return HalfTrainer(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), args, seed)


def smooth_trainer(method, seed=0, **overrides):
    """SmoothNet in float64 with a trainer that only estimates (lr 0), and autograd's gradient of
    the loss the ZO passes evaluate."""
    torch.manual_seed(seed)
    model = SmoothNet().double()
    x = torch.randn(16, 6, dtype=torch.float64)
    y = (torch.rand(16, 3) < 0.5).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    trainer = HalfTrainer(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                          make_args(method, **overrides), seed)
    with module_modes(model, "zo"):
        loss = reference_loss(model, x, y, trainer.cfg)
    true_grad = torch.autograd.grad(loss, trainer.zo_params)
    return model, x, y, trainer, torch.cat([g.reshape(-1) for g in true_grad])


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def rademacher_directions(seed, count, like):
    """FZOO's u_1..u_count as the trainer draws them: successive signs of normal draws from one seed."""
    g = torch.Generator().manual_seed(seed)
    return [torch.empty_like(like).normal_(generator=g).sign_() for _ in range(count)]


# ------------------------------------------------------------------------------------------------
# HiZOO
# ------------------------------------------------------------------------------------------------
CURVATURE = torch.tensor([0.5, 1.5, 4.0], dtype=torch.float64)


class QuadraticTrunk(nn.Module):
    """Three trunk weights and nothing else: the ZO set of a loss we choose."""

    def __init__(self):
        super().__init__()
        self.encoder_layers = nn.ParameterList([nn.Parameter(torch.zeros(3, dtype=torch.float64))])


def test_hizoo_hessian_estimate_converges_to_the_true_diagonal(monkeypatch):
    """On L = ½ Σ h_i θ_i² the moving average of HiZOO's estimate settles on h (each step's estimate
    is unbiased; the average over the last steps beats down its variance). An estimate that drops
    the −1, or averages magnitudes, settles far off (≥ 1.5x)."""
    model = QuadraticTrunk()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    trainer = HalfTrainer(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                          make_args("hizoo", hizoo_smoothing=2e-3, zo_eps=0.1), seed=3)
    theta = model.encoder_layers[0]
    monkeypatch.setattr(trainer.estimator, "loss", lambda inputs, labels, soft_targets=None, heads_backward=False:
                        0.5 * (CURVATURE * theta * theta).sum())
    steps, averaged = 6000, 4000
    estimate = torch.zeros(3, dtype=torch.float64)
    for step in range(steps):
        trainer.zo_gradient(None, None)
        if step >= steps - averaged:
            estimate += trainer.estimator.hessian / averaged
    torch.testing.assert_close(estimate, CURVATURE, rtol=0.25, atol=0)
    assert torch.equal(theta, torch.zeros(3, dtype=torch.float64))


def test_hizoo_probes_along_the_preconditioned_direction():
    """z = P^(-1/2) u: the projected gradient is the directional derivative of the loss along it."""
    model, x, y, trainer, true_grad = smooth_trainer("hizoo", hizoo_smoothing=0.0)
    curvature = torch.linspace(0.2, 5.0, true_grad.numel(), dtype=torch.float64)
    trainer.estimator.hessian.copy_(curvature)
    for _ in range(5):
        trainer.zo_gradient(x, y)
        u = torch.empty_like(curvature).normal_(generator=torch.Generator().manual_seed(trainer.last_seed))
        z = u / curvature.clamp_min(HESSIAN_FLOOR).sqrt()
        assert trainer.last_projected_grad == pytest.approx(float(z @ true_grad), rel=0.02)
        torch.testing.assert_close(flat(trainer.last_zo_grad.values()), trainer.last_projected_grad * z)


def test_hizoo_estimate_is_the_preconditioned_gradient_on_average():
    """E[(u·P^(-1/2)∇L) P^(-1/2) u] = P⁻¹ ∇L: closer to P⁻¹∇L than to the plain gradient."""
    model, x, y, trainer, true_grad = smooth_trainer("hizoo", seed=3, hizoo_smoothing=0.0)
    curvature = torch.linspace(0.2, 5.0, true_grad.numel(), dtype=torch.float64)
    trainer.estimator.hessian.copy_(curvature)
    draws = 1500
    average = torch.zeros_like(true_grad)
    for _ in range(draws):
        g_zo, _ = trainer.zo_gradient(x, y)
        average += flat(g_zo) / draws
    preconditioned = true_grad / curvature
    assert cosine(average, preconditioned) > 0.9
    assert cosine(average, preconditioned) > cosine(average, true_grad) + 0.05


def test_hizoo_refuses_directions_without_curvature_information():
    for overrides in ({"perturbation_mode": "rademacher"}, {"gradient_sparsity": 0.5}):
        with pytest.raises(ValueError, match="HiZOO"):
            make_args("hizoo", **overrides)
        with pytest.raises(ValueError, match="HiZOO"):
            make_args("htuning", zo_estimator="hizoo", **overrides)


# ------------------------------------------------------------------------------------------------
# Sparse MeZO
# ------------------------------------------------------------------------------------------------
def expected_perturbed(params, sparsity):
    """Per tensor, the weights Sparse MeZO may move: |w| at most its k-th smallest |w|."""
    masks = []
    for p in params:
        magnitude = p.detach().abs().reshape(-1)
        kept = magnitude.numel() - int(round(sparsity * magnitude.numel()))
        cut = magnitude.kthvalue(kept).values
        masks.append((magnitude <= cut).view_as(p))
    return masks


def untied_lora_model():
    """lora_model in float64 with every ZO weight drawn at random (B and the BatchNorm biases start
    at zero), so no tensor has ties at its cut."""
    model = lora_model("cpu", dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in zo_parameters(model):
            p.copy_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@pytest.mark.parametrize("sparsity", [0.75, 0.4])
def test_sparse_mezo_leaves_the_large_weights_alone_in_both_passes_and_the_update(sparsity):
    model = untied_lora_model()
    x, y = batch("cpu", dtype=torch.float64)
    trainer = adamw_trainer(model, make_args("sparse_mezo", sparse_mezo_sparsity=sparsity))
    seen = []
    model.classifier.register_forward_pre_hook(  # the heads run in both passes
        lambda m, a: seen.append([(p - b).ne(0) for p, b in zip(trainer.zo_params, base)]))
    for step in range(3):  # from the second step on, AdamW's momentum would move every coordinate
        base = [p.detach().clone() for p in trainer.zo_params]
        perturbed = expected_perturbed(trainer.zo_params, sparsity)
        seen.clear()
        trainer.step(x, y, step, 10)
        assert len(seen) == 2, "two ZO passes"
        for i, (p, before, movable) in enumerate(zip(trainer.zo_params, base, perturbed)):
            name = trainer.zo_names[i]
            assert int(movable.sum()) == movable.numel() - int(round(sparsity * movable.numel())), name
            assert torch.equal(seen[0][i], movable) and torch.equal(seen[1][i], movable), name
            assert torch.equal(p[~movable], before[~movable]), name
            assert torch.equal(trainer.last_zo_grad[name].ne(0), movable), name


def test_sparse_mezo_mask_kept_between_recomputations():
    model = untied_lora_model()
    x, y = batch("cpu", dtype=torch.float64)
    trainer = adamw_trainer(model, make_args("sparse_mezo", sparse_mezo_interval=3), lr=0.2)
    masks = []
    for step in range(4):
        expected = flat(expected_perturbed(trainer.zo_params, trainer.cfg.sparse_mezo_sparsity))
        trainer.step(x, y, step, 10)
        masks.append(~trainer.estimator.frozen.clone())
        if step % 3 == 0:
            assert torch.equal(masks[-1], expected)
    assert torch.equal(masks[1], masks[0]) and torch.equal(masks[2], masks[0])
    assert not torch.equal(masks[3], masks[0]), "the weights moved: the recomputed mask differs"


def test_sparse_mezo_perturbs_tied_weights_at_the_cut_together():
    """LoRA B starts at zero: all its weights tie at the cut, and all of them are perturbed."""
    model = lora_model("cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()
    trainer = make_trainer(model, make_args("sparse_mezo"))
    trainer.zo_gradient(*batch("cpu"))
    for name, g in trainer.last_zo_grad.items():
        if "lora_B" in name:
            assert bool(g.ne(0).all()), name


# ------------------------------------------------------------------------------------------------
# FZOO
# ------------------------------------------------------------------------------------------------
def test_fzoo_estimate_is_the_one_sided_difference_of_the_same_loss():
    model = lora_model("cpu", dtype=torch.float64)
    x, y = batch("cpu", dtype=torch.float64)
    trainer = make_trainer(model, make_args("fzoo", fzoo_directions=4))
    trainer.zo_gradient(x, y)
    params = [p for _, p in zo_parameters(model)]
    directions = rademacher_directions(trainer.last_seed, 4, flat(params))
    losses = []
    for u in [torch.zeros_like(directions[0]), *directions]:
        probe = copy.deepcopy(model)
        with torch.no_grad(), module_modes(probe, "zo"):
            torch.nn.utils.vector_to_parameters(flat(params) + 1e-3 * u, [p for _, p in zo_parameters(probe)])
            losses.append(float(reference_loss(probe, x, y, trainer.cfg)))
    expected = sum((loss - losses[0]) / 1e-3 * u for loss, u in zip(losses[1:], directions)) / 4
    torch.testing.assert_close(flat(trainer.last_zo_grad.values()), expected, rtol=1e-6, atol=1e-9)
    assert trainer.last_loss_spread == pytest.approx(statistics.stdev(losses[1:]), rel=1e-9)


def test_fzoo_estimate_agrees_with_the_gradient_per_draw_and_in_expectation():
    """Per draw, with a small ε, each one-sided slope is autograd's directional derivative; over
    many draws the estimate averages to the gradient itself (Rademacher: E[u uᵀ] = I)."""
    model, x, y, trainer, true_grad = smooth_trainer("fzoo", seed=3, zo_eps=1e-6)
    draws, directions = 400, trainer.cfg.fzoo_directions
    average = torch.zeros_like(true_grad)
    for _ in range(draws):
        g_zo, _ = trainer.zo_gradient(x, y)
        estimate = flat(g_zo)
        exact_slopes = sum((u @ true_grad) * u for u in rademacher_directions(trainer.last_seed, directions,
                                                                               true_grad)) / directions
        torch.testing.assert_close(estimate, exact_slopes, rtol=1e-3, atol=1e-4 * float(true_grad.norm()))
        average += estimate / draws
    assert cosine(average, true_grad) > 0.95
    assert float((average - true_grad).norm() / true_grad.norm()) < 0.3


def test_fzoo_step_is_lr_over_the_losses_spread_with_adamw_decay_and_leaves_the_trunk_out_of_adamw():
    model = lora_model("cpu", dtype=torch.float64)
    x, y = batch("cpu", dtype=torch.float64)
    trainer = adamw_trainer(model, make_args("fzoo"), lr=0.05, weight_decay=0.1)
    heads_before = {n: p.detach().clone() for n, p in model.named_parameters()
                    if p.requires_grad and n not in trainer.zo_names}
    before = [p.detach().clone() for p in trainer.zo_params]
    trainer.step(x, y, 0, 10)
    ratio = 0.05 * trainer.cfg.zo_eps / trainer.last_loss_spread
    for p, b, g in zip(trainer.zo_params, before, trainer.last_zo_grad.values()):
        torch.testing.assert_close(p, b * (1 - 0.05 * 0.1) - ratio * g, rtol=0, atol=1e-12)
        assert p not in trainer.optimizer.state
    assert all(not torch.equal(p, heads_before[n]) for n, p in model.named_parameters() if n in heads_before)


# ------------------------------------------------------------------------------------------------
# What every step with a new estimate keeps
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, overrides", ZO_CASES, ids=CASE_IDS)
def test_zo_passes_restore_the_zo_set_bit_exactly(method, overrides):
    model = lora_model("cpu")
    x, y = batch("cpu")
    trainer = make_trainer(model, make_args(method, zo_eps=0.37, **overrides))  # +e, -2e, +e would not round-trip
    before = [p.detach().clone() for p in trainer.zo_params]
    for current in range(3):
        trainer.zo_gradient(x, y, current=current)
    assert all(torch.equal(p, b) for p, b in zip(trainer.zo_params, before))


@pytest.mark.parametrize("method, overrides", ZO_CASES, ids=CASE_IDS)
def test_step_keeps_frozen_parameters_and_the_global_rng_and_is_deterministic(method, overrides):
    x, y = batch("cpu")
    finals = []
    for _ in range(2):
        model = lora_model("cpu")
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        trainer = adamw_trainer(model, make_args(method, **overrides))
        torch.manual_seed(1234)
        state = torch.get_rng_state()
        losses = [trainer.step(x, y, step, 10) for step in range(2)]
        assert torch.equal(torch.get_rng_state(), state)
        assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
        finals.append((losses, [p.detach().clone() for p in model.parameters()]))
    (losses_a, params_a), (losses_b, params_b) = finals
    assert losses_a == losses_b and all(torch.equal(a, b) for a, b in zip(params_a, params_b))
    assert all(torch.isfinite(torch.tensor(losses_a)))


@pytest.mark.parametrize("method, overrides", ZO_CASES, ids=CASE_IDS)
def test_rng_state_carries_what_shapes_z(method, overrides):
    """A trainer restored from rng_state() takes the same next step as the one it was taken from."""
    x, y = batch("cpu")
    model = lora_model("cpu")
    trainer = adamw_trainer(model, make_args(method, sparse_mezo_interval=2, hizoo_smoothing=0.1, **overrides))
    trainer.step(x, y, 0, 10)
    resumed_model = copy.deepcopy(model)
    resumed = adamw_trainer(resumed_model, trainer.cfg, seed=99)
    resumed.optimizer.load_state_dict(copy.deepcopy(trainer.optimizer.state_dict()))  # else it shares tensors
    resumed.set_rng_state(trainer.rng_state())
    for continued in (trainer, resumed):
        torch.manual_seed(0)  # dropout in the FO pass draws from the global RNG
        continued.step(x, y, 1, 10)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))


def test_htuning_two_point_default_is_todays_step():
    """The estimator option changes nothing by default: two_point is the default, and H-Tuning with it
    matches test_trainer's per-parameter reference of the fused step."""
    assert main.zo_estimator == "two_point" and make_args("htuning").estimator == "two_point"
    x, y = batch("cpu", dtype=torch.float64)
    runs = []
    for overrides in ({}, {"zo_estimator": "two_point"}):
        model = lora_model("cpu", dtype=torch.float64)
        reference = copy.deepcopy(model)
        args = make_args("htuning", **overrides)
        trainer = make_trainer(model, args)
        for current in (0, 30):
            trainer.step(x, y, current, 100)
            projected = reference_step(reference, x, y, args, trainer.last_seed, current, 100)
            assert trainer.last_projected_grad == pytest.approx(projected, rel=1e-5, abs=1e-7)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=f"{name} differs from the reference")
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("flags, named", [
    (["--zo_estimator", "adam"], "--zo_estimator"),
    (["--hizoo_smoothing", "1.5"], "--hizoo_smoothing"),
    (["--sparse_mezo_sparsity", "1"], "--sparse_mezo_sparsity"),
    (["--sparse_mezo_interval", "0"], "--sparse_mezo_interval"),
    (["--fzoo_directions", "1"], "--fzoo_directions"),
])
def test_main_refuses_bad_values_of_the_new_knobs(flags, named, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(main, "locate_datasets", lambda *a: pytest.fail("a bad flag must stop before any work"))
    with pytest.raises(SystemExit) as stop:
        main.main([*flags, "--demo_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and named in err[0]
