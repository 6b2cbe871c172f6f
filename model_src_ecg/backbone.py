"""The ECG backbone NN_default (conv encoder -> causal transformer -> two heads), the registry of
named configs of every family (`build_model`), and checkpoints.

Parameter and buffer names match the published CODE-15 checkpoints key for key, so a
published file loads by name; the LoRA adapters sit beside the weights they update.
"""
import contextlib
import logging
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .heads import TwoHeadNet, belongs_to_heads, ranks_per_layer
from .lbitmix import LBITMIX_CONFIGS, build_lbitmix
from .lora import InputMajorLinear, LoRAConv2d, LoRALinear, LoRAQKV

log = logging.getLogger(__name__)

CONFIGS = {"tinylight": (14, 64), "tiny": (23, 128), "light": (35, 128), "base": (35, 256),
           "mediumv2": (35, 512), "medium": (47, 512), "large": (47, 768)}  # (num_layers, width)

ENCODER_BLOCKS = 3
CONVS_PER_BLOCK = 3        # conv1, conv2, conv3 (the shortcut's 1x1)
LAYERS_PER_TRANSFORMER = 3  # c_attn, fc1, fc2 (c_proj is never adapted)
CLASSIFIER_LAYERS = 2      # classifier.0 (adapted), classifier.1 (never)
KERNEL = 9
STRIDE = 4                 # per encoder block: 6144 samples -> 96 tokens
NUM_HEADS = 16
NUM_TOKENS = 96            # size of the stored causal mask
MAX_POSITIONS = 200        # rows of the positional-encoding table
DOWNSAMPLE = STRIDE ** ENCODER_BLOCKS
STREAM_CHUNKS = 8          # a no-grad forward runs the encoder on the batch in this many pieces


def _channel_moments(chunk):
    """(count, mean, biased variance) per channel (dim 1) of one piece of a batch, in float64."""
    dims = [d for d in range(chunk.dim()) if d != 1]
    var, mean = torch.var_mean(chunk, dim=dims, correction=0)
    return chunk.numel() // chunk.shape[1], mean.double(), var.double()


def _batch_norm_coefficients(bn, moments):
    """Per-channel (scale, shift) with bn(x) == x * scale + shift for the batch whose pieces have
    `moments`, updating the running statistics exactly as nn.BatchNorm's forward does.

    With batch statistics (train mode, or no running statistics) the mean and biased variance
    are the whole batch's, combined from its pieces; the running variance takes the unbiased one.
    """
    if bn.training or bn.running_mean is None:
        count = sum(n for n, _, _ in moments)
        mean = sum(n * m for n, m, _ in moments) / count
        var = sum(n * (v + (m - mean) ** 2) for n, m, v in moments) / count
        if bn.training and bn.track_running_stats:
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            bn.running_mean.copy_((1 - factor) * bn.running_mean.double() + factor * mean)
            bn.running_var.copy_((1 - factor) * bn.running_var.double() + factor * var * count / (count - 1))
    else:
        mean, var = bn.running_mean.double(), bn.running_var.double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift


def _normalize_leaky_(chunk, coefficients):
    """chunk <- leaky_relu(chunk * scale + shift), in place."""
    shape = (1, -1) + (1,) * (chunk.dim() - 2)
    scale, shift = (c.to(chunk.dtype).view(shape) for c in coefficients)
    return F.leaky_relu_(chunk.mul_(scale).add_(shift))


