"""The model zoo. Every model is an ordered list of blocks, each mapping the previous block's
output to its own: a tensor, or a tuple of tensors where layers share one (WavLM's relative
position bias).

That one shape is what lets pipeline and model parallel split any model into consecutive
stages (`model.stages(n)`), and FSDP2 shard it block by block. The speech encoders are
torchaudio's own architectures (wav2vec 2.0, HuBERT, WavLM, XLS-R; random initialisation: no
weights can be downloaded), taken apart into blocks; Conformer is torchaudio's, with a
convolutional subsampling front end on log-mel.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torchaudio
from torch import nn

from .labels import CLASSES

NUM_CLASSES = len(CLASSES)
SIZES = ("small", "base", "large")


class Stage(nn.Sequential):
    """Consecutive blocks. Takes what the previous stage gave: one tensor, or a tuple of tensors,
    which pipeline stages receive unpacked as several arguments."""

    def forward(self, *inputs):
        x = inputs[0] if len(inputs) == 1 else inputs
        for block in self:
            x = block(x)
        return x


class BlockModel(nn.Module):
    """Runs `blocks` in order. Input: (batch, n_features, frames) features of kind `feature_kind`."""

    def __init__(self, name: str, blocks: list[nn.Module], *, feature_kind: str, n_features: int, frames: int):
        super().__init__()
        self.name = name
        self.blocks = nn.ModuleList(blocks)
        self.feature_kind = feature_kind
        self.n_features = n_features
        self.frames = frames
        self._bounds: dict[int, list[tuple[int, int]]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def example_input(self, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """A random batch of the right shape."""
        return torch.randn(batch_size, self.n_features, self.frames, device=device)

    def block_flops(self, batch_size: int = 2) -> list[int]:
        """Forward FLOPs of each block on an example batch (torch.utils.flop_counter).

        Counted on a copy on the meta device: shapes only, so a 2-billion-parameter model costs
        no memory and no time, whatever device (or sharding, or compilation) this model is in.
        """
        return [total for total, _ in self.block_flop_kinds(batch_size)]

    def block_flop_kinds(self, batch_size: int = 2) -> list[tuple[int, int]]:
        """Per block, (forward FLOPs, of which cuDNN's: convolutions and recurrent layers). The
        split decides which peak an fp32 run is held to: cuDNN may run in TF32 where matmuls do not."""
        from torch.utils.flop_counter import FlopCounterMode

        if next(self.parameters()).device.type != "meta":
            return rebuild(self, device="meta").block_flop_kinds(batch_size)
        costs = []
        x = self.example_input(batch_size, "meta")
        with torch.no_grad():
            for block in self.blocks:
                rnn_flops: list[int] = []
                rnns = [m for m in block.modules() if isinstance(m, nn.RNNBase)]
                for m in rnns:  # counted by formula: on meta, torch would unroll every time step (and count it)
                    m.forward = _rnn_shapes(m, rnn_flops)
                try:
                    with FlopCounterMode(display=False) as counter:
                        x = block(x)
                finally:
                    for m in rnns:
                        del m.forward
                conv = sum(n for op, n in counter.get_flop_counts().get("Global", {}).items()
                           if "convolution" in str(op))
                costs.append((counter.get_total_flops() + sum(rnn_flops), conv + sum(rnn_flops)))
        return costs

    def stage_boundaries(self, n: int) -> list[tuple[int, int]]:
        """Split blocks into n consecutive [start, end) ranges minimising the costliest stage."""
        if n < 1 or n > len(self.blocks):
            raise ValueError(f"{self.name} has {len(self.blocks)} blocks: it cannot be split into {n} stages "
                             f"(use at most {len(self.blocks)})")
        if n in self._bounds:
            return self._bounds[n]
        # costs from a fresh meta copy: this model may already be compiled, sharded or on a GPU
        fresh = rebuild(self, device="meta")
        # parameters count a little too (a tenth of the model's FLOP per parameter), so blocks heavy
        # in weights but light in compute, like heads, do not pile up on one stage
        flops = fresh.block_flops()
        params = [sum(p.numel() for p in b.parameters()) for b in fresh.blocks]
        weight = 0.1 * sum(flops) / max(sum(params), 1)
        costs = [f + weight * p + 1 for f, p in zip(flops, params)]
        nb = len(costs)
        prefix = [0]
        for c in costs:
            prefix.append(prefix[-1] + c)
        inf = float("inf")
        best = [[inf] * (nb + 1) for _ in range(n + 1)]
        cut = [[0] * (nb + 1) for _ in range(n + 1)]
        best[0][0] = 0
        for k in range(1, n + 1):
            for j in range(k, nb + 1):
                for i in range(k - 1, j):
                    v = max(best[k - 1][i], prefix[j] - prefix[i])
                    if v < best[k][j]:
                        best[k][j], cut[k][j] = v, i
        bounds, j = [], nb
        for k in range(n, 0, -1):
            i = cut[k][j]
            bounds.append((i, j))
            j = i
        self._bounds[n] = bounds[::-1]
        return self._bounds[n]

    def stages(self, n: int) -> list[Stage]:
        """n consecutive, roughly balanced stages sharing this model's block modules."""
        return [Stage(*self.blocks[a:b]) for a, b in self.stage_boundaries(n)]


def _rnn_shapes(rnn: nn.RNNBase, flops: list[int]):
    """A forward for a batch-first GRU/LSTM on the meta device that adds its FLOPs (_rnn_flops) to
    `flops` and returns its outputs' shapes without computing: torch's meta LSTM unrolls every time
    step (0.7 s per layer for 300 frames), and the flop counter would count the unrolled matmuls too."""
    if not rnn.batch_first or rnn.proj_size:
        raise NotImplementedError(f"FLOPs of {type(rnn).__name__}: batch_first without proj_size only")

    def forward(x, hx=None):
        flops.append(_rnn_flops(rnn, x))
        dirs = 2 if rnn.bidirectional else 1
        out = x.new_empty(x.shape[0], x.shape[1], rnn.hidden_size * dirs)
        h = x.new_empty(rnn.num_layers * dirs, x.shape[0], rnn.hidden_size)
        return out, ((h, h.clone()) if rnn.mode == "LSTM" else h)

    return forward


def _rnn_flops(rnn: nn.RNNBase, x: torch.Tensor) -> int:
    """Forward FLOPs of a batch-first GRU/LSTM, which torch's flop counter does not count on a real
    device (one fused op)."""
    gates = {"LSTM": 4, "GRU": 3}.get(rnn.mode, 1)
    b, t = x.shape[0], x.shape[1]
    dirs = 2 if rnn.bidirectional else 1
    total, inp = 0, rnn.input_size
    for _ in range(rnn.num_layers):
        total += 2 * b * t * gates * rnn.hidden_size * (inp + rnn.hidden_size) * dirs
        inp = rnn.hidden_size * dirs
    return total


# ------------------------------------------------------------------------------------------ blocks

class ConvBlock(nn.Module):
    """3x3 conv, batch norm, ReLU, 2x2 max pool. The first block adds the channel axis."""

    def __init__(self, cin: int, cout: int, *, add_channel: bool = False):
        super().__init__()
        self.add_channel = add_channel
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(2))

    def forward(self, x):
        return self.body(x.unsqueeze(1) if self.add_channel else x)


