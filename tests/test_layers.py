"""Layers against float64 references built from plain torch ops, with the same weights.

Tolerances (emulated FP8, E4M3 forward / E5M2 gradients, under BF16 autocast):
forward SQNR >= 20 dB; input and every parameter gradient SQNR >= 17 dB. Scales are
first set by one forward+backward and update_scales (initial scales of 1.0 would
underflow E4M3), then the same batch is measured.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fp8lab
from fp8lab import FP8Options, LayerNormLinear, LayerNormMLP, MultiheadAttention, TransformerBlock
from tests.helpers import sqnr_db

B, T, C, HEADS, FFN = 4, 32, 64, 4, 128
FWD_DB, GRAD_DB = 20.0, 17.0
EPS = 1e-5


# ---- float64 references (explicit formulas; attention via torch's own MHA function) ----


def ref_norm(x, p, prefix, normalization):
    w = p[prefix + "weight"]
    if normalization == "LayerNorm":
        mu = x.mean(-1, keepdim=True)
        var = (x - mu).pow(2).mean(-1, keepdim=True)
        return (x - mu) * torch.rsqrt(var + EPS) * w + p[prefix + "bias"]
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def ref_linear(x, p, prefix):
    return F.linear(x, p[prefix + "weight"], p.get(prefix + "bias"))


def ref_layernorm_linear(x, p, normalization):
    return ref_linear(ref_norm(x, p, "norm.", normalization), p, "linear.")


def ref_mlp(x, p, normalization, activation, prefix=""):
    h = ref_linear(ref_norm(x, p, prefix + "norm.", normalization), p, prefix + "fc1.")
    if activation == "gelu":  # tanh approximation, written out
        h = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h.pow(3))))
    else:
        a, b = h.chunk(2, dim=-1)
        h = a * torch.sigmoid(a) * b
    return ref_linear(h, p, prefix + "fc2.")


def ref_attention(x, p, causal, normalization, prefix=""):
    """torch's F.multi_head_attention_forward with our qkv weight as its in_proj_weight."""
    h = ref_norm(x, p, prefix + "norm.", normalization) if normalization else x
    mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1) if causal else None
    h_tbc = h.transpose(0, 1)  # (T, B, C), the layout the function takes
    y, _ = F.multi_head_attention_forward(
        h_tbc, h_tbc, h_tbc, C, HEADS,
        p[prefix + "qkv.weight"], p[prefix + "qkv.bias"], None, None, False, 0.0,
        p[prefix + "proj.weight"], p[prefix + "proj.bias"],
        training=False, need_weights=False, attn_mask=mask,
    )  # fmt: skip
    return y.transpose(0, 1)


def ref_block(x, p, normalization, activation):
    x = x + ref_attention(x, p, True, normalization, prefix="attn.")
    return x + ref_mlp(x, p, normalization, activation, prefix="mlp.")


# ---- harness ----


