"""XLS-R + AASIST (SSL_Anti-spoofing: Tak et al., Odyssey 2022), written from ../shared/reference/ssl-aasist.md.

A wav2vec 2.0 front end (Hugging Face ``transformers.Wav2Vec2Model`` with the XLS-R 300M shapes, fully fine-tuned)
feeds an AASIST back end adapted to its 1024-d frames. Parameter and buffer names of the back end are the
published checkpoints' (``LL``, ``encoder.{i}.0.*``, ``pos_S`` ...); the front end keeps Hugging Face's names under
``ssl_model.`` (the published files' fairseq names are mapped on loading: :mod:`.ssl_weights`).

Shapes for the reference input (B waveforms of 64,600 samples, raw and unnormalised, 16 kHz):
front end [B, 201, 1024] -> LL [B, 201, 128] -> 3x3 max-pool [B, 1, 42, 67] -> encoder [B, 64, 42, 67] ->
attention-weighted spectral nodes [B, 42, 64] and temporal nodes [B, 67, 64] -> heterogeneous graph ->
readout [B, 160] -> logits [B, 2] (class 1 = bona fide).

``transformers`` is an optional extra, imported when a model is built: this module and the family entries load
without it, and building says in one line how to install it.

Two families: ``XLSR-AASIST`` (the published model) and ``XLSR-AASIST-tiny``, the same back end behind a 2-layer,
64-wide front end with the same convolution strides (so the same frame rate and back-end shapes), random init
only: for tests and demos that must run in seconds on a CPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..memory.plan import ModelLimits
from .aasist import GraphAttention, GraphPool, HeteroGraphAttention
from .family import InputSpec, MissingDependencyError, ModelFamily, Section

if TYPE_CHECKING:  # only for annotations: the import itself is deferred to build time
    from transformers import Wav2Vec2Config

INSTALL_HINT = 'pip install -e ".[ssl]"'


def import_transformers() -> Any:
    """The ``transformers`` module; MissingDependencyError (one line, how to install it) when it is absent."""
    try:
        import transformers  # noqa: PLC0415 - optional and heavy: imported when an XLS-R model is built
    except ImportError:
        raise MissingDependencyError(
            f"XLSR-AASIST needs Hugging Face transformers, which is not installed: {INSTALL_HINT}"
        ) from None
    return transformers


# --- the front end ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrontEndConfig:
    """The wav2vec 2.0 front end's shapes and training-time settings."""

    name: str
    hidden: int
    layers: int
    heads: int
    ffn: int
    conv_dim: tuple[int, ...]
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    pos_conv_kernel: int = 128
    pos_conv_groups: int = 16
    # Dropouts and layerdrop: fairseq's Wav2Vec2Config defaults (dropout 0.1, attention 0.1, activation 0.0,
    # dropout_input 0.0, encoder_layerdrop 0.0), which SSLAS fine-tunes with in train mode. Whether xlsr2_300m.pt's
    # stored cfg overrides any of them is unverified (reference §2.5). Hugging Face's hub config says layerdrop 0.1
    # and feat_proj_dropout 0.1; those are not used: layerdrop also makes the graph (and the memory) vary per step.
    hidden_dropout: float = 0.1
    """fairseq ``dropout``: after the positional convolution, after attention, after the feed-forward block."""
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    feat_proj_dropout: float = 0.0
    """fairseq ``dropout_input``: after the 512 -> hidden projection."""
    layerdrop: float = 0.0

    def hf_config(self) -> Wav2Vec2Config:
        """The Hugging Face config: pre-LN (``do_stable_layer_norm``), layer-norm feature extractor, no SpecAugment
        (SSLAS calls fairseq with ``mask=False``; with both mask probabilities 0 there is no ``masked_spec_embed``),
        PyTorch's fused scaled-dot-product attention."""
        transformers = import_transformers()
        return transformers.Wav2Vec2Config(
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            intermediate_size=self.ffn,
            hidden_act="gelu",  # exact (erf) GELU, as fairseq
            conv_dim=list(self.conv_dim),
            conv_kernel=list(self.conv_kernel),
            conv_stride=list(self.conv_stride),
            conv_bias=True,
            num_feat_extract_layers=len(self.conv_dim),
            feat_extract_norm="layer",
            feat_extract_activation="gelu",
            do_stable_layer_norm=True,
            layer_norm_eps=1e-5,
            num_conv_pos_embeddings=self.pos_conv_kernel,
            num_conv_pos_embedding_groups=self.pos_conv_groups,
            hidden_dropout=self.hidden_dropout,
            attention_dropout=self.attention_dropout,
            activation_dropout=self.activation_dropout,
            feat_proj_dropout=self.feat_proj_dropout,
            feat_extract_dropout=0.0,
            final_dropout=0.0,
            layerdrop=self.layerdrop,
            apply_spec_augment=False,
            mask_time_prob=0.0,
            mask_feature_prob=0.0,
            add_adapter=False,
            use_weighted_layer_sum=False,
            attn_implementation="sdpa",
        )

    def frames(self, samples: int) -> int:
        """Frames the convolution stack makes of ``samples`` (201 for 64,600); 0 when it is too short for one."""
        n = samples
        for k, s in zip(self.conv_kernel, self.conv_stride, strict=True):
            if n < k:
                return 0
            n = (n - k) // s + 1
        return n