class PoolHead(nn.Module):
    """Global average pool over every axis after the channels, dropout, linear classifier."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, NUM_CLASSES)

    def forward(self, x):
        return self.fc(self.drop(x.flatten(2).mean(-1)))


class ToSequence(nn.Module):
    """(B, C, F, T) conv maps -> (B, T, hidden) frame vectors."""

    def __init__(self, in_features: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(in_features, hidden)

    def forward(self, x):
        b, c, f, t = x.shape
        return torch.relu(self.proj(x.permute(0, 3, 1, 2).reshape(b, t, c * f)))


class Recurrent(nn.Module):
    """One bidirectional GRU or LSTM layer returning its output sequence only."""

    def __init__(self, kind: str, input_size: int, hidden: int, dropout: float):
        super().__init__()
        rnn = nn.GRU if kind == "gru" else nn.LSTM
        self.rnn = rnn(input_size, hidden, batch_first=True, bidirectional=True)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.rnn(x)[0])


class AttentionPool(nn.Module):
    """Softmax attention over time, then a linear classifier: (B, T, D) -> (B, classes)."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.score = nn.Linear(dim, 1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x):
        w = torch.softmax(self.score(x), dim=1)
        return self.fc(self.drop((w * x).sum(1)))


class Frames(nn.Module):
    """(B, F, T) features -> (B, T/stride, hidden) frame vectors."""

    def __init__(self, n_features: int, hidden: int, stride: int):
        super().__init__()
        self.proj = nn.Conv1d(n_features, hidden, kernel_size=stride, stride=stride)

    def forward(self, x):
        return torch.relu(self.proj(x)).transpose(1, 2)