class EncoderBlock(nn.Module):
    """Strided residual conv block: (conv1 -> BN -> leaky_relu -> conv2 -> BN -> leaky_relu) + 1x1(avgpool(x))."""

    def __init__(self, in_channels, width, ranks):
        super().__init__()
        self.conv1 = LoRAConv2d(in_channels, width, (1, KERNEL), r=ranks[0], stride=(1, STRIDE), padding=(0, KERNEL // 2))
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = LoRAConv2d(width, width, (1, KERNEL), r=ranks[1], padding=(0, KERNEL // 2))
        self.bn2 = nn.BatchNorm2d(width)
        self.shortcut_pool = nn.AvgPool2d((1, STRIDE))
        self.conv3 = LoRAConv2d(in_channels, width, (1, 1), r=ranks[2])

    def forward(self, x):
        main = F.leaky_relu(self.bn1(self.conv1(x)))
        main = F.leaky_relu(self.bn2(self.conv2(main)))
        return main + self.conv3(self.shortcut_pool(x))

    @torch.no_grad()
    def streamed(self, pieces):
        """forward(torch.cat(pieces)) as a list of pieces, holding far less at once (no autograd).

        The BatchNorms still see the whole batch: each normalises with statistics combined over
        all pieces (so every conv output feeding one is held until they are known) and updates
        its running statistics once, as forward does. `pieces` is emptied as it is consumed, so
        each input piece is freed when no longer needed. Where the input is smaller than the
        output (the first block: 12 leads in), it is kept, and conv1 (cheap there, run twice:
        statistics first) and the shortcut are computed from it when needed; elsewhere conv1 and
        the shortcut are computed at once from each piece, which is then dropped.
        """
        keep_input = pieces[0].shape[1] * STRIDE < self.bn1.num_features
        inputs, pieces[:] = list(pieces), []
        if keep_input:
            bn1 = _batch_norm_coefficients(self.bn1, [_channel_moments(self.conv1(x)) for x in inputs])
        else:
            hidden, shortcuts = [], []
            while inputs:
                x = inputs.pop(0)
                hidden.append(self.conv1(x))
                shortcuts.append(self.conv3(self.shortcut_pool(x)))
                del x
            bn1 = _batch_norm_coefficients(self.bn1, [_channel_moments(h) for h in hidden])
        out = []
        for i in range(len(inputs) if keep_input else len(hidden)):
            if keep_input:
                h = self.conv1(inputs[i])
            else:
                h, hidden[i] = hidden[i], None
            out.append(self.conv2(_normalize_leaky_(h, bn1)))
            del h
        bn2 = _batch_norm_coefficients(self.bn2, [_channel_moments(o) for o in out])
        for i, o in enumerate(out):
            if keep_input:
                shortcut = self.conv3(self.shortcut_pool(inputs[i]))
            else:
                shortcut, shortcuts[i] = shortcuts[i], None
            _normalize_leaky_(o, bn2).add_(shortcut)
            del shortcut
        return out


class PositionalEncoding(nn.Module):
    """Fixed sinusoidal table (MAX_POSITIONS, width): sin on even columns, cos on odd ones.

    A buffer, so it travels with the checkpoint; 2-D, the shape it has in the published files.
    """

    def __init__(self, width):
        super().__init__()
        position = torch.arange(MAX_POSITIONS, dtype=torch.float32).unsqueeze(1)
        frequency = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10000.0) / width))
        table = torch.zeros(MAX_POSITIONS, width)
        table[:, 0::2] = torch.sin(position * frequency)
        table[:, 1::2] = torch.cos(position * frequency)
        self.register_buffer("positional_encoding", table)

    def forward(self, x):
        return x + self.positional_encoding[:x.shape[1]]


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with a fused q/k/v projection stored input-major."""

    def __init__(self, width, r):
        super().__init__()
        self.num_heads = NUM_HEADS
        self.c_attn = LoRAQKV(width, r)
        self.c_proj = InputMajorLinear(width, width)
        self.register_buffer("bias", torch.tril(torch.ones(NUM_TOKENS, NUM_TOKENS)).view(1, 1, NUM_TOKENS, NUM_TOKENS))

    def forward(self, x, fused):
        batch, tokens, width = x.shape
        q, k, v = self.c_attn(x).split(width, dim=2)
        q, k, v = (t.view(batch, tokens, self.num_heads, width // self.num_heads).transpose(1, 2) for t in (q, k, v))
        if fused:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            scores = scores.masked_fill(self.bias[:, :, :tokens, :tokens] == 0, float("-inf"))
            y = F.softmax(scores, dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).reshape(batch, tokens, width))


class TransformerLayer(nn.Module):
    """Pre-norm block: x + attn(LN(x)); x + fc2(leaky_relu(fc1(LN(x))))."""

    def __init__(self, width, ranks):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.self_attention = CausalSelfAttention(width, ranks[0])
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = LoRALinear(width, 4 * width, r=ranks[1])
        self.fc2 = LoRALinear(4 * width, width, r=ranks[2])

    def forward(self, x, fused):
        x = x + self.self_attention(self.norm1(x), fused)
        return x + self.fc2(F.leaky_relu(self.fc1(self.norm2(x))))


def _call(block, *inputs):
    return block(*inputs)


@contextlib.contextmanager
def _running_statistics_kept(block):
    """While `block` runs again in backward: its train-mode BatchNorms normalise by the batch, as in
    the first run, and their running statistics, which that run updated already, are put back
    as they were after it."""
    buffers = [b for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
               for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    kept = [b.clone() for b in buffers]
    try:
        yield
    finally:
        for b, value in zip(buffers, kept):
            b.copy_(value)


def _recomputed(block, *inputs):
    """block(*inputs) saving only the inputs for backward: the block runs again in backward with
    the same values (BatchNorm by the same batch, or the same running statistics), and the
    running statistics are updated once, by the first run, so gradients and buffers are the same."""
    return checkpoint(block, *inputs, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _running_statistics_kept(block)))


class NN_default(TwoHeadNet):
    """Backbone with a main head and a gating auxiliary head ("any label present").

    rank_list holds one LoRA rank per counted layer, in order: the 9 encoder convs (block by
    block, conv1, conv2, conv3), then c_attn, fc1, fc2 of each transformer layer, then
    classifier.0 and classifier.1. classifier.1 is never adapted (its entry is ignored) and
    auxiliary_classifier.0 takes classifier.0's rank.
    """

    def __init__(self, nOUT, complexity, inputchannel, num_layers, rank_list, positive_probably=0.1):
        super().__init__()
        fixed = ENCODER_BLOCKS * CONVS_PER_BLOCK + CLASSIFIER_LAYERS
        num_transformer, leftover = divmod(num_layers - fixed, LAYERS_PER_TRANSFORMER)
        if num_transformer < 0 or leftover:
            raise ValueError(f"num_layers={num_layers} must be {fixed} + {LAYERS_PER_TRANSFORMER}*k for k >= 0")
        if len(rank_list) != num_layers:
            raise ValueError(f"rank_list has {len(rank_list)} entries, expected one per layer ({num_layers})")
        if complexity % NUM_HEADS or complexity % 2:
            raise ValueError(f"width {complexity} must be divisible by {NUM_HEADS} heads")
        ranks = [int(r) for r in rank_list]
        width = complexity
        conv_ranks = ranks[:ENCODER_BLOCKS * CONVS_PER_BLOCK]
        attn_ranks = ranks[ENCODER_BLOCKS * CONVS_PER_BLOCK:-CLASSIFIER_LAYERS]
        head_rank = ranks[-CLASSIFIER_LAYERS]

        self.inputchannel = inputchannel
        self.encoder_layers = nn.ModuleList(
            EncoderBlock(inputchannel if i == 0 else width, width, conv_ranks[CONVS_PER_BLOCK * i:CONVS_PER_BLOCK * (i + 1)])
            for i in range(ENCODER_BLOCKS))
        self.position_encoding = PositionalEncoding(width)
        self.transformer_layers = nn.ModuleList(
            TransformerLayer(width, attn_ranks[LAYERS_PER_TRANSFORMER * j:LAYERS_PER_TRANSFORMER * (j + 1)])
            for j in range(num_transformer))
        self.add_heads(width, nOUT, head_rank, positive_probably)
        self.fused_attention = True
        # Trade recomputation for memory where the numbers stay the same: a forward without
        # autograd streams the batch through the encoder in pieces (see `_streamed_encoder`),
        # and, while `recompute_in_backward` is set (a trainer's backprop), a forward with
        # autograd keeps only each block's input and recomputes the block in backward.
        # False: the plain forward everywhere.
        self.lean_forward = True
        self.recompute_in_backward = False

    def feature_extraction(self, x):
        """(B, inputchannel, 1, L) -> (B, width): encoder, tokens + positions, transformer, max over tokens."""
        self.check_input(x)
        samples = x.shape[-1]
        if samples % DOWNSAMPLE or not 0 < samples // DOWNSAMPLE <= NUM_TOKENS:
            raise ValueError(f"samples per lead must be a multiple of {DOWNSAMPLE} up to "
                             f"{DOWNSAMPLE * NUM_TOKENS}, got {samples}")
        if self.lean_forward and not torch.is_grad_enabled():
            if not self._batch_statistics():  # every sample on its own: the whole network piece by piece
                return torch.cat([self._features(piece, _call) for piece in x.chunk(STREAM_CHUNKS)])
            return self._features(x, _call, encoder=self._streamed_encoder)
        return self._features(x, _recomputed if self.lean_forward and self.recompute_in_backward else _call)

    def _batch_statistics(self):
        """Whether a BatchNorm normalises by the batch (train mode, or no running statistics)."""
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None)
                   for m in self.encoder_layers.modules())

    def _features(self, x, run, encoder=None):
        """The feature pipeline, each block called through run(block, *inputs)."""
        if encoder is not None:
            x = encoder(x)
        else:
            for block in self.encoder_layers:
                x = run(block, x)
        tokens = self.position_encoding(x.squeeze(2).transpose(1, 2))
        for layer in self.transformer_layers:
            tokens = run(layer, tokens, self.fused_attention)
        return tokens.max(dim=1).values

    def _streamed_encoder(self, x):
        """The encoder without autograd on the batch in STREAM_CHUNKS pieces (EncoderBlock.streamed):
        the widest activation is held once for the whole batch instead of three times."""
        pieces = list(x.chunk(STREAM_CHUNKS))
        for block in self.encoder_layers:
            pieces = block.streamed(pieces)
        return torch.cat(pieces)


def build_nn_default(config, num_class, r=0, positive_probably=0.1, inputchannel=12):
    """NN_default of a named config; r is one rank for every layer or a list of num_layers ranks."""
    num_layers, width = CONFIGS[config]
    return NN_default(num_class, width, inputchannel, num_layers, ranks_per_layer(r, num_layers), positive_probably)


# Every named config of every family -> the function that builds it: the one registry.
MODEL_CONFIGS = {**dict.fromkeys(CONFIGS, build_nn_default), **dict.fromkeys(LBITMIX_CONFIGS, build_lbitmix)}


def build_model(config, num_class, r=0, positive_probably=0.1, inputchannel=12):
    """The backbone of a named config (any family); r is one rank for every layer or a list, one per layer."""
    if config not in MODEL_CONFIGS:
        raise ValueError(f"unknown model config {config!r}; choose from: {', '.join(MODEL_CONFIGS)}")
    return MODEL_CONFIGS[config](config, num_class, r, positive_probably, inputchannel)


def is_lora_trainable(name):
    """The LoRA fine-tuning rule: adapters, every bias, and the task layer's weight."""
    return "lora_A" in name or "lora_B" in name or "bias" in name or name == "classifier.1.weight"


def mark_only_lora_as_trainable(net):
    """Set requires_grad by `is_lora_trainable`; returns the number of trainable parameters."""
    count = 0
    for name, p in net.named_parameters():
        p.requires_grad_(is_lora_trainable(name))
        count += p.numel() if p.requires_grad else 0
    return count


def mark_trainable(net, trains):
    """requires_grad for what a method trains: "lora" (the LoRA rule), "all", or "heads" (the two
    heads alone, on a frozen trunk)."""
    if trains == "lora":
        mark_only_lora_as_trainable(net)
        return
    for name, p in net.named_parameters():
        p.requires_grad_(trains == "all" or belongs_to_heads(name))


def _is_skipped_on_load(key):
    """The task layer and the auxiliary head are task-specific: never taken from a backbone file."""
    return "classifier.1" in key or key.startswith("auxiliary_classifier.")


def _is_adapter_key(key):
    return key.endswith(".lora_A") or key.endswith(".lora_B")


def _check_keys(own, given, required, what):
    """Raise one error listing every missing, unexpected and wrongly shaped key."""
    missing = sorted(k for k in required if k not in given)
    unexpected = sorted(k for k in given if k not in own)
    mismatched = sorted(f"{k}: {tuple(v.shape)} given, {tuple(own[k].shape)} in the model"
                        for k, v in given.items() if k in own and tuple(v.shape) != tuple(own[k].shape))
    if not (missing or unexpected or mismatched):
        return

    def listing(title, keys):
        shown = "".join(f"\n    {k}" for k in keys[:20])
        more = f"\n    ... and {len(keys) - 20} more" if len(keys) > 20 else ""
        return f"\n  {title} ({len(keys)}):{shown}{more}" if keys else ""

    raise ValueError(f"{what} does not fit this model (another config or rank?):"
                     + listing("missing keys", missing) + listing("unexpected keys", unexpected)
                     + listing("shape mismatches", mismatched))


DDP_PREFIX = "module."


def _unwrapped(state):
    """A state dict saved from a DistributedDataParallel wrapper has every key under `module.`."""
    if state and all(k.startswith(DDP_PREFIX) for k in state):
        return {k[len(DDP_PREFIX):]: v for k, v in state.items()}
    return state


def load_pretrained(net, path):
    """Load a backbone state_dict by key, except classifier.1 and the auxiliary head.

    Adapters absent from the file (a published checkpoint has none) stay at their initialisation;
    anything else missing, unexpected or of another shape raises a ValueError listing it all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained checkpoint not found: {path} (download the published "
                                f"CODE-15 backbones or run pipeline_pretrain.py)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, expected a state_dict")
    own = net.state_dict()
    given = {k: v for k, v in _unwrapped(state).items() if not _is_skipped_on_load(k)}
    required = [k for k in own if not _is_skipped_on_load(k) and not _is_adapter_key(k)]
    _check_keys(own, given, required, f"checkpoint {path}")
    net.load_state_dict(given, strict=False)
    log.info("loaded %d tensors from %s", len(given), path)


def _adapter_keys(net):
    """State a LoRA run changes or creates: adapters, biases, classifier.1.weight, norm
    layers (with running statistics) — plus the auxiliary head, which is not in the backbone file."""
    norms = {name for name, m in net.named_modules() if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm))}
    trained = {name for name, _ in net.named_parameters() if is_lora_trainable(name)}
    return [k for k in net.state_dict()
            if k in trained or k.rpartition(".")[0] in norms or k.startswith("auxiliary_classifier.")]


def adapter_state_dict(net):
    """Snapshot (detached copies) of the adapter state of an unmerged model."""
    if net.merged:
        raise RuntimeError("adapter_state_dict needs an unmerged model: merging moved the adapters into the weights")
    state = net.state_dict()
    return {k: state[k].detach().clone() for k in _adapter_keys(net)}


def load_adapter_state(net, state):
    """Load an `adapter_state_dict` into a model of the same config and ranks (checked key by key)."""
    if net.merged:
        raise RuntimeError("load_adapter_state needs an unmerged model (call it before merge_net)")
    own = net.state_dict()
    keys = _adapter_keys(net)
    _check_keys({k: own[k] for k in keys}, state, keys, "adapter state")
    net.load_state_dict(state, strict=False)