FRONT_ENDS: dict[str, FrontEndConfig] = {
    # XLS-R 300M (reference §2.4-2.5): 24 pre-LN layers, 1024 wide, 16 heads, FFN 4096, 7 convolutions of 512.
    "XLSR-AASIST": FrontEndConfig("XLSR-AASIST", hidden=1024, layers=24, heads=16, ffn=4096, conv_dim=(512,) * 7),
    # For tests and demos: the same strides (one frame per 320 samples, 201 frames at 64,600), 2 layers of 64.
    "XLSR-AASIST-tiny": FrontEndConfig("XLSR-AASIST-tiny", hidden=64, layers=2, heads=4, ffn=128, conv_dim=(32,) * 7,
                                       pos_conv_kernel=16, pos_conv_groups=4),
}


# --- the back end -------------------------------------------------------------------------------------------------


class Residual2d(nn.Module):
    """conv(2,3) -> BN -> SELU -> conv(2,3), plus the (projected when the width changes) input; no pooling.

    Blocks after the first own a ``bn1`` that the published code computes and then discards (conv1 reads the raw
    input: AASIST's bug, kept by SSL_Anti-spoofing and its checkpoints). It is here so the published weights load
    strictly, and it is not computed: it never reaches the output (tests/test_ssl_aasist.py changes it and sees the
    same logits). Its running statistics therefore keep their loaded values where the reference's would drift.
    """

    def __init__(self, in_ch: int, out_ch: int, first: bool = False) -> None:
        super().__init__()
        if not first:
            self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, kernel_size=(2, 3), padding=(1, 1))
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, kernel_size=(2, 3), padding=(0, 1))
        self.conv_downsample = nn.Conv2d(in_ch, out_ch, kernel_size=(1, 3), padding=(0, 1)) if in_ch != out_ch else None

    def forward(self, x: Tensor) -> Tensor:
        # SELU in place on BatchNorm's output: BN's backward needs its input, not its output.
        out = self.conv2(F.selu(self.bn2(self.conv1(x)), inplace=True))
        return out + (x if self.conv_downsample is None else self.conv_downsample(x))


BLOCKS = ((1, 32), (32, 32), (32, 64), (64, 64), (64, 64), (64, 64))
"""(in, out) channels of the six residual blocks (reference §1.2 step 8)."""
GAT_DIMS = (64, 32)
POOL_RATIO = 0.5  # every graph pool (reference §1.1)
TEMPERATURES = (2.0, 2.0, 100.0)  # GAT_S, GAT_T, all four HS-GAL layers
PROJECTION = 128  # LL's output width: the spectral axis of the 2-D map
SPECTRAL_NODES = PROJECTION // 3  # 42, after the 3x3 max-pool


