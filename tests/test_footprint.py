"""Memory accounting against byte counts computed by hand (fp8lab/run/footprint.py)."""

from __future__ import annotations

import pytest
import torch

import fp8lab
from fp8lab import FP8Options
from fp8lab.run.footprint import SavedTensorCounter, tensor_bytes
from fp8lab.run.precision import rung_of
from tests.helpers import CPU_PATH_NAMES, force_gemm_path
from tests.test_precision_ladder import RUNGS, make_run

# The tiny GPT of tiny_config (1 block, hidden 128, ffn 512, vocab 256, block_size 16), by hand:
P = (
    256 * 128  # tok_emb
    + 16 * 128  # pos_emb
    + 2 * 128  # attn.norm (weight, bias)
    + 128 * 384
    + 384  # attn.qkv
    + 128 * 128
    + 128  # attn.proj
    + 2 * 128  # mlp.norm
    + 128 * 512
    + 512  # mlp.fc1
    + 512 * 128
    + 128  # mlp.fc2
    + 2 * 128  # final_norm
    + 128 * 256
)  # lm_head (no bias)
TENSORS = 17  # parameter tensors: 2 embeddings, 3 norms x 2, 4 Linears x 2, lm_head
STEP_BYTES = 4  # fused AdamW keeps one float32 step counter per parameter tensor


@pytest.mark.parametrize("name,width", [("fp32", 4), ("bf16", 4), ("fp8", 4), ("bf16_no_master", 2)])
def test_parameters_gradients_and_adamw_state_bytes(name, width):
    run = make_run(RUNGS[name])
    x = torch.randint(0, 256, (2, 16))
    run.train_step(x, torch.roll(x, 1, 1), 1e-3, log=True)
    memory = run.take_train_metrics(32)
    assert P == 266112
    assert memory["perf/mem_params_bytes"] == width * P
    assert memory["perf/mem_grads_bytes"] == width * P
    assert memory["perf/mem_optimizer_bytes"] == 2 * width * P + STEP_BYTES * TENSORS  # exp_avg, exp_avg_sq, step


W = 128 * 384 + 128 * 128 + 128 * 512 + 512 * 128  # the FP8 Linears' weights (qkv, proj, fc1, fc2)
FP8_WEIGHTS = 4  # weight tensors held as FP8 codes + one fp32 scale_inv each (lm_head stays BF16: hp)
# the FP8-LM moments: E4M3 exp_avg (1 byte) + FP16 exp_avg_sq (2 bytes) a value, and per tensor
# the fp32 step and one fp32 scale per moment
FP8_LM_TENSOR = 4 + 4 + 4
# rung of recipes/precision_ladder.py -> (parameter, gradient, optimizer-state bytes) of the
# tiny GPT, by hand
LADDER_BYTES = {
    "fp32": (4 * P, 4 * P, 2 * 4 * P + STEP_BYTES * TENSORS),
    "fp16": (4 * P, 4 * P, 2 * 4 * P + STEP_BYTES * TENSORS),  # fp32 master weights and grads
    "bf16": (4 * P, 4 * P, 2 * 4 * P + STEP_BYTES * TENSORS),
    "fp8": (4 * P, 4 * P, 2 * 4 * P + STEP_BYTES * TENSORS),
    "bf16_no_master": (2 * P, 2 * P, 2 * 2 * P + STEP_BYTES * TENSORS),
    "fp8_fp16": (4 * P, 4 * P, 2 * 4 * P + STEP_BYTES * TENSORS),
    "fp8_attn": (4 * P, 4 * P, 2 * 4 * P + STEP_BYTES * TENSORS),  # its amax histories are buffers
    "fp8_adam8": (4 * P, 4 * P, (1 + 2) * P + FP8_LM_TENSOR * TENSORS),
    # FP8 weights: 1 byte a weight element + a 4-byte scale_inv each; the gradient stays fp32;
    # the fp32 master copies (4 bytes an element) are optimizer state, as in TE's FusedAdam
    "fp8_w8": (4 * (P - W) + W + 4 * FP8_WEIGHTS, 4 * P, 2 * 4 * P + STEP_BYTES * TENSORS + 4 * W),
    "fp8_all": (4 * (P - W) + W + 4 * FP8_WEIGHTS, 4 * P, (1 + 2) * P + FP8_LM_TENSOR * TENSORS + 4 * W),
}