class MeanMaxHead(nn.Module):
    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * dim, NUM_CLASSES)

    def forward(self, x):
        return self.fc(self.drop(torch.cat([x.mean(1), x.amax(1)], dim=-1)))


class PatchEmbed(nn.Module):
    """Non-overlapping (16 x 16) patches of the log-mel plus learned positions: (B, F, T) -> (B, N, D)."""

    def __init__(self, n_features: int, frames: int, dim: int, patch: int = 16):
        super().__init__()
        self.proj = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)
        n = (n_features // patch) * (frames // patch)
        self.pos = nn.Parameter(torch.zeros(1, n, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, x):
        return self.proj(x.unsqueeze(1)).flatten(2).transpose(1, 2) + self.pos


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout, batch_first=True, norm_first=True)

    def forward(self, x):
        return self.layer(x)


class TokenHead(nn.Module):
    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x):
        return self.fc(self.drop(self.norm(x).mean(1)))


class WaveFrontEnd(nn.Module):
    """wav2vec 2.0's convolutional feature extractor: (B, 1, samples) -> (B, frames, channels), 50 frames/s."""

    def __init__(self, extractor: nn.Module):
        super().__init__()
        self.extractor = extractor

    def forward(self, x):
        return self.extractor(x.squeeze(1), None)[0]


class EncoderInput(nn.Module):
    """Feature projection, convolutional positional embedding, and the encoder's layer norm where
    it comes first (as torchaudio's Transformer._preprocess)."""

    def __init__(self, projection: nn.Module, transformer: nn.Module):
        super().__init__()
        self.projection = projection
        self.pos_conv = transformer.pos_conv_embed
        self.norm = transformer.layer_norm if transformer.layer_norm_first else None
        self.dropout = transformer.dropout

    def forward(self, x):
        x = self.projection(x)
        x = x + self.pos_conv(x)
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)


class EncoderLayer(nn.Module):
    """One transformer layer of a wav2vec 2.0 / HuBERT / XLS-R encoder."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)[0]


class WavLMLayer(nn.Module):
    """One WavLM layer. WavLM's first layer computes a relative position bias that every later
    layer uses, so these blocks pass (x, bias): the bias as (heads, T, T), the same for every
    sample of the batch, expanded to the batch where it is used."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        x, bias = x if isinstance(x, tuple) else (x, None)
        if bias is not None:
            bias = bias.unsqueeze(0).expand(x.shape[0], -1, -1, -1)
        x, bias = self.layer(x, position_bias=bias)
        return x, bias[0]


class EncoderHead(nn.Module):
    """The encoder's final layer norm where it comes last, mean pooling over time, a 7-class linear."""

    def __init__(self, dim: int, dropout: float, norm: nn.Module | None):
        super().__init__()
        self.norm = norm
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x):
        x = x[0] if isinstance(x, tuple) else x
        if self.norm is not None:
            x = self.norm(x)
        return self.fc(self.drop(x.mean(1)))


