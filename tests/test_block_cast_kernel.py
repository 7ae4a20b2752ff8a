"""The block casts' C kernel (``fp8lab.quantize.block_cast_native``) against the torch code it
replaces on the CPU (``blocks._blocks_amax_torch``, ``blocks._cast_blocks_torch``), bit for bit:
every block shape the recipes use (1x16, 1x32, 1x128, 128x1, 128x128, 16x16) and shapes that
do not fill their last blocks, float32 and bfloat16 inputs and outputs, transposed inputs, both
FP8 formats, power-of-2 and float32 scales, and values that test the rounding: ties, subnormals,
overflow, zeros of both signs, inf and NaN. (The torch code is itself tested against float64
references in test_scaling_recipes.py and test_hardware_model.py.)"""

from __future__ import annotations

import pytest
import torch

from fp8lab.formats import E4M3, E5M2
from fp8lab.quantize import block_cast_native, blocks

KERNEL = block_cast_native.kernel()
pytestmark = pytest.mark.skipif(KERNEL is None, reason="no C compiler: the block casts run as torch operations")

BLOCKS = [(1, 16), (1, 32), (1, 128), (128, 1), (128, 128), (16, 16)]


def _values(shape, dtype, seed=0) -> torch.Tensor:
    """Values over many binades with the hard cases sprinkled in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-30, 20, shape, generator=g).float())
    flat = x.view(-1)
    special = torch.tensor(
        [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-42, 3.4e38, 1.5, 2.5, -0.0625, 448.0]
    )
    at = torch.randperm(flat.numel(), generator=g)[: 4 * special.numel()]
    flat[at] = special.repeat(4)
    return x.to(dtype)


def _scales(amax: torch.Tensor, fmt, pow2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    scale = torch.where((amax > 0) & torch.isfinite(amax), fmt.max / amax, torch.ones_like(amax))
    if pow2:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    return scale, scale.reciprocal()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, NaN for NaN (a NaN's sign and payload are not modelled: torch's vectorised
    bfloat16 conversion keeps them, its scalar one and the kernel write 0x7FC0)."""
    view = torch.int16 if a.dtype == torch.bfloat16 else torch.int32
    a, b = a.contiguous(), b.contiguous()
    nan = torch.isnan(a)
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and torch.equal(nan, torch.isnan(b))
        and torch.equal(a.view(view)[~nan], b.view(view)[~nan])
    )


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(256, 384), (200, 150)], ids=["whole", "ragged"])
def test_amax_equals_the_torch_code(block, dtype, shape):
    x = _values(shape, dtype)
    assert torch.equal(block_cast_native.block_amax(KERNEL, x, block), blocks._blocks_amax_torch(x, block))
    assert torch.equal(blocks.blocks_amax(x.t().contiguous().t(), block), blocks._blocks_amax_torch(x, block))


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["specials", "finite", "inf", "zeros", "transposed", "empty"])
def test_amax_with_the_raw_amax_in_one_pass(block, dtype, case, monkeypatch):
    """The block amaxes and the raw amax (NaN propagating: what a training cast counts faults from)
    of one pass: the grid as blocks_amax's, the raw amax as amaxes_of's up to the sign of a zero."""
    from fp8lab.quantize.tensor import amaxes_of

    x = _values((200, 150), dtype, seed=11)
    finite = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    x = {"specials": x, "finite": finite, "inf": finite, "zeros": torch.zeros_like(x), "transposed": x.t()}.get(case, x)
    if case == "inf":
        x[77, 3] = -float("inf")
    x = x[:0] if case == "empty" else x
    got = blocks.blocks_amax_and_raw(x, block)
    _torch_only(monkeypatch)
    want = blocks.blocks_amax_and_raw(x, block)
    assert _same(got[0], blocks._blocks_amax_torch(x, block)) and _same(got[0], want[0])
    raw = amaxes_of(x)[0]
    assert _same(got[1].abs(), raw.abs()) and _same(want[1].abs(), raw.abs())


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("pow2", [True, False], ids=["pow2", "f32-scales"])
def test_cast_equals_the_torch_code(block, dtype, out_dtype, fmt, pow2):
    x = _values((200, 150), dtype, seed=1)
    scale, scale_inv = _scales(blocks._blocks_amax_torch(x, block), fmt, pow2)
    want = blocks._cast_blocks_torch(x, block, scale, scale_inv, fmt, out_dtype)
    assert _same(block_cast_native.block_cast(KERNEL, x, block, scale, scale_inv, fmt, out_dtype), want)
    assert _same(blocks.cast_blocks_dequantized(x, block, scale, scale_inv, fmt, dtype=out_dtype), want)
    # the FP8 values themselves (no inverse scale): the torch code multiplies by ones
    raw = block_cast_native.block_cast(KERNEL, x, block, scale, None, fmt, out_dtype)
    assert _same(raw, blocks._cast_blocks_torch(x, block, scale, torch.ones_like(scale), fmt, out_dtype))