def test_every_ladder_rung_counts_parameters_gradients_and_state_by_hand():
    import recipes.precision_ladder as ladder

    variants = {v.name: v for v in ladder.config().variants}
    assert set(variants) == set(LADDER_BYTES)  # a new rung needs its hand count here
    assert W == 196608
    x = torch.randint(0, 256, (2, 16))
    for name, (params, grads, state) in LADDER_BYTES.items():
        run = make_run(variants[name])
        run.train_step(x, torch.roll(x, 1, 1), 1e-3, log=True)
        memory = run.take_train_metrics(32)
        got = tuple(memory[f"perf/mem_{k}_bytes"] for k in ("params", "grads", "optimizer"))
        assert got == (params, grads, state), name


M, K, N = 16, 64, 32  # tokens (2 x 8), in_features, out_features
# rung -> (activation bytes, weight-copy bytes) one Linear saves for its backward, by hand
SAVED = {
    "fp32": (M * K * 4, 0),  # x itself; the fp32 weight is the parameter (not counted again)
    "fp16": (M * K * 2, N * K * 2),  # fp16 x and weight copy (held in fp32 by the emulation)
    "bf16": (M * K * 2, N * K * 2),  # bf16 x and weight copy
    "fp8": (M * K * 1 + 2 * 4, N * K * 1),  # E4M3 x and weight, 1 byte each, and two fp32 inverse scales
    "bf16_no_master": (M * K * 2, 0),  # the bf16 weight is the parameter
}


@pytest.mark.parametrize("path_name", CPU_PATH_NAMES)
@pytest.mark.parametrize("name", list(SAVED))
def test_saved_for_backward_of_one_linear_at_the_hardware_width(name, path_name, monkeypatch):
    """The same bytes on either exact CPU path: the fp32 path holds a bf16 weight as an
    fp32 copy, which the hardware path does not make."""
    force_gemm_path(monkeypatch, path_name)
    rung = rung_of(RUNGS[name])
    layer = fp8lab.Linear(K, N, fp8=FP8Options(fallback="emulated"))
    model = rung.cast_parameters_(rung.prepare_gemms(torch.nn.Sequential(layer)))
    assert layer.plan().precision == ("fp8" if name == "fp8" else rung.activations)
    counter = SavedTensorCounter(model)
    x = torch.randn(2, 8, K)
    with counter.counting(), rung.autocast(torch.device("cpu")):
        y = model(x)
    assert (counter.activation_bytes, counter.weight_bytes) == SAVED[name]
    y.float().sum().backward()  # the counted tensors are the ones the backward uses
    assert layer.weight.grad is not None


def test_tensor_bytes_counts_each_storage_once():
    base = torch.zeros(10, 4)
    assert tensor_bytes([base, base[:5], base.t(), None]) == 160
    assert tensor_bytes([base, torch.zeros(3, dtype=torch.bfloat16)]) == 166


def test_saved_for_backward_of_fp8_attention_and_of_an_fp8_weight_by_hand():
    """The ladder's new rungs, by hand. FP8 attention (fp8_attn, fp8_all): its two Linears save
    their E4M3 inputs (1 byte an element) and two fp32 inverse scales each, and its weights' E4M3
    copies; the attention core saves q8, k8, v8 and P8 (FP8 values held in fp32 by the emulation:
    4 bytes), the fp32 softmax output P, the reciprocal of the forward state's three scales (one
    3-float storage, two of its rows in use) and the softmax scale. An FP8 primary weight (fp8_w8):
    the codes and their scale are the parameter, so the Linear saves no weight copy or scale."""
    from fp8lab.layers.attention import MultiheadAttention
    from fp8lab.optim.fp8_weights import fp8_primary_weights

    b, t, h, d = 2, 8, 2, 16
    c, tokens = h * d, b * t
    torch.manual_seed(0)
    layer = MultiheadAttention(c, h, fp8_dpa=True, fp8=FP8Options(fallback="emulated"))
    counter = SavedTensorCounter(layer)
    with counter.counting():
        layer(torch.randn(b, t, c))
    linears = 2 * (tokens * c * 1 + 2 * 4)  # qkv and proj: E4M3 input + its and the weight's inverse scale
    # q8, k8, v8 (B, H, T, D) and P8, P (B, H, T, T), all fp32; 1/scales (3 floats); softmax scale
    core = 3 * b * h * t * d * 4 + 2 * b * h * t * t * 4 + 3 * 4 + 4
    assert counter.activation_bytes == linears + core
    assert counter.weight_bytes == 3 * c * c + c * c  # E4M3 copies of both weights

    model = torch.nn.Sequential(fp8lab.Linear(K, N, fp8=FP8Options(fallback="emulated")))
    fp8_primary_weights(model, master=False)
    counter = SavedTensorCounter(model)
    with counter.counting():
        model(torch.randn(2, 8, K))
    # the E4M3 input and its inverse scale; the weight's scale_inv is the parameter's own
    assert (counter.activation_bytes, counter.weight_bytes) == (M * K * 1 + 4, 0)