def fp8_step(layer, x, g):
    """Forward under BF16 autocast and backward of sum(y * g); returns y and x.grad."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    (y.float() * g).sum().backward()
    return y, x.grad


def check_against_reference(layer, ref_fn):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, C, generator=gen)
    with torch.no_grad():
        out_features = layer(x).shape[-1]
    g = torch.randn(B, T, out_features, generator=gen)

    fp8_step(layer, x, g)  # records amaxes ...
    fp8lab.update_scales(layer)  # ... which set the scales used below
    states = [m for m in layer.modules() if isinstance(m, fp8lab.ScalingState)]
    assert states and all(not torch.equal(s.scale, torch.ones(3)) for s in states)
    y, x_grad = fp8_step(layer, x, g)

    p64 = {n: p.detach().double().requires_grad_() for n, p in layer.named_parameters()}
    x64 = x.double().requires_grad_()
    y64 = ref_fn(x64, p64)
    (y64 * g.double()).sum().backward()

    results = {"forward": sqnr_db(y64, y), "input grad": sqnr_db(x64.grad, x_grad)}
    results.update({f"{n} grad": sqnr_db(p64[n].grad, p.grad) for n, p in layer.named_parameters()})
    low = {k: round(v, 1) for k, v in results.items() if v < (FWD_DB if k == "forward" else GRAD_DB)}
    assert not low, f"SQNR below bound (dB): {low}; all: { {k: round(v, 1) for k, v in results.items()} }"


@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
def test_layernorm_linear_matches_float64(normalization):
    torch.manual_seed(0)
    layer = LayerNormLinear(C, 96, normalization=normalization, fp8=FP8Options(fallback="emulated"))
    with torch.no_grad():  # a non-trivial affine norm, so its gradients are checked too
        layer.norm.weight.uniform_(0.5, 1.5)
        if layer.norm.bias is not None:
            layer.norm.bias.uniform_(-0.5, 0.5)
    check_against_reference(layer, lambda x, p: ref_layernorm_linear(x, p, normalization))


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
def test_layernorm_mlp_matches_float64(normalization, activation):
    torch.manual_seed(0)
    layer = LayerNormMLP(
        C, FFN, normalization=normalization, activation=activation, fp8=FP8Options(fallback="emulated")
    )
    assert layer.fc1.out_features == (2 * FFN if activation == "swiglu" else FFN)
    check_against_reference(layer, lambda x, p: ref_mlp(x, p, normalization, activation))


@pytest.mark.parametrize("normalization", [None, "RMSNorm"])
@pytest.mark.parametrize("attn_mask_type", ["causal", "no_mask"])
def test_multihead_attention_matches_float64(attn_mask_type, normalization):
    torch.manual_seed(0)
    layer = MultiheadAttention(
        C, HEADS, attn_mask_type=attn_mask_type, normalization=normalization, fp8=FP8Options(fallback="emulated")
    )
    causal = attn_mask_type == "causal"
    check_against_reference(layer, lambda x, p: ref_attention(x, p, causal, normalization))


@pytest.mark.parametrize("normalization,activation", [("LayerNorm", "gelu"), ("RMSNorm", "swiglu")])
def test_transformer_block_matches_float64(normalization, activation):
    torch.manual_seed(0)
    layer = TransformerBlock(
        C, FFN, HEADS, normalization=normalization, activation=activation, fp8=FP8Options(fallback="emulated")
    )
    check_against_reference(layer, lambda x, p: ref_block(x, p, normalization, activation))


@pytest.mark.parametrize("attn_mask_type", ["causal", "no_mask"])
def test_future_token_changes_no_earlier_output_under_causal_mask(attn_mask_type):
    torch.manual_seed(0)
    layer = MultiheadAttention(
        C, HEADS, attn_mask_type=attn_mask_type, normalization="LayerNorm", fp8=FP8Options(fallback="emulated")
    )
    x = torch.randn(B, T, C)
    fp8_step(layer, x, torch.randn(B, T, C))
    fp8lab.update_scales(layer)
    x_changed = x.clone()
    x_changed[:, -1] = torch.randn(B, C)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_changed = layer(x), layer(x_changed)
    if attn_mask_type == "causal":
        assert torch.equal(y[:, :-1], y_changed[:, :-1])  # exact: no leak from the future
    else:
        assert (y[:, :-1] != y_changed[:, :-1]).any(dim=-1).all()  # every position sees it
    assert not torch.equal(y[:, -1], y_changed[:, -1])


def test_bias_false_has_no_bias_parameters():
    block = TransformerBlock(C, FFN, HEADS, bias=False, fp8=FP8Options(fallback="emulated"))
    assert not any(n.endswith("bias") and "norm" not in n for n, _ in block.named_parameters())


@pytest.mark.parametrize(
    "build,field",
    [
        (lambda: LayerNormLinear(C, C, normalization="BatchNorm"), "normalization"),
        (lambda: LayerNormMLP(C, FFN, activation="relu"), "activation"),
        (lambda: MultiheadAttention(C, HEADS, attn_mask_type="padding"), "attn_mask_type"),
        (lambda: MultiheadAttention(C, 5), "num_attention_heads"),
        (lambda: TransformerBlock(C, FFN, HEADS, normalization="layernorm"), "normalization"),
    ],
)
def test_bad_arguments_name_the_field(build, field):
    with pytest.raises(ValueError, match=field):
        build()


def test_attention_core_where_it_computes():
    """ "auto" on CPU: float32 math on the bf16 q, k, v (autocast kept out), rounded once;
    "native": SDPA in bf16. They differ, and fp32 is the closer to a float64 reference."""
    from fp8lab.layers.attention import attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 32, generator=gen).bfloat16() for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = attention(q, k, v, causal=True, core="auto")
        native = attention(q, k, v, causal=True, core="native")
    expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert auto.dtype == native.dtype == torch.bfloat16
    assert torch.equal(auto, expected.bfloat16())
    assert not torch.equal(auto, native)
    assert sqnr_db(ref, auto) > sqnr_db(ref, native)
    with pytest.raises(ValueError, match="attention_core"):
        fp8lab.MultiheadAttention(64, 4, attention_core="bf16")