def test_a_transposed_operand_is_cast_in_its_own_layout():
    """The backward's copies are transposes of contiguous tensors: cast on the contiguous one with
    the block shape swapped, the result laid out as the input (as the torch code does)."""
    x = _values((150, 200), torch.bfloat16, seed=2).t()  # (200, 150), column-major
    block = (1, 128)
    scale, scale_inv = _scales(blocks.blocks_amax(x, block), E4M3, True)
    got = blocks.cast_blocks_dequantized(x, block, scale, scale_inv, E4M3)
    want = blocks._cast_blocks_torch(x.contiguous(), block, scale, scale_inv, E4M3, torch.bfloat16)
    assert got.stride() == x.stride() and _same(got, want)


def test_what_the_kernel_does_not_read_runs_as_torch_code():
    x = _values((64, 64), torch.float16, seed=3)
    assert not block_cast_native.readable(x) and not block_cast_native.readable(x.float()[:, ::2])
    scale, scale_inv = _scales(blocks.blocks_amax(x, (1, 32)), E4M3, True)
    want = blocks._cast_blocks_torch(x, (1, 32), scale, scale_inv, E4M3, torch.bfloat16)
    assert _same(blocks.cast_blocks_dequantized(x, (1, 32), scale, scale_inv, E4M3), want)
    with pytest.raises(ValueError, match="block scales must be"):
        block_cast_native.block_cast(KERNEL, x.float(), (1, 32), scale[:, :1], None, E4M3, torch.float32)


@pytest.mark.parametrize("block", [(1, 16), (16, 1), (16, 16)], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stochastic", [False, True], ids=["rne", "sr"])
def test_e2m1_cast_equals_the_torch_code(block, dtype, out_dtype, stochastic):
    """NVFP4's cast (E2M1 values of x * encode, nearest even or stochastic, times the E4M3 block
    decode scale) in one pass, against fp4.cast_blocks_e2m1 then fp4.dequantize_blocks."""
    from fp8lab.quantize import fp4
    from fp8lab.scaling.nvfp4_scales import (
        block_decode_scale,
        block_encode_scale,
        global_decode_scale,
        global_encode_scale,
    )

    g = torch.Generator().manual_seed(4)  # values within the block scales' range: rounding decides them
    x = torch.randn(200, 150, generator=g) * torch.exp2(torch.randint(-3, 3, (200, 1), generator=g).float())
    x[7, :6] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40])
    x = x.to(dtype)
    amax = torch.nan_to_num(x.float().abs(), nan=0.0, posinf=0.0, neginf=0.0).max()
    s_enc = global_encode_scale(amax)
    decode = block_decode_scale(blocks._blocks_amax_torch(x, block), s_enc)
    encode = block_encode_scale(decode, global_decode_scale(s_enc))
    key = fp4.sr_key(3, 7) if stochastic else None
    rbits = None if key is None else fp4.sr_bits(key, x.shape)
    want = fp4.dequantize_blocks(fp4.cast_blocks_e2m1(x, block, encode, rbits), block, decode, out_dtype)
    assert _same(block_cast_native.block_cast_e2m1(KERNEL, x, block, encode, decode, key, out_dtype), want)
    if stochastic:  # the random bits decide many elements here, so a wrong bit shows
        nearest = fp4.dequantize_blocks(fp4.cast_blocks_e2m1(x, block, encode, None), block, decode, out_dtype)
        assert (torch.ne(want, nearest) & ~torch.isnan(want)).float().mean() > 0.2
    # a transposed operand, through the dispatcher, laid out as it came
    xt = x.t().contiguous().t()
    got = fp4.cast_dequantized_e2m1(xt, block, encode, decode, key, out_dtype)
    assert got.stride() == xt.stride() and _same(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(256, 300), (200, 77)], ids=["whole", "ragged"])
