"""GPT: a decoder-only language model whose block GEMMs run in FP8.

Invariant: every GEMM is an ``fp8lab.Linear`` (4 per block plus the LM head), each with
its own ScalingState; which of them stay in BF16 is decided once, at construction, by
the model's ``PrecisionPolicy`` (by default only ``lm_head``). Embeddings, norms,
rotary embeddings, residuals and the attention core never run in FP8. A model is fully
described by its frozen ``GPTConfig``.

Module names (they are the layer names in ``describe`` and TensorBoard):
``tok_emb``, ``pos_emb`` (learned positions only), ``blocks.<i>.attn.{norm,qkv,rotary,proj}``
(``rotary``: rotary positions only), ``blocks.<i>.mlp.{norm,fc1,fc2}``, ``final_norm``,
``lm_head``. Under SwiGLU ``fc1`` is the gate and up projections fused, [gate; up].

Two block styles, chosen by fields: GPT-2's (the default: LayerNorm, GELU, learned
positions, biases) and Llama's (``"llama-tiny"``: RMSNorm, SwiGLU, rotary positions, no
biases), the style most FP8 training results in the literature are reported on.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from fp8lab.layers import choices
from fp8lab.layers.attention import check_attention_core
from fp8lab.layers.block import TransformerBlock
from fp8lab.layers.linear import Linear
from fp8lab.layers.mlp import check_activation
from fp8lab.layers.norm import Norm, check_normalization
from fp8lab.layers.policy import PrecisionPolicy
from fp8lab.layers.rotary import DEFAULT_BASE, check_rotary_base
from fp8lab.options import FP8Options, as_options

INIT_STD = 0.02  # GPT-2's initialisation

PRESETS: dict[str, dict] = {
    # Byte-level, trains at ~10 steps/s on 2 CPU cores at batch 16 x 64 (emulated FP8).
    "tiny": dict(
        vocab_size=256, block_size=128, num_layers=4, hidden_size=128, num_attention_heads=4, ffn_hidden_size=512
    ),
    # GPT-2 small; vocab 50257 padded to a multiple of 64 (nanoGPT), so every GEMM can run FP8.
    # Tied embeddings, as GPT-2: 124M parameters (163M untied).
    "gpt2-124m": dict(
        vocab_size=50304,
        block_size=1024,
        num_layers=12,
        hidden_size=768,
        num_attention_heads=12,
        ffn_hidden_size=3072,
        tie_embeddings=True,
    ),
    # "tiny" in Llama's block style: RMSNorm, SwiGLU, rotary positions, no biases. SwiGLU's
    # size per half is Llama's rule, 2/3 of 4 * hidden_size rounded up to a multiple (Llama:
    # 256; 64 here): 2/3 * 512 = 341.3 -> 384, about the GELU MLP's parameters (+12%).
    "llama-tiny": dict(
        vocab_size=256,
        block_size=128,
        num_layers=4,
        hidden_size=128,
        num_attention_heads=4,
        ffn_hidden_size=384,
        normalization="RMSNorm",
        activation="swiglu",
        position_embedding="rotary",
        bias=False,
    ),
}

POSITION_EMBEDDINGS = ("learned", "rotary")


# GPTConfig.from_preset keywords folded into ``fp8`` (fields of FP8Options).
FP8_SHORTHANDS = ("scaling", "backend", "fallback")


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    """Everything that defines a GPT, validated at construction.

    Args:
        vocab_size: number of token ids.
        block_size: longest sequence the model takes (position embeddings).
        num_layers: number of transformer blocks.
        hidden_size: model width; divisible by ``num_attention_heads``.
        num_attention_heads: attention heads per block.
        ffn_hidden_size: MLP intermediate size.
        normalization: "LayerNorm" or "RMSNorm".
        activation: "gelu" (tanh approximation) or "swiglu" (``ffn_hidden_size`` per half).
        position_embedding: "learned" (a ``pos_emb`` table added to the token embeddings,
            GPT-2) or "rotary" (q and k rotated by position in every attention, Llama; no
            ``pos_emb``; the head size must be even).
        rotary_base: theta of the rotary angles (10000 in Llama); unused with "learned".
        attention_core: where the attention core computes: "auto" (float32 on CPU, the
            activations' dtype elsewhere), "native" or "fp32".
        fp8_dpa: QK^T and PV as FP8 GEMMs with their own delayed-scaling state in every
            attention whose QKV projection runs in FP8 (``fp8lab.layers.fp8_attention``;
            Transformer Engine's recipe field of that name); off by default.
        bias: biases in every block GEMM (the LM head never has one).
        tie_embeddings: share the LM head's weight with the token embedding.
        fp8: the FP8 options of every GEMM, as ``fp8lab.Linear`` takes them (an FP8Options,
            a scaling recipe alone, or None: ``FP8Options()``).
        policy: which layers stay in BF16 (None: ``PrecisionPolicy()``, the LM head).
    """

    vocab_size: int
    block_size: int
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    normalization: str = "LayerNorm"
    activation: str = "gelu"
    position_embedding: str = "learned"
    rotary_base: float = DEFAULT_BASE
    attention_core: str = "auto"
    fp8_dpa: bool = False
    bias: bool = True
    tie_embeddings: bool = False
    fp8: FP8Options | None = None
    policy: PrecisionPolicy | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size"):
            _positive_int(name, getattr(self, name))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        check_normalization(self.normalization)
        check_activation(self.activation)
        choices.one_of("position_embedding", self.position_embedding, POSITION_EMBEDDINGS)
        object.__setattr__(self, "rotary_base", check_rotary_base(self.rotary_base))
        head_size = self.hidden_size // self.num_attention_heads
        if self.position_embedding == "rotary" and head_size % 2:
            raise ValueError(
                f"position_embedding='rotary' pairs a head's channels: the head size hidden_size / "
                f"num_attention_heads must be even, got {self.hidden_size} / {self.num_attention_heads} = {head_size}"
            )
        check_attention_core(self.attention_core)
        for name in ("bias", "tie_embeddings", "fp8_dpa"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        object.__setattr__(self, "fp8", as_options(self.fp8))  # None, an FP8Options or a scaling recipe
        if self.policy is not None and not isinstance(self.policy, PrecisionPolicy):
            raise ValueError(f"policy must be a PrecisionPolicy or None, got {self.policy!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        """A preset ("tiny", "gpt2-124m", "llama-tiny") with any field replaced by ``overrides``.

        Args:
            name: "tiny", "gpt2-124m" or "llama-tiny".
            overrides: GPTConfig fields, plus the shorthands ``scaling=``, ``backend=``
                and ``fallback=``, which replace those fields of ``fp8`` (given or default).
        """
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
        shorthand = {k: overrides.pop(k) for k in FP8_SHORTHANDS if k in overrides}
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s) {unknown}; allowed: {sorted(fields | set(FP8_SHORTHANDS))}")
        if shorthand:
            overrides["fp8"] = dataclasses.replace(as_options(overrides.get("fp8")), **shorthand)
        return cls(**{**PRESETS[name], **overrides})


class GPT(nn.Module):
    """Token (+ learned position) embeddings, pre-norm blocks, final norm, LM head.

    ``model(idx)`` maps token ids (B, T) int64, T <= block_size, to logits (B, T, V) in
    the GEMM output dtype (BF16 under autocast). The constructor takes the fields of
    ``GPTConfig`` (see there); ``GPT.from_config`` and ``GPT.from_preset`` build from one.
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        num_layers: int,
        hidden_size: int,
        num_attention_heads: int,
        ffn_hidden_size: int,
        *,
        normalization: str = "LayerNorm",
        activation: str = "gelu",
        position_embedding: str = "learned",
        rotary_base: float = DEFAULT_BASE,
        attention_core: str = "auto",
        fp8_dpa: bool = False,
        bias: bool = True,
        tie_embeddings: bool = False,
        fp8: FP8Options | None = None,
        policy: PrecisionPolicy | None = None,
    ):
        super().__init__()
        cfg = GPTConfig(
            vocab_size=vocab_size, block_size=block_size, num_layers=num_layers, hidden_size=hidden_size,
            num_attention_heads=num_attention_heads, ffn_hidden_size=ffn_hidden_size, normalization=normalization,
            activation=activation, position_embedding=position_embedding, rotary_base=rotary_base,
            attention_core=attention_core, fp8_dpa=fp8_dpa, bias=bias, tie_embeddings=tie_embeddings, fp8=fp8,
            policy=policy,
        )  # fmt: skip
        self.config = cfg
        rotary = position_embedding == "rotary"
        self.tok_emb = nn.Embedding(vocab_size, hidden_size)
        self.pos_emb = None if rotary else nn.Embedding(block_size, hidden_size)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                hidden_size,
                ffn_hidden_size,
                num_attention_heads,
                normalization=normalization,
                activation=activation,
                attn_mask_type="causal",
                attention_core=attention_core,
                fp8_dpa=fp8_dpa,
                rotary_base=cfg.rotary_base if rotary else None,
                bias=bias,
                fp8=cfg.fp8,
            )  # fmt: skip
            for _ in range(num_layers)
        )
        self.final_norm = Norm(hidden_size, normalization)
        self.lm_head = Linear(hidden_size, vocab_size, bias=False, fp8=cfg.fp8)
        self._init_weights()
        if tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        (policy if policy is not None else PrecisionPolicy()).apply(self)

    @classmethod
    def from_config(cls, config: GPTConfig) -> GPT:
        """A freshly initialised model for ``config``."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPT:
        """``GPT.from_config(GPTConfig.from_preset(name, **overrides))``.

        Args:
            name: "tiny" (byte-level, CPU-sized), "gpt2-124m" or "llama-tiny" (the size
                of "tiny" in Llama's block style).
            overrides: any GPTConfig field, or a shorthand for a field of ``fp8``
                (``scaling=``, ``backend=``, ``fallback=``), e.g. ``fallback="emulated"``.
        """
        return cls.from_config(GPTConfig.from_preset(name, **overrides))

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def block_size(self) -> int:
        return self.config.block_size

    def _init_weights(self) -> None:
        """GPT-2's: N(0, 0.02), residual projections scaled by 1/sqrt(2 * num_layers)."""
        residual_std = INIT_STD / math.sqrt(2 * self.config.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, (Linear, nn.Embedding)):
                is_residual = name.endswith(("attn.proj", "mlp.fc2"))
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual else INIT_STD)
            if isinstance(module, Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        _, t = idx.shape
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.config.block_size}")
        x = self.tok_emb(idx)  # (B, T, C) float32
        if self.pos_emb is not None:  # learned positions; rotary ones are applied in every attention
            x = x + self.pos_emb(torch.arange(t, device=idx.device))  # (T,) positions
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.final_norm(x))  # (B, T, V)