class ConvSubsampling(nn.Module):
    """Conformer's front end: two 3x3 stride-2 convolutions on the log-mel (4x fewer frames), a
    linear projection to the model width: (B, F, T) -> (B, T / 4, dim)."""

    def __init__(self, n_features: int, dim: int, dropout: float):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, dim, 3, stride=2), nn.ReLU(), nn.Conv2d(dim, dim, 3, stride=2), nn.ReLU())
        self.proj = nn.Linear(dim * (((n_features - 1) // 2 - 1) // 2), dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        x = self.conv(x.unsqueeze(1))  # (B, dim, F', T')
        b, c, f, t = x.shape
        return self.drop(self.proj(x.permute(0, 3, 1, 2).reshape(b, t, c * f)))


class ConformerBlock(nn.Module):
    """One torchaudio ConformerLayer (it works time-first)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x.transpose(0, 1), None).transpose(0, 1)


# ------------------------------------------------------------------------------------------ zoo

def _cnn(size: str, dropout: float, n_features: int, frames: int) -> BlockModel:
    w = {"small": 8, "base": 16, "large": 32}[size]
    widths = [w, 2 * w, 4 * w, 8 * w]
    blocks = [ConvBlock(1, widths[0], add_channel=True)]
    blocks += [ConvBlock(a, b) for a, b in zip(widths, widths[1:])]
    blocks.append(PoolHead(widths[-1], dropout))
    return BlockModel("cnn", blocks, feature_kind="logmel", n_features=n_features, frames=frames)


def _crnn(size: str, dropout: float, n_features: int, frames: int) -> BlockModel:
    w, hidden = {"small": (8, 32), "base": (16, 64), "large": (32, 128)}[size]
    blocks = [ConvBlock(1, w, add_channel=True), ConvBlock(w, 2 * w),
              ToSequence(2 * w * (n_features // 4), hidden), Recurrent("gru", hidden, hidden, dropout),
              AttentionPool(2 * hidden, dropout)]
    return BlockModel("crnn", blocks, feature_kind="logmel", n_features=n_features, frames=frames)


def _lstm(size: str, dropout: float, n_features: int, frames: int) -> BlockModel:
    hidden, layers = {"small": (32, 2), "base": (64, 2), "large": (128, 3)}[size]
    blocks: list[nn.Module] = [Frames(n_features, hidden, stride=2)]
    blocks += [Recurrent("lstm", hidden if i == 0 else 2 * hidden, hidden, dropout) for i in range(layers)]
    blocks.append(MeanMaxHead(2 * hidden, dropout))
    return BlockModel("lstm", blocks, feature_kind="mfcc", n_features=n_features, frames=frames)


def _transformer(size: str, dropout: float, n_features: int, frames: int) -> BlockModel:
    dim, heads, layers = {"small": (64, 4, 2), "base": (128, 4, 4), "large": (256, 8, 6)}[size]
    blocks: list[nn.Module] = [PatchEmbed(n_features, frames, dim)]
    blocks += [EncoderBlock(dim, heads, dropout) for _ in range(layers)]
    blocks.append(TokenHead(dim, dropout))
    return BlockModel("transformer", blocks, feature_kind="logmel", n_features=n_features, frames=frames)


# The speech encoders: torchaudio builder, generic builder, and what the tiny (--model-size small)
# version keeps of the published one: extractor norm, conv bias, layer norm first.
_ENCODERS: dict[str, tuple[str, str, str, bool, bool]] = {
    "wav2vec2-base": ("wav2vec2_base", "wav2vec2_model", "group_norm", False, False),
    "hubert-base": ("hubert_base", "wav2vec2_model", "group_norm", False, False),
    "wavlm-base": ("wavlm_base", "wavlm_model", "group_norm", False, False),
    "hubert-large": ("hubert_large", "wav2vec2_model", "layer_norm", False, True),
    "wavlm-large": ("wavlm_large", "wavlm_model", "layer_norm", False, True),
    "xlsr-300m": ("wav2vec2_xlsr_300m", "wav2vec2_model", "layer_norm", True, True),
    "xlsr-1b": ("wav2vec2_xlsr_1b", "wav2vec2_model", "layer_norm", True, True),
    "xlsr-2b": ("wav2vec2_xlsr_2b", "wav2vec2_model", "layer_norm", True, True),
}


def encoder(name: str, size: str, dropout: float) -> nn.Module:
    """torchaudio's Wav2Vec2Model of a zoo name: published size (base), or a tiny one of the same
    family for CPU tests (small). No layer drop: it skips layers at random, which DDP cannot
    reduce over and which no two strategies would skip alike."""
    published, generic, mode, conv_bias, norm_first = _ENCODERS[name]
    if size == "large":
        raise ValueError(f"{name} has one published size: --model-size base (or small, a tiny version for tests)")
    drops = dict(encoder_projection_dropout=dropout, encoder_attention_dropout=dropout,
                 encoder_ff_interm_dropout=dropout, encoder_dropout=dropout, encoder_layer_drop=0.0, aux_num_out=None)
    if size == "base":
        return getattr(torchaudio.models, published)(**drops)
    tiny = dict(extractor_mode=mode, extractor_conv_bias=conv_bias, encoder_layer_norm_first=norm_first,
                extractor_conv_layer_config=[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2,
                encoder_embed_dim=64, encoder_pos_conv_kernel=16, encoder_pos_conv_groups=4, encoder_num_layers=2,
                encoder_num_heads=4, encoder_ff_interm_features=128)
    if generic == "wavlm_model":
        tiny.update(encoder_num_buckets=32, encoder_max_distance=128)
    return getattr(torchaudio.models, generic)(**tiny, **drops)


def _speech_encoder(name: str) -> Callable[..., BlockModel]:
    def build(size: str, dropout: float, n_features: int, frames: int) -> BlockModel:
        model = encoder(name, size, dropout)
        tr = model.encoder.transformer
        layer = WavLMLayer if _ENCODERS[name][1] == "wavlm_model" else EncoderLayer
        blocks: list[nn.Module] = [WaveFrontEnd(model.feature_extractor),
                                   EncoderInput(model.encoder.feature_projection, tr)]
        blocks += [layer(l) for l in tr.layers]
        blocks.append(EncoderHead(tr.pos_conv_embed.embed_dim, dropout, None if tr.layer_norm_first else tr.layer_norm))
        return BlockModel(name, blocks, feature_kind="waveform", n_features=n_features, frames=frames)

    return build


def _conformer(size: str, dropout: float, n_features: int, frames: int) -> BlockModel:
    # Conformer S / M / L of Gulati et al. (2020): width, heads, layers; feed-forward 4 x width
    dim, heads, layers = {"small": (144, 4, 16), "base": (256, 4, 16), "large": (512, 8, 17)}[size]
    body = torchaudio.models.Conformer(input_dim=dim, num_heads=heads, ffn_dim=4 * dim, num_layers=layers,
                                       depthwise_conv_kernel_size=31, dropout=dropout)
    blocks: list[nn.Module] = [ConvSubsampling(n_features, dim, dropout)]
    blocks += [ConformerBlock(l) for l in body.conformer_layers]
    blocks.append(TokenHead(dim, dropout))
    return BlockModel("conformer", blocks, feature_kind="logmel", n_features=n_features, frames=frames)


MODELS: dict[str, tuple[Callable[..., BlockModel], str, str]] = {
    # name: (builder, feature kind, one-line description)
    "cnn": (_cnn, "logmel", "4 conv blocks (conv3x3-BN-ReLU-pool) on log-mel, global pool, linear"),
    "crnn": (_crnn, "logmel", "2 conv blocks, bidirectional GRU, attention pooling"),
    "lstm": (_lstm, "mfcc", "strided frame projection, bidirectional LSTM layers on 40 MFCC, mean+max pool"),
    "transformer": (_transformer, "logmel", "16x16 patch embedding, pre-norm encoder layers, mean pool"),
    "conformer": (_conformer, "logmel", "torchaudio Conformer S/M/L (small/base/large) after 4x conv subsampling"),
    **{name: (_speech_encoder(name), "waveform", f"torchaudio {spec[0]} encoder on the 16 kHz waveform, mean pool, linear")
       for name, spec in _ENCODERS.items()},
}


def build_model(name: str, *, size: str = "base", dropout: float = 0.1, n_features: int | None = None,
                frames: int | None = None, device: torch.device | str | None = None) -> BlockModel:
    """A model of the zoo: `build_model("cnn")`. Sizes: small | base | large.

    device: where the parameters are created and initialised ("meta": shapes only, for counting).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}: choose one of {', '.join(SIZES)}")
    builder, kind, _ = MODELS[name]
    n_features = n_features or {"logmel": 64, "mfcc": 40, "waveform": 1}[kind]
    frames = frames or (48_000 if kind == "waveform" else 301)  # 3 s: samples, or 10 ms frames
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = builder(size, dropout, n_features, frames)
    model.build_kwargs = dict(name=name, size=size, dropout=dropout, n_features=n_features, frames=frames)
    return model


def rebuild(model: BlockModel, device: torch.device | str | None = None) -> BlockModel:
    """A fresh model of the same architecture (weights not copied): a target for a full state dict."""
    kw = dict(model.build_kwargs)
    return build_model(kw.pop("name"), device=device, **kw)


def check_model(name: str, size: str) -> None:
    """Raise ValueError for a name or size the zoo lacks, without building anything."""
    build_model(name, size=size, device="meta")


def feature_kind(name: str) -> str:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    return MODELS[name][1]