def test_hadamard_transform_equals_the_torch_code(dtype, shape):
    """NVFP4's random Hadamard transform (16x16, TE's signs) as a fast Walsh-Hadamard transform in
    float64, against fp4.apply_rht_dim0's float64 GEMM: bit for bit where the 16 terms sum exactly
    (here: Gaussian values over 10 binades), rows past R zero. Inf and NaN give the IEEE sums."""
    from fp8lab.quantize import fp4
    from fp8lab.scaling.nvfp4 import RHT_SIGNS

    g = torch.Generator().manual_seed(6)
    x = (torch.randn(shape, generator=g) * torch.exp2(torch.randint(-5, 5, shape, generator=g).float())).to(dtype)
    signs = torch.tensor(RHT_SIGNS)
    want = fp4.apply_rht_dim0(x, fp4.rht_matrix(signs))
    assert _same(block_cast_native.rht_dim0(KERNEL, x, signs), want)
    assert _same(fp4.rht_dim0(x, signs), want)
    x[3, 5], x[40, 7] = float("inf"), float("nan")
    got, want = fp4.rht_dim0(x, signs), fp4.apply_rht_dim0(x, fp4.rht_matrix(signs))
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))


def _nvfp4_values(shape, dtype, seed) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-4, 4, shape, generator=g).float())
    x[1, :3] = torch.tensor([0.0, -0.0, 1e-40])[: shape[1]]
    if shape[0] > 80:
        x[40:56] = 0.0  # 16 rows of zeros: 1x16, 16x1 and 16x16 blocks of zeros (scale 0, encode FLT_MAX)
        x[60, 1], x[80, 2] = float("inf"), float("nan")
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(256, 300), (200, 77), (5, 3)], ids=["whole", "ragged", "one-group"])
@pytest.mark.parametrize("stochastic", [False, True], ids=["rne", "sr"])
def test_transform_in_pass_equals_the_transform_stored(dtype, out_dtype, shape, stochastic):
    """The Hadamard transform made inside the amax pass and the E2M1 cast (never stored) against the
    transform stored, then block_amax and block_cast_e2m1: zeros, subnormals, inf, NaN, blocks past R."""
    from fp8lab.quantize import fp4
    from fp8lab.scaling.nvfp4 import RHT_SIGN_TENSOR as signs
    from fp8lab.scaling.nvfp4_scales import block_scales

    x = _nvfp4_values(shape, dtype, 10)
    key = fp4.sr_key(5, 1) if stochastic else None
    t = block_cast_native.rht_dim0(KERNEL, x, signs)
    amax = block_cast_native.rht_amax(KERNEL, x, signs)
    assert _same(amax, blocks._blocks_amax_torch(t, (16, 1)))
    decode, encode = block_scales(amax, amax.amax())
    got = block_cast_native.rht_cast_e2m1(KERNEL, x, signs, encode, decode, key, out_dtype)
    assert _same(got, block_cast_native.block_cast_e2m1(KERNEL, t, (16, 1), encode, decode, key, out_dtype))