class XLSRAASIST(nn.Module):
    """``forward(x)`` takes raw 16 kHz waveforms [B, T] (or [B, 1, T]) and returns logits [B, 2]."""

    def __init__(self, front: FrontEndConfig | str = "XLSR-AASIST") -> None:
        super().__init__()
        front = FRONT_ENDS[front] if isinstance(front, str) else front
        self.front = front
        transformers = import_transformers()
        gat0, gat1 = GAT_DIMS
        c_last = BLOCKS[-1][1]
        t_s, t_t, t_h = TEMPERATURES

        # Registration order follows the published state dict: module-level parameters, the SSL model, then the
        # back end's modules as SSLAS registers them.
        self.pos_S = nn.Parameter(torch.randn(1, SPECTRAL_NODES, c_last))
        self.master1 = nn.Parameter(torch.randn(1, 1, gat0))
        self.master2 = nn.Parameter(torch.randn(1, 1, gat0))
        self.ssl_model = transformers.Wav2Vec2Model(front.hf_config())
        self.LL = nn.Linear(front.hidden, PROJECTION)
        self.first_bn = nn.BatchNorm2d(1)
        self.first_bn1 = nn.BatchNorm2d(c_last)
        self.drop = nn.Dropout(0.5)
        self.drop_way = nn.Dropout(0.2)
        # Each block sits in a one-element Sequential only so the keys read "encoder.{i}.0.conv1.weight".
        self.encoder = nn.Sequential(*(nn.Sequential(Residual2d(i, o, first=(n == 0))) for n, (i, o) in enumerate(BLOCKS)))
        self.attention = nn.Sequential(
            nn.Conv2d(c_last, 128, kernel_size=1),
            nn.SELU(inplace=True),  # before the BatchNorm, as published
            nn.BatchNorm2d(128),
            nn.Conv2d(128, c_last, kernel_size=1),
        )
        self.GAT_layer_S = GraphAttention(c_last, gat0, t_s)
        self.GAT_layer_T = GraphAttention(c_last, gat0, t_t)
        self.HtrgGAT_layer_ST11 = HeteroGraphAttention(gat0, gat1, t_h)
        self.HtrgGAT_layer_ST12 = HeteroGraphAttention(gat1, gat1, t_h)
        self.HtrgGAT_layer_ST21 = HeteroGraphAttention(gat0, gat1, t_h)
        self.HtrgGAT_layer_ST22 = HeteroGraphAttention(gat1, gat1, t_h)
        self.pool_S = GraphPool(POOL_RATIO, gat0)
        self.pool_T = GraphPool(POOL_RATIO, gat0)
        self.pool_hS1 = GraphPool(POOL_RATIO, gat1)
        self.pool_hT1 = GraphPool(POOL_RATIO, gat1)
        self.pool_hS2 = GraphPool(POOL_RATIO, gat1)
        self.pool_hT2 = GraphPool(POOL_RATIO, gat1)
        self.out_layer = nn.Linear(5 * gat1, 2)

    @staticmethod
    def check_input(x: Tensor) -> Tensor:
        """Return x as [B, T]; raise ValueError naming the shape for anything else."""
        if x.dim() == 3 and x.size(1) == 1:
            return x.squeeze(1)
        if x.dim() == 2:
            return x
        raise ValueError(f"XLSR-AASIST expects a waveform shaped [B, T] or [B, 1, T], got {list(x.shape)}")

    def features(self, x: Tensor) -> Tensor:
        """Waveforms [B, T] -> the SSL model's last hidden state after its final LayerNorm, [B, frames, hidden]."""
        return self.ssl_model(x).last_hidden_state

    def branch(self, out_t: Tensor, out_s: Tensor, master: Tensor, layers: tuple[nn.Module, ...]) -> tuple[Tensor, ...]:
        first, second, pool_s, pool_t = layers
        t, s, m = first(out_t, out_s, master)  # master: the (1, 1, 64) parameter itself, broadcast over the batch
        s, t = pool_s(s), pool_t(t)
        t_aug, s_aug, m_aug = second(t, s, m)
        return self.drop_way(t + t_aug), self.drop_way(s + s_aug), self.drop_way(m + m_aug)

    def back_end(self, feats: Tensor) -> Tensor:
        """Frames [B, frames, hidden] -> readout embedding [B, 160] (before the final dropout)."""
        x = self.LL(feats).transpose(1, 2).unsqueeze(1)  # [B, 1, 128, frames]
        x = F.max_pool2d(x, (3, 3))  # no abs() here, unlike AASIST
        x = F.selu(self.first_bn(x), inplace=True)
        x = F.selu(self.first_bn1(self.encoder(x)), inplace=True)  # [B, 64, 42, frames // 3]

        w = self.attention(x)
        nodes_s = (x * torch.softmax(w, dim=-1)).sum(dim=-1).transpose(1, 2) + self.pos_S  # over time: [B, 42, 64]
        out_s = self.pool_S(self.GAT_layer_S(nodes_s))
        nodes_t = (x * torch.softmax(w, dim=-2)).sum(dim=-2).transpose(1, 2)  # over frequency: [B, frames // 3, 64]
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
        embedding = self.back_end(self.features(self.check_input(x)))
        logits = self.out_layer(self.drop(embedding))
        return (logits, embedding) if return_embedding else logits


