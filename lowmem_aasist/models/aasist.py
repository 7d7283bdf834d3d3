"""AASIST and AASIST-L (Jung et al., ICASSP 2022), written from the paper and the published model's facts.

Module and parameter names follow the published state dicts so their weights load with ``strict=True``.
Both variants are one class; their hyper-parameters are data (:data:`ARCHS`), and each is a model family
(:data:`FAMILIES`): what the trainer, the scorer and the memory engine may know about it.

Shapes for the reference input (B waveforms of 64,600 samples):
front end [B, 1, 23, 21490] -> encoder [B, C, 23, 29] -> spectral nodes [B, 23, C] and temporal nodes
[B, 29, C] -> heterogeneous graph -> readout [B, 5 * gat_dims[1]] -> logits [B, 2] (class 1 = bona fide).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..memory.plan import ModelLimits
from .family import InputSpec, ModelFamily, Section


@dataclass(frozen=True)
class ArchConfig:
    """Hyper-parameters of one AASIST variant."""

    name: str
    channels: tuple[tuple[int, int], ...]  # (in, out) of each residual block, block 0 first
    gat_dims: tuple[int, int]
    pool_ratios: tuple[float, float, float, float]
    temperatures: tuple[float, float, float, float]
    n_filters: int = 70
    first_conv: int = 128
    sample_rate: int = 16_000

    @property
    def embedding_dim(self) -> int:
        return 5 * self.gat_dims[1]


def _blocks(*pairs: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    # The published models repeat their last block spec three times (six blocks from five specs).
    return (*pairs, pairs[-1], pairs[-1])


ARCHS: dict[str, ArchConfig] = {
    "AASIST": ArchConfig(
        name="AASIST",
        channels=_blocks((1, 32), (32, 32), (32, 64), (64, 64)),
        gat_dims=(64, 32),
        pool_ratios=(0.5, 0.7, 0.5, 0.5),
        temperatures=(2.0, 2.0, 100.0, 100.0),
    ),
    "AASIST-L": ArchConfig(
        name="AASIST-L",
        channels=_blocks((1, 32), (32, 32), (32, 24), (24, 24)),
        gat_dims=(24, 32),
        pool_ratios=(0.4, 0.5, 0.7, 0.5),
        temperatures=(2.0, 2.0, 100.0, 100.0),
    ),
}


def mel_bandpass_bank(n_filters: int, kernel_size: int, sample_rate: int) -> Tensor:
    """Fixed Hamming-windowed ideal band-pass filters with mel-spaced edges, [n_filters, kernel_size] float32."""
    if kernel_size % 2 == 0:
        kernel_size += 1  # symmetric (linear-phase) filters need an odd length
    to_mel = lambda hz: 2595.0 * np.log10(1.0 + hz / 700.0)  # noqa: E731
    to_hz = lambda mel: 700.0 * (10.0 ** (mel / 2595.0) - 1.0)  # noqa: E731
    grid = (sample_rate // 2) * np.linspace(0.0, 1.0, 257)
    mel = to_mel(grid)
    edges = to_hz(np.linspace(mel.min(), mel.max(), n_filters + 1))
    # The published filters were formed on a float32 time axis, so the sinc ran in float32; doing the same
    # brings our scores from ~2e-5 to ~3e-6 of the published ones.
    n = torch.arange(kernel_size, dtype=torch.float32, device="cpu") - (kernel_size - 1) / 2
    window = torch.from_numpy(np.hamming(kernel_size)).float()
    bank = torch.empty(n_filters, kernel_size, device="cpu")
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        high = (2 * hi / sample_rate) * np.sinc((2 * float(hi) * n / sample_rate).numpy())
        low = (2 * lo / sample_rate) * np.sinc((2 * float(lo) * n / sample_rate).numpy())
        bank[i] = window * torch.from_numpy(high - low).float()
    return bank


class SincFrontEnd(nn.Module):
    """The fixed filter bank (not trainable, not in the state dict): [B, 1, T] -> [B, n_filters, T - kernel + 1]."""

    def __init__(self, n_filters: int, kernel_size: int, sample_rate: int) -> None:
        super().__init__()
        self.register_buffer("bank", mel_bandpass_bank(n_filters, kernel_size, sample_rate).unsqueeze(1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv1d(x, self.bank.to(x.dtype))


class ResidualBlock(nn.Module):
    """conv(2,3) -> BN -> SELU -> conv(2,3), plus the (optionally projected) input, then max-pool over time by 3.

    Blocks after the first own a ``bn1`` that the published code computes and then discards (conv1 reads the
    raw input). It stays here so the published weights load strictly; computing it would change nothing but
    its own running statistics, so it is skipped (tests/test_model.py proves outputs and gradients unchanged).
    """

    def __init__(self, in_ch: int, out_ch: int, first: bool = False) -> None:
        super().__init__()
        if not first:
            self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, kernel_size=(2, 3), padding=(1, 1))
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, kernel_size=(2, 3), padding=(0, 1))
        self.conv_downsample = nn.Conv2d(in_ch, out_ch, kernel_size=(1, 3), padding=(0, 1)) if in_ch != out_ch else None
        self.pool = nn.MaxPool2d((1, 3))

    def forward(self, x: Tensor) -> Tensor:
        # SELU in place on BatchNorm's output, as the published code: BN's backward needs its input, not its output,
        # so the copy an out-of-place SELU keeps would be pure waste (~107 MiB per sample in fp32 at 64,600).
        out = self.conv2(F.selu(self.bn2(self.conv1(x)), inplace=True))
        out = out + (x if self.conv_downsample is None else self.conv_downsample(x))
        return self.pool(out)


def _xavier(*size: int) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*size))
    nn.init.xavier_normal_(p)
    return p


def _pairwise(x: Tensor) -> Tensor:
    """[B, N, D] -> [B, N, N, D] with element (i, j) = x_i * x_j."""
    return x.unsqueeze(2) * x.unsqueeze(1)


def _node_bn(bn: nn.BatchNorm1d, x: Tensor) -> Tensor:
    # BatchNorm over every node of every graph in the batch, as one flat set of feature vectors.
    return bn(x.reshape(-1, x.size(-1))).view_as(x)


class GraphAttention(nn.Module):
    """Graph attention over a fully connected graph of homogeneous nodes: [B, N, in] -> [B, N, out]."""

    def __init__(self, in_dim: int, out_dim: int, temperature: float) -> None:
        super().__init__()
        self.att_proj = nn.Linear(in_dim, out_dim)
        self.att_weight = _xavier(out_dim, 1)
        self.proj_with_att = nn.Linear(in_dim, out_dim)
        self.proj_without_att = nn.Linear(in_dim, out_dim)
        self.bn = nn.BatchNorm1d(out_dim)
        self.input_drop = nn.Dropout(0.2)
        self.temperature = temperature

    def forward(self, x: Tensor) -> Tensor:
        x = self.input_drop(x)
        scores = torch.tanh(self.att_proj(_pairwise(x))) @ self.att_weight  # [B, N, N, 1]
        att = torch.softmax(scores.squeeze(-1) / self.temperature, dim=-1)  # row i: weights over neighbours j
        out = self.proj_with_att(att @ x) + self.proj_without_att(x)
        return F.selu(_node_bn(self.bn, out))


class HeteroGraphAttention(nn.Module):
    """Attention over spectral + temporal nodes with type-aware weights and a master node.

    Inputs x1 [B, N1, in], x2 [B, N2, in], master [1 or B, 1, in]; outputs the updated nodes of each type
    [B, N1, out], [B, N2, out] and the master [B, 1, out].
    """

    def __init__(self, in_dim: int, out_dim: int, temperature: float) -> None:
        super().__init__()
        self.proj_type1 = nn.Linear(in_dim, in_dim)
        self.proj_type2 = nn.Linear(in_dim, in_dim)
        self.att_proj = nn.Linear(in_dim, out_dim)
        self.att_projM = nn.Linear(in_dim, out_dim)
        self.att_weight11 = _xavier(out_dim, 1)
        self.att_weight22 = _xavier(out_dim, 1)
        self.att_weight12 = _xavier(out_dim, 1)  # shared by both cross-type directions
        self.att_weightM = _xavier(out_dim, 1)
        self.proj_with_att = nn.Linear(in_dim, out_dim)
        self.proj_without_att = nn.Linear(in_dim, out_dim)
        self.proj_with_attM = nn.Linear(in_dim, out_dim)
        self.proj_without_attM = nn.Linear(in_dim, out_dim)
        self.bn = nn.BatchNorm1d(out_dim)
        self.input_drop = nn.Dropout(0.2)
        self.temperature = temperature

    def _type_scores(self, hidden: Tensor, n1: int) -> Tensor:
        """Per-edge scores [B, N, N]: each block of the node-pair grid uses the attention vector of its types."""
        w = torch.cat([self.att_weight11, self.att_weight12, self.att_weight22], dim=1)  # [out, 3]
        all_scores = hidden @ w  # [B, N, N, 3]: every vector applied everywhere, then the right one picked
        n = hidden.size(1)
        is_2 = torch.arange(n, device=hidden.device) >= n1
        pick = (is_2.unsqueeze(1).long() + is_2.unsqueeze(0).long()).expand(hidden.size(0), n, n)
        return all_scores.gather(-1, pick.unsqueeze(-1)).squeeze(-1)

    def forward(self, x1: Tensor, x2: Tensor, master: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n1 = x1.size(1)
        x = self.input_drop(torch.cat([self.proj_type1(x1), self.proj_type2(x2)], dim=1))

        hidden = torch.tanh(self.att_proj(_pairwise(x)))
        att = torch.softmax(self._type_scores(hidden, n1) / self.temperature, dim=-1)

        m_scores = torch.tanh(self.att_projM(x * master)) @ self.att_weightM  # [B, N, 1]
        m_att = torch.softmax(m_scores / self.temperature, dim=-2)
        master = self.proj_with_attM(m_att.transpose(1, 2) @ x) + self.proj_without_attM(master)

        out = self.proj_with_att(att @ x) + self.proj_without_att(x)
        out = F.selu(_node_bn(self.bn, out))
        return out[:, :n1], out[:, n1:], master


class GraphPool(nn.Module):
    """Keep the top max(int(N * ratio), 1) nodes ranked by a learned sigmoid score, scaled by that score."""

    def __init__(self, ratio: float, in_dim: int, dropout: float = 0.3) -> None:
        super().__init__()
        self.ratio = ratio
        self.proj = nn.Linear(in_dim, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor) -> Tensor:
        scores = torch.sigmoid(self.proj(self.drop(h)))  # [B, N, 1]
        k = max(int(h.size(1) * self.ratio), 1)
        idx = scores.topk(k, dim=1).indices.expand(-1, -1, h.size(2))
        return (h * scores).gather(1, idx)


class AASIST(nn.Module):
    """AASIST / AASIST-L. ``forward(x)`` takes a 16 kHz waveform [B, T] or [B, 1, T] and returns logits [B, 2]."""

    def __init__(self, arch: ArchConfig | str = "AASIST") -> None:
        super().__init__()
        arch = ARCHS[arch] if isinstance(arch, str) else arch
        self.arch = arch
        gat0, gat1 = arch.gat_dims
        c_last = arch.channels[-1][1]
        t_s, t_t, t_h, _ = arch.temperatures
        r_s, r_t, r_h, _ = arch.pool_ratios

        self.conv_time = SincFrontEnd(arch.n_filters, arch.first_conv, arch.sample_rate)
        self.first_bn = nn.BatchNorm2d(1)
        # Each block sits in a one-element Sequential only so the state-dict keys match ("encoder.0.0.conv1").
        self.encoder = nn.Sequential(
            *(nn.Sequential(ResidualBlock(i, o, first=(n == 0))) for n, (i, o) in enumerate(arch.channels))
        )
        self.pos_S = nn.Parameter(torch.randn(1, 23, c_last))
        self.master1 = nn.Parameter(torch.randn(1, 1, gat0))
        self.master2 = nn.Parameter(torch.randn(1, 1, gat0))
        self.GAT_layer_S = GraphAttention(c_last, gat0, t_s)
        self.GAT_layer_T = GraphAttention(c_last, gat0, t_t)
        self.HtrgGAT_layer_ST11 = HeteroGraphAttention(gat0, gat1, t_h)
        self.HtrgGAT_layer_ST12 = HeteroGraphAttention(gat1, gat1, t_h)
        self.HtrgGAT_layer_ST21 = HeteroGraphAttention(gat0, gat1, t_h)
        self.HtrgGAT_layer_ST22 = HeteroGraphAttention(gat1, gat1, t_h)
        self.pool_S = GraphPool(r_s, gat0)
        self.pool_T = GraphPool(r_t, gat0)
        self.pool_hS1 = GraphPool(r_h, gat1)
        self.pool_hT1 = GraphPool(r_h, gat1)
        self.pool_hS2 = GraphPool(r_h, gat1)
        self.pool_hT2 = GraphPool(r_h, gat1)
        self.drop_way = nn.Dropout(0.2)
        self.drop = nn.Dropout(0.5)
        self.out_layer = nn.Linear(arch.embedding_dim, 2)

    @staticmethod
    def check_input(x: Tensor) -> Tensor:
        """Return x as [B, 1, T]; raise ValueError naming the shape for anything else."""
        if x.dim() == 2:
            return x.unsqueeze(1)
        if x.dim() == 3 and x.size(1) == 1:
            return x
        raise ValueError(
            f"AASIST expects a waveform shaped [B, T] or [B, 1, T], got {list(x.shape)}"
            + (" (squeeze the extra dimension: x.view(x.size(0), -1))" if x.dim() == 4 else "")
        )

    def front_end(self, x: Tensor) -> Tensor:
        """[B, 1, T] -> [B, 1, 23, (T - 128) // 3]: filter bank, |.|, 3x3 max-pool, BN, SELU."""
        x = self.conv_time(x).unsqueeze(1)
        x = F.max_pool2d(x.abs(), (3, 3))
        return F.selu(self.first_bn(x), inplace=True)

    def branch(self, out_t: Tensor, out_s: Tensor, master: Tensor, layers: tuple[nn.Module, ...]) -> tuple[Tensor, ...]:
        first, second, pool_s, pool_t = layers
        t, s, m = first(out_t, out_s, master)
        s, t = pool_s(s), pool_t(t)
        t_aug, s_aug, m_aug = second(t, s, m)
        return self.drop_way(t + t_aug), self.drop_way(s + s_aug), self.drop_way(m + m_aug)

    def graph(self, e: Tensor) -> Tensor:
        """Encoder output [B, C, 23, T''] -> readout embedding [B, 5 * gat_dims[1]] (before final dropout)."""
        e = e.abs()
        nodes_s = e.amax(dim=3).transpose(1, 2) + self.pos_S  # spectral nodes: max over time
        nodes_t = e.amax(dim=2).transpose(1, 2)  # temporal nodes: max over frequency
        out_s = self.pool_S(self.GAT_layer_S(nodes_s))
        out_t = self.pool_T(self.GAT_layer_T(nodes_t))

        t1, s1, m1 = self.branch(
            out_t, out_s, self.master1, (self.HtrgGAT_layer_ST11, self.HtrgGAT_layer_ST12, self.pool_hS1, self.pool_hT1)
        )
        t2, s2, m2 = self.branch(
            out_t, out_s, self.master2, (self.HtrgGAT_layer_ST21, self.HtrgGAT_layer_ST22, self.pool_hS2, self.pool_hT2)
        )
        t, s, m = torch.maximum(t1, t2), torch.maximum(s1, s2), torch.maximum(m1, m2)
        return torch.cat([t.abs().amax(dim=1), t.mean(dim=1), s.abs().amax(dim=1), s.mean(dim=1), m.squeeze(1)], dim=1)

    def forward(self, x: Tensor, return_embedding: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        embedding = self.graph(self.encoder(self.front_end(self.check_input(x))))
        logits = self.out_layer(self.drop(embedding))
        return (logits, embedding) if return_embedding else logits


def receptive_frames(samples: int, arch: ArchConfig) -> int:
    """Temporal nodes the encoder leaves for an input of ``samples`` (29 for the reference 64,600)."""
    t = (samples - (arch.first_conv | 1) + 1) // 3
    for _ in arch.channels:
        t //= 3
    return t


def min_samples(arch: ArchConfig) -> int:
    """Shortest input that leaves one temporal node after the front-end pool and the six block pools (2,315)."""
    return (arch.first_conv | 1) - 1 + 3 ** (len(arch.channels) + 1)


# --- the families ------------------------------------------------------------------------------------------------

REFERENCE_SAMPLES = 64_600
"""The published recipe's training crop and evaluation input (~4 s at 16 kHz)."""


def _load_policies() -> dict:
    from .aasist_memory import (
        POLICIES,  # autograd Functions and kernels: loaded only when a policy is applied
    )

    return POLICIES


def _family(arch: ArchConfig, profile: str, summary: str) -> ModelFamily:
    sections = (
        Section("front end", ""),
        *(Section(f"encoder.{i}", f"encoder.{i}") for i in range(len(arch.channels))),
        Section("graph", "encoder", at="end"),  # everything after the encoder: graph layers, pools, readout
    )
    return ModelFamily(
        name=arch.name,
        summary=summary,
        build=lambda: AASIST(arch),
        owns=lambda model: isinstance(model, AASIST) and model.arch == arch,
        profile=profile,
        input=InputSpec(
            sample_rate=arch.sample_rate,
            eval_samples=REFERENCE_SAMPLES,
            min_samples=min_samples(arch),
            full_hop=REFERENCE_SAMPLES // 2,
        ),
        limits=ModelLimits(
            # The graph BatchNorm normalises the master node over the batch: one utterance has no variance per
            # channel, and PyTorch refuses it in training mode.
            min_micro_batch=2,
            why_min="its graph BatchNorm needs more than one",
            noisy_below=8,
            fallback_crops=(48_000, 32_000, 24_000, 16_000),
        ),
        policy_names=("none", "gat", "encoder", "block0-segments", "all", "block0", "tiled"),
        # Measured (benchmarks/results/cpu/memory_matrix.md): the others never win on memory or on time.
        auto_policies=("none", "tiled"),
        load_policies=_load_policies,
        channels_last_module="encoder",
        # The bn1 of blocks 1-5, which the published model computes and discards (see ResidualBlock).
        never_trained=lambda name: ".bn1." in name,
        sections=sections,
    )


FAMILIES: dict[str, ModelFamily] = {
    "AASIST": _family(ARCHS["AASIST"], "aasist", "AASIST (Jung et al., ICASSP 2022), 297,866 parameters"),
    "AASIST-L": _family(ARCHS["AASIST-L"], "aasist-l", "AASIST-L, the light variant, 85,306 parameters"),
}