@pytest.mark.parametrize("role", ["input", "weight", "grad_output"])
@pytest.mark.parametrize("usage", ["rowwise", "columnwise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(256, 300), (200, 77), (5, 3), (64, 48)], ids=["whole", "ragged", "tiny", "zeros"])
def test_nvfp4_cast_in_one_call_equals_the_torch_code(role, usage, dtype, shape, monkeypatch):
    """NVFP4's operands (1x16, 16x1 and 16x16 blocks, Hadamard transform, stochastic rounding) cast by
    the one-call kernel path against the torch path: values, tensor amax (with amaxes_of's -0 of a
    zero tensor) and the fault count of NaN and inf; the cast statistics of a log step too."""
    from fp8lab import NVFP4BlockScaling
    from fp8lab.formats import Role
    from fp8lab.gemm.backends.emulated import EmulatedBackend
    from fp8lab.gemm.exact import GemmPath
    from fp8lab.gemm.telemetry_slot import TelemetrySlot

    x = _nvfp4_values(shape, dtype, 12) if shape != (64, 48) else torch.zeros(64, 48, dtype=dtype)
    scaling, role = (
        NVFP4BlockScaling(),
        {"input": Role.INPUT, "weight": Role.WEIGHT, "grad_output": Role.GRAD_OUTPUT}[role],
    )
    backend = EmulatedBackend(GemmPath("bf16", torch.bfloat16, "test"))

    def cast():
        state, slot = scaling.new_state(), TelemetrySlot()
        slot.arm(x.device, whatif=False)
        op = scaling.operand(x, role, usage, state=state, backend=backend, record=True, slot=slot)
        return op.values, op.inv_scale, slot.fault_counts(x.device), slot.cast_stats[role], slot.block_stats[role]

    got = cast()
    _torch_only(monkeypatch)
    want = cast()
    assert all(_same(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("encode", [1.0, 0.7, 3.1e-3, 1e30], ids=["1", "0.7", "small", "huge"])
def test_stochastic_e2m1_of_every_bf16_value_equals_the_torch_code(encode):
    """The kernel's stochastic rounding (its floor taken on the bits) on all 65,536 bf16 patterns (NaN,
    inf, subnormals, both zeros) times an encode scale, against fp4.round_to_e2m1 with fp4.sr_bits."""
    from fp8lab.quantize import fp4

    x = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).reshape(256, 256)
    scale = torch.full((256, 16), encode)
    key = fp4.sr_key(2, 9)
    got = block_cast_native.block_cast_e2m1(KERNEL, x, (1, 16), scale, torch.ones_like(scale), key, torch.float32)
    assert _same(got, fp4.round_to_e2m1(x.float() * torch.tensor(encode), fp4.sr_bits(key, x.shape)))


def test_stochastic_rounding_bits_are_the_documented_hash_and_uniform():
    """fp4.sr_bits against the hash written in Python integers, element by element, and its bytes
    uniform over 2^20 elements (chi-square with 255 degrees of freedom below its 99.99th percentile,
    about 360; a byte stuck at one value would be ~2^28). The kernel draws the same bits (the SR
    cast test above compares its output with the torch code fed sr_bits)."""
    from fp8lab.quantize import fp4

    def lowbias32(i: int, key: int) -> int:
        h = (i * 0x9E3779B1 + key) & 0xFFFFFFFF
        h ^= h >> 16
        h = (h * 0x7FEB352D) & 0xFFFFFFFF
        h ^= h >> 15
        h = (h * 0x846CA68B) & 0xFFFFFFFF
        return (h ^ (h >> 16)) >> 24

    key = fp4.sr_key(0, 0)
    bits = fp4.sr_bits(key, (1024, 1024))
    for i in (0, 1, 2, 1023, 1024, 777_777, 1024 * 1024 - 1):
        assert bits.view(-1)[i].item() == lowbias32(i, key)
    counts = torch.bincount(bits.view(-1).long(), minlength=256).double()
    expected = bits.numel() / 256
    assert ((counts - expected) ** 2 / expected).sum().item() < 360
    assert fp4.sr_key(0, 1) != key and fp4.sr_key(1, 0) != key  # each cast and each seed its own bits


def _torch_only(monkeypatch) -> None:
    """Every dispatcher takes its torch path from here on (as without a C compiler)."""
    monkeypatch.setattr(block_cast_native, "kernel", lambda: None)


def _amax_grid(seed: int) -> torch.Tensor:
    """Block amaxes of a ragged tensor over ~80 binades (float32 subnormals to near FLT_MAX), with
    blocks of zeros, inf and float32's extremes, NaN as a raw amax would carry it."""
    x = _values((203, 157), torch.float32, seed=seed) * torch.exp2(torch.randint(-60, 60, (203, 1)).float())
    grid = blocks._blocks_amax_torch(x, (1, 16))
    grid[:3] = 0.0
    edges = [float("inf"), float("nan"), 1e-45, 2.0**-127, 2.0**-126, 3.4028235e38, 448.0, 1.0, 2688.0, 1e-4]
    grid[3, : len(edges)] = torch.tensor(edges)
    return grid


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("pow2", [True, False], ids=["pow2", "f32-scales"])
@pytest.mark.parametrize("eps", [0.0, 1e-4, 2.0**-140])
def test_te_scales_equal_the_torch_code(fmt, pow2, eps, monkeypatch):
    """Float8BlockScaling's (and current scaling's) scale from amax, for a grid and a 0-dim amax."""
    from fp8lab.scaling.te_scales import te_scale_from_amax

    grid = _amax_grid(7)
    e = torch.tensor(1e-4)  # float32's neighbours of the epsilon: the comparison is made in float32
    grid[4, :3] = torch.stack([e.nextafter(torch.tensor(0.0)), e, e.nextafter(torch.tensor(1.0))])
    bf16_max, f32_max = torch.finfo(torch.bfloat16).max, torch.finfo(torch.float32).max
    cases = [(grid, bf16_max), (grid.t(), f32_max), (grid[5, 7], bf16_max)]

    def scales():
        return [te_scale_from_amax(a, fmt.max, pow2=pow2, epsilon=eps, value_for_inf=v) for a, v in cases]

    got = scales()
    _torch_only(monkeypatch)
    want = scales()
    assert all(_same(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_e8m0_scales_equal_the_torch_code(fmt, monkeypatch):
    """MXFP8's "rceil" scale and inverse scale, NaN amax (code 255) and amaxes whose code is 0 or 254
    included (amax * 1/fp8_max at and around 2^-127, and inf)."""
    from fp8lab.scaling.te_scales import e8m0_scales

    grid = _amax_grid(8)
    edge = torch.tensor([2.0**-127, 2.0**-126, 1.5 * 2.0**-127, 2.0**126, 2.0**127, 1.7e38]) * fmt.max
    grid[5, : edge.numel()] = edge
    got = e8m0_scales(grid, fmt.max)
    _torch_only(monkeypatch)
    want = e8m0_scales(grid, fmt.max)
    assert _same(got[0], want[0]) and _same(got[1], want[1])


@pytest.mark.parametrize("case", ["values", "zeros", "inf", "one-block", "empty"])
def test_nvfp4_scales_equal_the_torch_code(case, monkeypatch):
    """NVFP4's tensor amax (amaxes_of's, -0 of a zero tensor included), E4M3 decode and float32 encode
    scales from the block amax grid of a tensor."""
    from fp8lab.quantize.tensor import amaxes_of
    from fp8lab.scaling.nvfp4 import _tensor_amax
    from fp8lab.scaling.nvfp4_scales import block_scales

    x = _values((203, 157), torch.bfloat16, seed=9) * torch.exp2(torch.randint(-60, 60, (203, 1))).bfloat16()
    x = {"values": x, "zeros": torch.zeros(40, 48), "inf": x, "one-block": x[:1, :16], "empty": x[:0]}[case]
    if case == "values":
        x[torch.isinf(x)] = 1.0  # finite: its scales decide the E4M3 rounding of every block
    grid = blocks.blocks_amax(x, (1, 16))
    amax = _tensor_amax(grid.amax() if grid.numel() else None, lambda: x)
    assert _same(amax, amaxes_of(x)[1])
    got = block_scales(grid, amax)
    _torch_only(monkeypatch)
    want = block_scales(grid, amax)
    assert all(_same(g, w) for g, w in zip(got, want))