def min_samples(front: FrontEndConfig) -> int:
    """Shortest input the model takes: three frames, for the back end's 3x3 max-pool (1,040 samples)."""
    n = 1
    while front.frames(n) < 3:
        n += 1
    return n


# --- the families -------------------------------------------------------------------------------------------------

REFERENCE_SAMPLES = 64_600
"""The published recipe's input: the first 64,600 samples (~4 s), short recordings tiled."""

_LAYER = re.compile(r"ssl_model\.encoder\.layers\.\d+")


def _is_transformer_layer(name: str, module: nn.Module) -> bool:
    return _LAYER.fullmatch(name) is not None


def _is_feature_encoder(name: str, module: nn.Module) -> bool:
    return name == "ssl_model.feature_extractor"


def _load_policies() -> dict:
    from ..memory.techniques import Policy  # noqa: PLC0415 - the techniques import this package

    # Step-time factors are estimates (one extra forward of what is recomputed), not yet measured for this family.
    return {
        "none": Policy("none"),
        # Each transformer layer recomputed whole in backward: only its input (B x frames x hidden) is kept.
        "layers": Policy("layers", recompute=_is_transformer_layer, relative_time=1.3),
        # The convolution stack recomputed as one: it keeps only the waveform. Its first layers' maps (512 x 12,919
        # per sample at 64,600) are the largest activations of the model.
        "cnn": Policy("cnn", recompute=_is_feature_encoder, relative_time=1.1),
        "layers+cnn": Policy("layers+cnn", recompute=lambda n, m: _is_transformer_layer(n, m) or
                             _is_feature_encoder(n, m), relative_time=1.4),
    }


def _convert_state(front: FrontEndConfig):
    def convert(state):
        from .ssl_weights import convert_state  # noqa: PLC0415 - the key mapping, loaded when weights are read

        return convert_state(state, front)

    return convert


def _family(front: FrontEndConfig, summary: str) -> ModelFamily:
    sections = (
        Section("feature encoder", ""),
        Section("feature projection", "ssl_model.feature_projection"),
        Section("positional conv", "ssl_model.encoder.pos_conv_embed"),
        *(Section(f"layer {i}", f"ssl_model.encoder.layers.{i}") for i in range(front.layers)),
        Section("back end", "ssl_model", at="end"),  # LL, the 2-D encoder, the graphs and the readout
    )
    return ModelFamily(
        name=front.name,
        summary=summary,
        build=lambda: XLSRAASIST(front),
        owns=lambda model: isinstance(model, XLSRAASIST) and model.front == front,
        profile="xlsr-aasist",
        input=InputSpec(
            sample_rate=16_000,
            eval_samples=REFERENCE_SAMPLES,
            min_samples=min_samples(front),
            full_hop=REFERENCE_SAMPLES // 2,
        ),
        limits=ModelLimits(
            # One utterance trains: every BatchNorm sees many values per channel (the 2-D maps' 42 x 67 positions,
            # the graphs' nodes), and the master nodes have none. Below 8 the statistics are noisier than the
            # recipe's 14 per forward, as for AASIST's same BatchNorms.
            min_micro_batch=1,
            noisy_below=8,
            fallback_crops=(48_000, 32_000, 24_000, 16_000),
        ),
        policy_names=("none", "layers", "cnn", "layers+cnn"),
        auto_policies=("none", "layers", "layers+cnn"),
        load_policies=_load_policies,
        channels_last_module="encoder",
        # The bn1 of blocks 1-5, which the published model computes and discards (see Residual2d).
        never_trained=lambda name: ".bn1." in name,
        sections=sections,
        convert_state=_convert_state(front),
    )


FAMILIES: dict[str, ModelFamily] = {
    "XLSR-AASIST": _family(
        FRONT_ENDS["XLSR-AASIST"],
        "XLS-R 300M + AASIST (SSL_Anti-spoofing, Tak et al., Odyssey 2022), 315,884,938 parameters; needs .[ssl]",
    ),
    "XLSR-AASIST-tiny": _family(
        FRONT_ENDS["XLSR-AASIST-tiny"],
        "XLSR-AASIST's back end behind a 2-layer, 64-wide front end: for tests and demos (random init only)",
    ),
}
