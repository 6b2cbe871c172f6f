"""Backbone, LoRA layers, checkpoint loading and augmentation (model_src_ecg)."""
import numpy as np
import pytest
import torch

from model_src_ecg import (LoRAConv2d, LoRAQKV, adapter_state_dict, build_model, cutmix,
                           load_adapter_state, load_pretrained, mark_only_lora_as_trainable, mask_leads)
from model_src_ecg.backbone import CausalSelfAttention

SAMPLES = 1024  # 16 tokens: short inputs keep the forwards fast

PUBLISHED_TOTAL_R0 = {"tinylight": 258_833, "tiny": 1_608_081, "base": 9_537_297,
                 "medium": 50_624_017, "large": 113_783_057}
PUBLISHED_TRAINABLE_R16 = {"tinylight": 82_033, "tiny": 264_657, "base": 800_785,
                      "medium": 2_146_449, "large": 3_218_705}


def signals(batch, seed=0, samples=SAMPLES):
    return torch.randn(batch, 12, 1, samples, generator=torch.Generator().manual_seed(seed))


def randomise_adapters(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


# The published layout, written out from its description rather than from this model's own
# state_dict(): (width, transformer layers) per config, then every key and shape a published
# CODE-15 backbone file holds. The positional table is 2-D, (200, width).
PUBLISHED_LAYOUT = {"tinylight": (64, 1), "medium": (512, 12)}


def published_keys(config, num_class, r=0, aux=False):
    """Key -> shape of a published checkpoint of `config`; with r > 0 also the LoRA adapters a
    published LoRA model carries, with aux=True also its auxiliary head (absent from the files)."""
    w, layers = PUBLISHED_LAYOUT[config]
    keys = {}

    def adapted(prefix, out_features, in_features, qkv=False):
        if r:
            keys[f"{prefix}.lora_A"] = (3 * r if qkv else r, in_features)
            keys[f"{prefix}.lora_B"] = (out_features, r)

    for i in range(3):
        cin = 12 if i == 0 else w
        for conv, kernel in (("conv1", 9), ("conv2", 9), ("conv3", 1)):
            conv_in = w if conv == "conv2" else cin
            keys[f"encoder_layers.{i}.{conv}.conv.weight"] = (w, conv_in, 1, kernel)
            keys[f"encoder_layers.{i}.{conv}.conv.bias"] = (w,)
            adapted(f"encoder_layers.{i}.{conv}", w, conv_in * kernel)
        for bn in ("bn1", "bn2"):
            for stat in ("weight", "bias", "running_mean", "running_var"):
                keys[f"encoder_layers.{i}.{bn}.{stat}"] = (w,)
            keys[f"encoder_layers.{i}.{bn}.num_batches_tracked"] = ()
    keys["position_encoding.positional_encoding"] = (200, w)
    for j in range(layers):
        t = f"transformer_layers.{j}"
        keys.update({
            f"{t}.self_attention.bias": (1, 1, 96, 96),
            f"{t}.self_attention.c_attn.weight": (w, 3 * w), f"{t}.self_attention.c_attn.bias": (3 * w,),
            f"{t}.self_attention.c_proj.weight": (w, w), f"{t}.self_attention.c_proj.bias": (w,),
            f"{t}.norm1.weight": (w,), f"{t}.norm1.bias": (w,), f"{t}.norm2.weight": (w,), f"{t}.norm2.bias": (w,),
            f"{t}.fc1.weight": (4 * w, w), f"{t}.fc1.bias": (4 * w,),
            f"{t}.fc2.weight": (w, 4 * w), f"{t}.fc2.bias": (w,),
        })
        adapted(f"{t}.self_attention.c_attn", 3 * w, w, qkv=True)
        adapted(f"{t}.fc1", 4 * w, w)
        adapted(f"{t}.fc2", w, 4 * w)
    keys.update({"classifier.0.weight": (w, w), "classifier.0.bias": (w,),
                 "classifier.1.weight": (num_class, w), "classifier.1.bias": (num_class,)})
    adapted("classifier.0", w, w)
    if aux:
        keys.update({"auxiliary_classifier.0.weight": (w // 2, w), "auxiliary_classifier.0.bias": (w // 2,),
                     "auxiliary_classifier.2.weight": (1, w // 2), "auxiliary_classifier.2.bias": (1,)})
        adapted("auxiliary_classifier.0", w // 2, w)
    return keys


def published_state(config, num_class, r=0, aux=False, seed=0):
    """Random tensors in the published layout (the causal mask and positions as a real file has them)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in published_keys(config, num_class, r, aux).items():
        if key.endswith("self_attention.bias"):
            state[key] = torch.tril(torch.ones(96, 96)).view(1, 1, 96, 96)
        elif key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.05
    return state


@pytest.mark.parametrize("config", sorted(PUBLISHED_TOTAL_R0))
def test_parameter_counts_match_spec(config):
    with torch.device("meta"):
        plain = build_model(config, 16, r=0)
        adapted = build_model(config, 16, r=16)
    assert sum(p.numel() for p in plain.parameters()) == PUBLISHED_TOTAL_R0[config]
    trainable = mark_only_lora_as_trainable(adapted)
    assert trainable == PUBLISHED_TRAINABLE_R16[config]
    assert trainable == sum(p.numel() for p in adapted.parameters() if p.requires_grad)


@pytest.mark.parametrize("config", sorted(PUBLISHED_LAYOUT))
@pytest.mark.parametrize("r", [0, 16])
def test_state_dict_has_exactly_the_published_keys_and_shapes(config, r):
    with torch.device("meta"):
        state = build_model(config, 6, r=r).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == published_keys(config, 6, r=r, aux=True)


@pytest.mark.parametrize("config", sorted(PUBLISHED_LAYOUT))
def test_published_checkpoint_loads_and_sets_every_backbone_tensor(config, tmp_path):
    """A file written in the published layout (positional table 2-D) loads; every tensor but the task
    layer lands in the model, and a DDP-saved copy (keys under `module.`) loads to the same model."""
    state = published_state(config, 16)
    path = tmp_path / f"CODE_test{config}bias_full_checkpoint.pkl"
    torch.save(state, path)
    ddp_path = tmp_path / "ddp.pkl"
    torch.save({f"module.{k}": v for k, v in state.items()}, ddp_path)
    for source in (path, ddp_path):
        net = build_model(config, 23, r=16)
        load_pretrained(net, source)
        loaded = net.state_dict()
        for key, value in state.items():
            if "classifier.1" not in key:
                assert torch.equal(loaded[key], value), key
        assert loaded["classifier.1.weight"].shape == (23, PUBLISHED_LAYOUT[config][0])


def test_positional_table_is_the_sinusoid_and_its_first_rows_are_added():
    net = build_model("tinylight", 6).eval()
    table = net.position_encoding.positional_encoding
    position = torch.arange(200.0)[:, None]
    frequency = torch.exp(torch.arange(0, 64, 2.0) * (-np.log(10000.0) / 64))
    assert torch.allclose(table[:, 0::2], torch.sin(position * frequency), atol=1e-5)
    assert torch.allclose(table[:, 1::2], torch.cos(position * frequency), atol=1e-5)
    tokens = torch.randn(2, 16, 64)
    assert torch.equal(net.position_encoding(tokens), tokens + table[:16])


@pytest.mark.parametrize("config", sorted(PUBLISHED_LAYOUT))
def test_lora_state_dicts_load_strictly_both_ways(config):
    published = published_state(config, 6, r=16, aux=True)
    net = build_model(config, 6, r=16)
    net.load_state_dict(published, strict=True)
    again = {k: v.clone() for k, v in net.state_dict().items()}
    assert again.keys() == published.keys()
    assert all(torch.equal(again[k], published[k]) for k in published)


def test_adapter_keys_sit_beside_adapted_weights_and_rank_zero_adds_none():
    r = 4
    ranks = [r] * 14
    ranks[1] = 0   # encoder_layers.0.conv2
    ranks[10] = 0  # transformer_layers.0.fc1
    state = build_model("tinylight", 6, r=ranks).state_dict()
    adapters = {k: tuple(v.shape) for k, v in state.items() if "lora_" in k}
    t = "transformer_layers.0"
    expected = {
        "encoder_layers.0.conv1.lora_A": (r, 12 * 9), "encoder_layers.0.conv1.lora_B": (64, r),
        "encoder_layers.0.conv3.lora_A": (r, 12), "encoder_layers.0.conv3.lora_B": (64, r),
        f"{t}.self_attention.c_attn.lora_A": (3 * r, 64), f"{t}.self_attention.c_attn.lora_B": (3 * 64, r),
        f"{t}.fc2.lora_A": (r, 256), f"{t}.fc2.lora_B": (64, r),
        "classifier.0.lora_A": (r, 64), "classifier.0.lora_B": (64, r),
        "auxiliary_classifier.0.lora_A": (r, 64), "auxiliary_classifier.0.lora_B": (32, r),
    }
    for i in (1, 2):
        for conv, cin in (("conv1", 64 * 9), ("conv2", 64 * 9), ("conv3", 64)):
            expected[f"encoder_layers.{i}.{conv}.lora_A"] = (r, cin)
            expected[f"encoder_layers.{i}.{conv}.lora_B"] = (64, r)
    assert adapters == expected
    non_adapter = {k: tuple(v.shape) for k, v in state.items()
                   if "lora_" not in k and not k.startswith("auxiliary_classifier.")}
    assert non_adapter == published_keys("tinylight", 6)


def test_bad_rank_list_and_config_are_refused():
    with pytest.raises(ValueError, match="one per layer"):
        build_model("tinylight", 6, r=[4] * 13)
    with pytest.raises(ValueError, match="unknown model config"):
        build_model("huge", 6)
    with pytest.raises(ValueError, match="expected input"):
        build_model("tinylight", 6)(torch.zeros(2, 12, SAMPLES))


def test_lora_trainable_set_follows_spec_rule():
    net = build_model("tinylight", 6, r=4)
    mark_only_lora_as_trainable(net)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    for name, _ in net.named_parameters():
        should = "lora_" in name or name.endswith(".bias") or name == "classifier.1.weight"
        assert (name in trainable) == should, name
    assert "transformer_layers.0.self_attention.c_proj.bias" in trainable
    assert "encoder_layers.0.bn1.bias" in trainable and "encoder_layers.0.bn1.weight" not in trainable


def test_base_weight_frozen_only_where_rank_positive():
    ranks = [4] * 14
    ranks[0] = 0
    net = build_model("tinylight", 6, r=ranks)
    assert net.encoder_layers[0].conv1.conv.weight.requires_grad
    assert not net.encoder_layers[0].conv2.conv.weight.requires_grad
    assert not net.transformer_layers[0].self_attention.c_attn.weight.requires_grad
    assert net.transformer_layers[0].self_attention.c_proj.weight.requires_grad
    assert net.classifier[1].weight.requires_grad


def test_checkpoint_round_trip_and_wrong_config_error(tmp_path):
    torch.manual_seed(0)
    source = build_model("tinylight", 6).eval()
    path = tmp_path / "CODE_testtinylightbias_full_checkpoint.pkl"
    torch.save(source.state_dict(), path)

    target = build_model("tinylight", 16, r=4).eval()
    fresh_task_layer = target.classifier[1].weight.detach().clone()
    fresh_aux = target.auxiliary_classifier[2].weight.detach().clone()
    load_pretrained(target, path)
    loaded = target.state_dict()
    for key, value in source.state_dict().items():
        if "classifier.1" not in key and not key.startswith("auxiliary_classifier."):
            assert torch.equal(loaded[key], value), key
    assert torch.equal(target.classifier[1].weight, fresh_task_layer)
    assert torch.equal(target.auxiliary_classifier[2].weight, fresh_aux)
    x = signals(3)
    with torch.no_grad():
        assert torch.allclose(target.feature_extraction(x), source.feature_extraction(x), atol=1e-6)

    other = tmp_path / "CODE_testtinybias_full_checkpoint.pkl"
    torch.save(build_model("tiny", 6).state_dict(), other)
    with pytest.raises(ValueError, match="unexpected keys") as err:
        load_pretrained(build_model("tinylight", 6), other)
    assert "shape mismatches" in str(err.value) and "transformer_layers.1" in str(err.value)

    truncated = {k: v for k, v in source.state_dict().items() if "fc2" not in k}
    torch.save(truncated, tmp_path / "truncated.pkl")
    with pytest.raises(ValueError, match="missing keys") as err:
        load_pretrained(build_model("tinylight", 6), tmp_path / "truncated.pkl")
    assert "transformer_layers.0.fc2.weight" in str(err.value)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_pretrained(build_model("tinylight", 6), tmp_path / "absent.pkl")


def test_adapters_at_init_leave_outputs_unchanged():
    torch.manual_seed(0)
    plain = build_model("tinylight", 6).eval()
    adapted = build_model("tinylight", 6, r=8).eval()
    adapted.load_state_dict(plain.state_dict(), strict=False)
    x = signals(4)
    with torch.no_grad():
        for a, b in zip(plain(x), adapted(x)):
            assert torch.equal(a, b)


def test_merge_matches_unmerged_and_merging_twice_adds_nothing():
    torch.manual_seed(0)
    net = build_model("tinylight", 6, r=8).eval()
    x = signals(4)
    with torch.no_grad():
        base_main = net(x)[1]
        randomise_adapters(net)
        aux, main = net(x)
        net.merge_net()
        merged_aux, merged_main = net(x)
        net.merge_net()
        twice_aux, twice_main = net(x)
    assert not torch.allclose(main, base_main, atol=1e-3)
    assert torch.allclose(merged_main, main, atol=1e-5) and torch.allclose(merged_aux, aux, atol=1e-5)
    assert torch.equal(twice_main, merged_main) and torch.equal(twice_aux, merged_aux)
    reloaded = build_model("tinylight", 6, r=8).eval()
    reloaded.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert torch.allclose(reloaded(x)[1], main, atol=1e-5)
    with pytest.raises(RuntimeError, match="unmerged"):
        adapter_state_dict(net)


def test_lora_folds_equal_their_low_rank_paths():
    torch.manual_seed(0)
    qkv = LoRAQKV(32, r=3)
    conv = LoRAConv2d(5, 7, (1, 9), r=2, padding=(0, 4))
    for layer in (qkv, conv):
        with torch.no_grad():
            layer.lora_B.normal_()
    x = torch.randn(2, 10, 32)
    low_rank = []
    for i in range(3):  # block i of A and B adapts the q, k, v output columns i*32 ... (i+1)*32
        a, b = qkv.lora_A[3 * i:3 * (i + 1)], qkv.lora_B[32 * i:32 * (i + 1)]
        low_rank.append(x @ a.t() @ b.t())
    expected = x @ qkv.weight + qkv.bias + torch.cat(low_rank, dim=-1)
    assert torch.allclose(qkv(x), expected, atol=1e-5)

    s = torch.randn(2, 5, 1, 40)
    a = conv.lora_A.view(2, 5, 1, 9)
    b = conv.lora_B.view(7, 2, 1, 1)
    expected = conv.conv(s) + torch.nn.functional.conv2d(torch.nn.functional.conv2d(s, a, padding=(0, 4)), b)
    assert torch.allclose(conv(s), expected, atol=1e-5)


def test_fused_attention_matches_explicit_formula():
    torch.manual_seed(0)
    net = build_model("tinylight", 6, r=4).eval()
    randomise_adapters(net)
    x = signals(3, samples=6144)
    with torch.no_grad():
        fused = net(x)
        net.fused_attention = False
        explicit = net(x)
    for a, b in zip(fused, explicit):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_attention_is_causal(fused):
    torch.manual_seed(0)
    attention = CausalSelfAttention(64, r=2)
    tokens = torch.randn(2, 96, 64)
    changed = tokens.clone()
    t = 40
    changed[:, t + 1:] = torch.randn(2, 96 - t - 1, 64)
    with torch.no_grad():
        before, after = attention(tokens, fused), attention(changed, fused)
    assert torch.allclose(before[:, :t + 1], after[:, :t + 1], atol=1e-6)
    assert not torch.allclose(before[:, t + 1:], after[:, t + 1:], atol=1e-3)


def test_gating_passes_main_head_gradient_only_through_abnormal_rows():
    torch.manual_seed(0)
    net = build_model("tinylight", 6).eval()
    x = signals(6)
    with torch.no_grad():
        probability = torch.sigmoid(net(x)[0]).squeeze(1)
        ungated = net.classifier(net.feature_extraction(x))
    order = probability.sort().values
    threshold = float((order[2] + order[3]) / 2)
    open_rows = probability > threshold
    assert 0 < int(open_rows.sum()) < len(x)
    for positive_probably, expected_rows in ((threshold, int(open_rows.sum())), (1.0, 0), (0.0, len(x))):
        net.zero_grad()
        net.positive_probably = positive_probably
        aux, main = net(x)
        assert torch.allclose(main, ungated, atol=1e-6)
        main.sum().backward()
        # d(sum main)/d(classifier.1.bias) counts the rows that pass gradient, for every class.
        assert torch.allclose(net.classifier[1].bias.grad, torch.full((6,), float(expected_rows)))
    assert "positive_probably" not in str(list(net.state_dict()))


def test_adapter_state_round_trip_and_mismatch(tmp_path):
    torch.manual_seed(0)
    net = build_model("tinylight", 6, r=4).eval()
    randomise_adapters(net)
    with torch.no_grad():
        net.classifier[1].weight.add_(0.1)
        net.encoder_layers[1].bn2.running_mean.add_(0.3)
    state = adapter_state_dict(net)
    assert "classifier.1.weight" in state and "encoder_layers.1.bn2.running_mean" in state
    assert "transformer_layers.0.norm1.weight" in state and "encoder_layers.0.conv1.lora_A" in state
    assert "encoder_layers.0.conv1.conv.weight" not in state
    assert "transformer_layers.0.self_attention.bias" not in state
    torch.save(state, tmp_path / "adapter.pt")

    fresh = build_model("tinylight", 6, r=4).eval()
    backbone = {k: v for k, v in net.state_dict().items() if k not in state}
    fresh.load_state_dict(backbone, strict=False)
    load_adapter_state(fresh, torch.load(tmp_path / "adapter.pt", weights_only=True))
    x = signals(2)
    with torch.no_grad():
        for a, b in zip(net(x), fresh(x)):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="shape mismatches"):
        load_adapter_state(build_model("tinylight", 6, r=8), state)
    with pytest.raises(ValueError, match="missing keys"):
        load_adapter_state(build_model("tinylight", 6, r=4), {k: v for k, v in state.items() if "lora_" not in k})


def test_cutmix_mixes_labels_by_pasted_area_and_is_seeded():
    batch, samples = 8, 512
    x = (torch.arange(batch, dtype=torch.float32) + 1).view(batch, 1, 1, 1).repeat(1, 12, 1, samples)
    y = torch.eye(batch)
    seen_fractions = []
    for seed in range(12):
        mixed, y_mixed = cutmix(x, y, np.random.default_rng(seed))
        again = cutmix(x, y, np.random.default_rng(seed))
        assert torch.equal(mixed, again[0]) and torch.equal(y_mixed, again[1])
        assert torch.equal(x, (torch.arange(batch, dtype=torch.float32) + 1).view(batch, 1, 1, 1).repeat(1, 12, 1, samples))
        fraction = None
        for b in range(batch):
            pasted = mixed[b] != b + 1
            if not pasted.any():
                assert torch.allclose(y_mixed[b], y[b], atol=1e-6)  # own partner or empty window
                continue
            partner = int(mixed[b][pasted][0]) - 1
            assert torch.all(mixed[b][pasted] == partner + 1)
            leads, times = pasted.squeeze(1).nonzero(as_tuple=True)
            rows, cols = leads.unique(), times.unique()
            assert pasted.sum() == len(rows) * len(cols)  # one lead window x one time window
            assert rows.max() - rows.min() + 1 == len(rows) and cols.max() - cols.min() + 1 == len(cols)
            fraction = float(pasted.sum()) / (12 * samples)
            expected = (1 - fraction) * y[b] + fraction * y[partner]
            assert torch.allclose(y_mixed[b], expected, atol=1e-6)
        if fraction is not None:
            seen_fractions.append(fraction)
            assert torch.allclose(y_mixed.sum(1), torch.ones(batch))
    assert len(seen_fractions) >= 6 and 0.1 < np.mean(seen_fractions) < 0.9


def test_mask_leads_keeps_exactly_the_named_leads():
    x = torch.randn(2, 12, 1, 64) + 5
    for n_leads, kept in ((1, [0]), (3, [1, 6, 10]), (12, list(range(12)))):
        masked = mask_leads(x, n_leads)
        for lead in range(12):
            if lead in kept:
                assert torch.equal(masked[:, lead], x[:, lead])
            else:
                assert torch.all(masked[:, lead] == 0)
    with pytest.raises(ValueError, match="n_leads"):
        mask_leads(x, 6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_forward_matches_cpu():
    torch.manual_seed(0)
    net = build_model("tinylight", 6, r=4).eval()
    randomise_adapters(net)
    x = signals(4, samples=6144)
    with torch.no_grad():
        cpu = net(x)
        net.to("cuda")
        for fused in (True, False):
            net.fused_attention = fused
            gpu = net(x.to("cuda"))
            for a, b in zip(cpu, gpu):
                assert torch.allclose(a, b.cpu(), atol=1e-4)
        net.merge_net()
        merged = net(x.to("cuda"))
    assert torch.allclose(merged[1].cpu(), cpu[1], atol=1e-4)
