"""The L-BiTMix family: shapes, budget, LoRA, merge, receptive field, training steps, checkpoints."""
import pytest
import torch

import main
from Half_Trainer import HalfTrainer, compute_loss
from model_src_ecg import (LBITMIX_CONFIGS, LBiTMix, LBiTMixConfig, adapter_state_dict, build_model, load_adapter_state,
                           load_pretrained, mark_only_lora_as_trainable, receptive_field)
from zo_estimators import module_modes, zo_parameters

SAMPLES = 1024           # 32 trunk steps: every code path at a fraction of the cost
FULL_SAMPLES = 6144
NUM_CLASS = 5
TINYLIGHT_PARAMETERS = 258_833   # at 16 classes, r=0
ECG_HZ = 500


def signals(batch, seed=0, samples=SAMPLES, dtype=torch.float32):
    return torch.randn(batch, 12, 1, samples, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def labels(batch, seed=1, dtype=torch.float32):
    return (torch.rand(batch, NUM_CLASS, generator=torch.Generator().manual_seed(seed)) < 0.4).to(dtype)


def adapted_model(r=4, seed=0, dtype=torch.float32):
    """lbitmix-tiny with random adapters (so the LoRA path is not a no-op), LoRA-trainable set marked."""
    torch.manual_seed(seed)
    net = build_model("lbitmix-tiny", NUM_CLASS, r=r, positive_probably=0.3).to(dtype)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    mark_only_lora_as_trainable(net)
    return net


@pytest.mark.parametrize("samples", [SAMPLES, FULL_SAMPLES])
def test_shapes(samples):
    net = build_model("lbitmix-tiny", NUM_CLASS, r=4).eval()
    cfg = LBITMIX_CONFIGS["lbitmix-tiny"]
    x = signals(3, samples=samples)
    with torch.no_grad():
        aux, main = net(x)
        assert net.feature_map(x).shape == (3, cfg.width, 1, samples // cfg.downsample)
        assert net.feature_extraction(x).shape == (3, 2 * cfg.width)
    assert aux.shape == (3, 1) and main.shape == (3, NUM_CLASS)
    assert isinstance(net, LBiTMix)


def test_bad_input_is_a_clear_error():
    net = build_model("lbitmix-tiny", NUM_CLASS)
    with pytest.raises(ValueError, match="expected input"):
        net(torch.zeros(2, 12, SAMPLES))
    with pytest.raises(ValueError, match="at least 32"):
        net(torch.zeros(2, 12, 1, 16))
    with pytest.raises(ValueError, match="rank_list has 3 entries"):
        build_model("lbitmix-tiny", NUM_CLASS, r=[4, 4, 4])
    with pytest.raises(ValueError, match="skips samples"):
        LBiTMix(NUM_CLASS, LBiTMixConfig(stem_channels=8, width=16, dilations=(1,), down_kernel=3), 12, [0] * 6)


def test_parameter_budget():
    with torch.device("meta"):
        tiny = sum(p.numel() for p in build_model("lbitmix-tiny", 16).parameters())
        tinylight = sum(p.numel() for p in build_model("tinylight", 16).parameters())
        teacher = sum(p.numel() for p in build_model("lbitmix", 16).parameters())
    assert tinylight == TINYLIGHT_PARAMETERS
    assert tiny <= tinylight
    assert teacher >= 2_000_000


def test_per_layer_ranks_and_trainable_set():
    """Ranks land on the layers in the documented order; the LoRA rule freezes all but adapters,
    biases and classifier.1.weight; a layer of rank 0 has no adapter."""
    cfg = LBITMIX_CONFIGS["lbitmix-tiny"]
    ranks = list(range(1, cfg.num_layers + 1))
    adapted = ["stem.conv", "stem.down"] + [f"blocks.{i}.{p}" for i in range(len(cfg.dilations))
                                                 for p in ("expand", "project")] + ["classifier.0"]
    assert len(adapted) == cfg.num_layers - 1
    ranks[adapted.index("blocks.0.project")] = 0
    net = build_model("lbitmix-tiny", NUM_CLASS, r=ranks)
    state = net.state_dict()
    for name, rank in zip(adapted, ranks):
        if rank:
            assert state[f"{name}.lora_A"].shape[0] == rank and state[f"{name}.lora_B"].shape[1] == rank, name
        else:
            assert f"{name}.lora_A" not in state, name
    assert state["auxiliary_classifier.0.lora_A"].shape[0] == ranks[-2]
    assert "classifier.1.lora_A" not in state
    mark_only_lora_as_trainable(net)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert {"stem.conv.lora_A", "blocks.0.depthwise.bias", "blocks.0.bn2.bias", "classifier.1.weight"} <= trainable
    for frozen in ("stem.conv.conv.weight", "blocks.0.depthwise.weight", "blocks.0.bn1.weight",
                   "blocks.0.project.conv.weight", "classifier.0.weight", "auxiliary_classifier.2.weight"):
        assert frozen not in trainable, frozen


def test_lora_state_dicts_load_strictly_both_ways():
    """A model's state loads strictly into a fresh one of the same config and ranks and back;
    the adapter snapshot reloads through load_adapter_state and reproduces the outputs."""
    source = adapted_model().eval()
    target = build_model("lbitmix-tiny", NUM_CLASS, r=4, positive_probably=0.3).eval()
    target.load_state_dict(source.state_dict(), strict=True)
    source.load_state_dict(target.state_dict(), strict=True)
    x = signals(2)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
    fresh = build_model("lbitmix-tiny", NUM_CLASS, r=4, positive_probably=0.3).eval()
    fresh.load_state_dict({k: v for k, v in source.state_dict().items() if k not in adapter_state_dict(source)},
                          strict=False)
    load_adapter_state(fresh, adapter_state_dict(source))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), source(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not fit"):
        load_adapter_state(build_model("lbitmix-tiny", NUM_CLASS, r=8), adapter_state_dict(source))


def test_merging_preserves_outputs_and_happens_once():
    net = adapted_model().eval()
    x = signals(3)
    with torch.no_grad():
        before = net(x)
        net.merge_net()
        assert net.merged
        after = net(x)
        net.merge_net()
        again = net(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, after, rtol=0, atol=0)
    unmerged = build_model("lbitmix-tiny", NUM_CLASS, r=4, positive_probably=0.3).eval()
    unmerged.load_state_dict(net.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(unmerged(x), after, rtol=0, atol=0)


OTHER_GEOMETRY = LBiTMixConfig(stem_channels=8, width=16, dilations=(1, 3), stem_kernel=9, stem_stride=4,
                               down_kernel=15, down_stride=2)


@pytest.mark.parametrize("cfg", [*(LBITMIX_CONFIGS[name] for name in sorted(LBITMIX_CONFIGS)), OTHER_GEOMETRY])
def test_receptive_field_is_the_impulse_response_span(cfg):
    """In eval mode (no batch statistics) the input samples with a nonzero gradient for one trunk step in
    the middle span exactly receptive_field(cfg) samples, as far into the future as into the past."""
    field = receptive_field(cfg)
    samples = cfg.downsample * (field // cfg.downsample + 4)
    net = LBiTMix(NUM_CLASS, cfg, 12, [0] * cfg.num_layers).double().eval()
    x = signals(1, samples=samples, dtype=torch.float64).requires_grad_(True)
    step = samples // cfg.downsample // 2
    net.feature_map(x)[0, :, 0, step].sum().backward()
    touched = torch.nonzero(x.grad[0].abs().sum(dim=(0, 1))).flatten()
    first, last = int(touched[0]), int(touched[-1])
    assert last - first + 1 == field
    centre = cfg.downsample * step
    assert centre - first == last - centre == (field - 1) // 2


def test_named_receptive_fields_cover_two_seconds():
    assert receptive_field(LBITMIX_CONFIGS["lbitmix-tiny"]) == 2927  # the figures the module docstring states
    assert receptive_field(LBITMIX_CONFIGS["lbitmix"]) == 5807
    assert all(receptive_field(cfg) >= 2 * ECG_HZ for cfg in LBITMIX_CONFIGS.values())


def make_args(method, **overrides):
    """The step's settings: main.py's defaults with these."""
    return main.step_config(zo_config=method, **{"bp_batch": 2, **overrides})


def make_trainer(net, args):
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.05)
    return HalfTrainer(net, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), args, seed=7)


def test_zo_set_and_module_modes_follow_the_head_names():
    net = adapted_model()
    zo_names = [n for n, _ in zo_parameters(net)]
    assert "stem.conv.lora_A" in zo_names and "blocks.3.project.lora_B" in zo_names
    assert not any(n.startswith(("classifier.", "auxiliary_classifier.")) for n in zo_names)
    seen = {}
    with module_modes(net, "zo"):
        seen["zo"] = {n: m.training for n, m in net.named_modules()}
    with module_modes(net, "fo"):
        seen["fo"] = {n: m.training for n, m in net.named_modules()}
    assert seen["zo"]["stem.bn1"] and seen["zo"]["blocks.2.bn2"]
    assert not seen["zo"]["blocks.2.depthwise"] and not seen["zo"]["classifier.0"] and not seen["zo"][""]
    assert not seen["fo"]["stem.bn1"] and seen["fo"]["blocks.2.expand"] and seen["fo"]["classifier.0"]


def test_zo_estimate_agrees_with_the_directional_derivative():
    """The H-Tuning two-point estimate (float64, small eps) equals autograd's derivative along its z.

    Autograd differentiates the loss without the gate: the gate keeps the values (all the two-point
    estimate sees) and only withholds gradient from the main head's rows the aux head calls normal.
    The net is piecewise smooth (leaky_relu, max over time): eps is small enough that the two points
    lie on one smooth piece.
    """
    net = adapted_model(dtype=torch.float64)
    x, y = signals(6, dtype=torch.float64), labels(6, dtype=torch.float64)
    trainer = make_trainer(net, make_args("htuning", zo_eps=1e-7))
    with module_modes(net, "zo"):
        features = net.feature_extraction(x)
        aux, main = net.auxiliary_classifier(features), net.classifier(features)
        true_grad = torch.autograd.grad(compute_loss(aux, main, y, 1.0), trainer.zo_params)
    for _ in range(2):
        trainer.zo_gradient(x, y)
        flat = torch.empty(sum(p.numel() for p in trainer.zo_params), dtype=torch.float64)
        flat.normal_(generator=torch.Generator().manual_seed(trainer.last_seed))
        directional = float(torch.dot(flat, torch.cat([g.flatten() for g in true_grad])))
        assert trainer.last_projected_grad == pytest.approx(directional, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("trainer_name", ["htuning", "zo", "zo_sign", "lora_bp"])
def test_every_training_step_runs_and_moves_only_the_trainable_set(trainer_name):
    net = adapted_model()
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    loss = make_trainer(net, make_args(trainer_name)).step(signals(4), labels(4), 0, 10)
    assert torch.isfinite(torch.tensor(loss))
    params = dict(net.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert not torch.equal(params["blocks.0.expand.lora_A"], trainable["blocks.0.expand.lora_A"])


def test_pretraining_checkpoint_round_trip(tiny_demo, tmp_path):
    """pipeline_pretrain writes a plain state_dict for lbitmix-tiny; load_pretrained puts every backbone
    tensor of it into a LoRA model (other class count), whose unmerged features equal the pretrained net's."""
    from pipeline_pretrain import pretrain

    path = tmp_path / "CODE_testlbitmix-tinybias_full_checkpoint.pkl"
    pretrain(tiny_demo["code15_train"], tiny_demo["code15_valid"], path,
             main.pretrain_config(config="lbitmix-tiny", pretrain_epochs=1, pretrain_batch_size=64, seed=18),
             torch.device("cpu"))
    state = torch.load(path, weights_only=True)
    assert not any(k.startswith("auxiliary_classifier.") or "lora_" in k for k in state)
    plain = build_model("lbitmix-tiny", 6).eval()
    plain.load_state_dict(state, strict=False)
    net = build_model("lbitmix-tiny", NUM_CLASS, r=4).eval()
    load_pretrained(net, path)
    loaded = net.state_dict()
    for key, value in state.items():
        if "classifier.1" not in key:
            assert torch.equal(loaded[key], value), key
    x = signals(2)
    with torch.no_grad():
        torch.testing.assert_close(net.feature_extraction(x), plain.feature_extraction(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not fit"):
        load_pretrained(build_model("tinylight", NUM_CLASS), path)
