"""The block casts' C kernel (``block_cast_kernel.c``): a block recipe's amaxes and FP8 cast in one
pass each on the CPU, built and cached by ``fp8lab.native``, called through ctypes.

Invariant: the kernel computes exactly the torch code of ``fp8lab.quantize.blocks`` (tests compare
them bit for bit); where it cannot run (no C compiler, a dtype or layout it does not read) that
torch code runs instead. ``kernel()`` is decided once per process, and says so once if it fails.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import struct
import warnings
from pathlib import Path

import torch

from fp8lab import native
from fp8lab.formats import FP8Format

SOURCE = Path(__file__).with_name("block_cast_kernel.c")
# No FP exception is observed, so selects may compute both sides: GCC then vectorises the E2M1
# loops for AVX2 too (without AVX-512's masks it keeps them scalar under -ftrapping-math). Values
# are unchanged: no reassociation, no contraction (-ffp-contract=off), signed zeros and NaN kept.
EXTRA_FLAGS = ("-fno-trapping-math",)


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A loaded build: the library and what it was built with."""

    lib: ctypes.CDLL
    compiler: str
    flags: tuple[str, ...]
    file: Path


def _load(lib: ctypes.CDLL, file: Path, compiler: str, flags: tuple[str, ...]) -> Kernel:
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.fp8lab_block_amax.restype = c_int
    lib.fp8lab_block_amax.argtypes = [ptr, c_int, i64, i64, i64, i64, i64, ptr, i64, c_int, ptr]  # ..., nans
    lib.fp8lab_block_cast.restype = c_int
    lib.fp8lab_block_cast.argtypes = [
        *(ptr, c_int, i64, i64, i64, i64, i64),  # x, bf16, row stride, r, c, br, bc
        *(ptr, ptr, i64),  # scale, scale_inv (or NULL), their row stride
        *(ctypes.c_float, ctypes.c_uint32, ctypes.c_float),  # fp8_max, bits of the min normal, alpha
        *(ptr, c_int, i64, c_int),  # out, out_bf16, its row stride, threads
    ]
    lib.fp8lab_block_cast_e2m1.restype = c_int
    lib.fp8lab_block_cast_e2m1.argtypes = [
        *(ptr, c_int, i64, i64, i64, i64, i64),  # x, bf16, row stride, r, c, br, bc
        *(ptr, ptr, i64),  # encode, decode, their row stride
        *(c_int, ctypes.c_uint32, i64, i64),  # stochastic, its key, the elements' index strides
        *(ptr, c_int, i64, c_int),  # out, out_bf16, its row stride, threads
    ]
    lib.fp8lab_rht_dim0.restype = c_int
    lib.fp8lab_rht_dim0.argtypes = [ptr, c_int, i64, i64, i64, ptr, ptr, c_int]
    lib.fp8lab_rht_amax.restype = c_int
    lib.fp8lab_rht_amax.argtypes = [ptr, c_int, i64, i64, i64, ptr, ptr, c_int]
    lib.fp8lab_rht_cast_e2m1.restype = c_int
    lib.fp8lab_rht_cast_e2m1.argtypes = [
        *(ptr, c_int, i64, i64, i64, ptr),  # x, bf16, row stride, r, c, signs
        *(ptr, ptr, c_int, ctypes.c_uint32),  # encode, decode, stochastic, its key
        *(ptr, c_int, c_int),  # out, out_bf16, threads
    ]
    lib.fp8lab_nvfp4_cast.restype = c_int
    lib.fp8lab_nvfp4_cast.argtypes = [
        *(ptr, c_int, i64, i64, i64, i64, i64),  # x, bf16, row stride, r, c, br, bc
        *(ptr, c_int, ctypes.c_uint32, i64, i64),  # signs (or NULL), stochastic, its key, index strides
        *(ptr, ptr, ptr, ptr, ptr),  # block amaxes, tensor amax, decode, encode, NaN count (or NULL)
        *(ptr, c_int, i64, c_int),  # out, out_bf16, its row stride, threads
    ]
    f32 = ctypes.c_float
    lib.fp8lab_te_scales.restype = c_int
    lib.fp8lab_te_scales.argtypes = [ptr, i64, f32, f32, f32, c_int, ptr]  # amax, n, fp8_max, eps, inf's, pow2, out
    lib.fp8lab_e8m0_scales.restype = c_int
    lib.fp8lab_e8m0_scales.argtypes = [ptr, i64, f32, ptr, ptr]  # amax, n, 1 / fp8_max, scale, scale_inv
    lib.fp8lab_nvfp4_scales.restype = c_int
    lib.fp8lab_nvfp4_scales.argtypes = [ptr, i64, f32, ptr, ptr]  # block amax, n, tensor amax, decode, encode
    return Kernel(lib, compiler, flags, file)


@functools.cache
def kernel() -> Kernel | None:
    """The kernel of this process, built once; None (with one warning) where it cannot be built."""
    built, why = native.build(SOURCE, "block_cast", _load, extra=EXTRA_FLAGS)
    if built is None:
        warnings.warn(
            f"fp8lab: the block-cast C kernel is unavailable ({why}); block casts run as torch operations "
            "(the same values, slower)",
            RuntimeWarning,
            stacklevel=2,
        )
    return built


def scale_kernel(amax: torch.Tensor) -> Kernel | None:
    """The kernel where it computes the scales of the amax grid ``amax`` (a CPU tensor), else None."""
    return kernel() if amax.device.type == "cpu" else None


def readable(x: torch.Tensor) -> bool:
    """Whether the kernel reads ``x``: a 2-D float32 or bfloat16 CPU tensor with unit column stride."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x.dim() == 2 and x.stride(1) == 1


def _check_grid(x: torch.Tensor, block: tuple[int, int], *scales: torch.Tensor) -> tuple[int, int]:
    grid = _grid_shape(x, block)
    if any(tuple(t.shape) != grid for t in scales):
        raise ValueError(f"block scales must be {grid} for a {tuple(x.shape)} tensor in {block} blocks")
    return grid


def _grid_shape(x: torch.Tensor, block: tuple[int, int]) -> tuple[int, int]:
    return -(-x.shape[0] // block[0]), -(-x.shape[1] // block[1])


def block_amax(k: Kernel, x: torch.Tensor, block: tuple[int, int], nans: ctypes.c_int64 | None = None):
    """``blocks.blocks_amax`` of a ``readable`` x: (ceil(R/br), ceil(C/bc)) float32; the number of
    NaN elements of x into ``nans`` where one is given (in the same pass)."""
    out = torch.empty(_grid_shape(x, block), dtype=torch.float32)
    r, c = x.shape
    k.lib.fp8lab_block_amax(
        x.data_ptr(), int(x.dtype == torch.bfloat16), x.stride(0), r, c, *block, out.data_ptr(), out.stride(0),
        torch.get_num_threads(), None if nans is None else ctypes.byref(nans),
    )  # fmt: skip
    return out


def block_cast(
    k: Kernel,
    x: torch.Tensor,
    block: tuple[int, int],
    scale: torch.Tensor,
    scale_inv: torch.Tensor | None,
    fmt: FP8Format,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``blocks.cast_blocks_dequantized`` of a ``readable`` x (``scale_inv`` None: the FP8 values
    themselves), in ``dtype`` (float32 or bfloat16)."""
    scale = scale.float().contiguous()
    scale_inv = None if scale_inv is None else scale_inv.float().contiguous()
    grid = _check_grid(x, block, scale, *(() if scale_inv is None else (scale_inv,)))
    r, c = x.shape
    out = torch.empty(r, c, dtype=dtype)
    min_normal = struct.unpack("<I", struct.pack("<f", fmt.min_normal))[0]
    k.lib.fp8lab_block_cast(
        x.data_ptr(), int(x.dtype == torch.bfloat16), x.stride(0), r, c, *block,
        scale.data_ptr(), None if scale_inv is None else scale_inv.data_ptr(), grid[1],
        fmt.max, min_normal, 1.5 * 2.0 ** (23 - fmt.mantissa_bits),
        out.data_ptr(), int(dtype == torch.bfloat16), c, torch.get_num_threads(),
    )  # fmt: skip
    return out


def block_cast_e2m1(
    k: Kernel,
    x: torch.Tensor,
    block: tuple[int, int],
    encode: torch.Tensor,
    decode: torch.Tensor,
    sr_key: int | None,
    dtype: torch.dtype,
    index_strides: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``fp4.dequantize_blocks(fp4.cast_blocks_e2m1(x, block, encode, rbits), block, decode, dtype)``
    of a ``readable`` x in one pass: each element's E2M1 value of ``x * encode`` (nearest even, or
    stochastic with the random bits ``fp4.sr_bits(sr_key, ...)`` made inside, element (i, j) taking
    index ``i * index_strides[0] + j * index_strides[1]``, row-major by default) times its block's
    ``decode`` scale."""
    encode, decode = encode.float().contiguous(), decode.float().contiguous()
    grid = _check_grid(x, block, encode, decode)
    r, c = x.shape
    ir, ic = index_strides or (c, 1)
    out = torch.empty(r, c, dtype=dtype)
    k.lib.fp8lab_block_cast_e2m1(
        x.data_ptr(), int(x.dtype == torch.bfloat16), x.stride(0), r, c, *block,
        encode.data_ptr(), decode.data_ptr(), grid[1],
        int(sr_key is not None), 0 if sr_key is None else sr_key, ir, ic,
        out.data_ptr(), int(dtype == torch.bfloat16), c, torch.get_num_threads(),
    )  # fmt: skip
    return out


def rht_dim0(k: Kernel, x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``fp4.apply_rht_dim0`` of a ``readable`` x with the transform ``diag(signs) @ H16 / 4``:
    float32 (R rounded up to 16, C), each output the float64 sum of its 16 terms rounded once."""
    signs = _signs(signs)
    r, c = x.shape
    out = torch.empty(-(-r // 16) * 16, c, dtype=torch.float32)
    k.lib.fp8lab_rht_dim0(
        x.data_ptr(), int(x.dtype == torch.bfloat16), x.stride(0), r, c, signs.data_ptr(), out.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return out


def _signs(signs: torch.Tensor) -> torch.Tensor:
    if signs.numel() != 16:
        raise ValueError(f"the transform is 16x16: 16 signs, got {signs.numel()}")
    return signs.float().contiguous()


def rht_amax(k: Kernel, x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``blocks.blocks_amax(rht_dim0(k, x, signs), (16, 1))`` of a ``readable`` x in one pass, the
    transform made in the pass and not stored: float32 (ceil(R/16), C)."""
    signs = _signs(signs)
    r, c = x.shape
    out = torch.empty(-(-r // 16), c, dtype=torch.float32)
    k.lib.fp8lab_rht_amax(
        x.data_ptr(), int(x.dtype == torch.bfloat16), x.stride(0), r, c, signs.data_ptr(), out.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return out


def rht_cast_e2m1(
    k: Kernel,
    x: torch.Tensor,
    signs: torch.Tensor,
    encode: torch.Tensor,
    decode: torch.Tensor,
    sr_key: int | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``block_cast_e2m1(k, rht_dim0(k, x, signs), (16, 1), encode, decode, sr_key, dtype)`` of a
    ``readable`` x in one pass, the transform made in the pass and not stored: (R rounded up to 16, C)."""
    signs = _signs(signs)
    r, c = x.shape
    encode, decode = encode.float().contiguous(), decode.float().contiguous()
    rp = -(-r // 16) * 16
    if tuple(encode.shape) != (rp // 16, c) or tuple(decode.shape) != (rp // 16, c):
        raise ValueError(f"block scales must be {(rp // 16, c)} for the transform of a {tuple(x.shape)} tensor")
    out = torch.empty(rp, c, dtype=dtype)
    k.lib.fp8lab_rht_cast_e2m1(
        x.data_ptr(), int(x.dtype == torch.bfloat16), x.stride(0), r, c, signs.data_ptr(),
        encode.data_ptr(), decode.data_ptr(), int(sr_key is not None), 0 if sr_key is None else sr_key,
        out.data_ptr(), int(dtype == torch.bfloat16), torch.get_num_threads(),
    )  # fmt: skip
    return out


def _grid(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().contiguous()


def te_scales(k: Kernel, amax: torch.Tensor, fp8_max: float, epsilon: float, value_for_inf: float, pow2: bool):
    """``te_scales.te_scale_from_amax`` of a CPU amax tensor (any shape), float32."""
    amax = _grid(amax)
    scale = torch.empty_like(amax)
    k.lib.fp8lab_te_scales(amax.data_ptr(), amax.numel(), fp8_max, epsilon, value_for_inf, int(pow2), scale.data_ptr())
    return scale


def e8m0_scales(k: Kernel, amax: torch.Tensor, rcp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(e8m0_scale(code), e8m0_scale_inv(code))``, ``code = float_to_e8m0(amax * rcp)`` (``rcp``
    rounded to float32), of a CPU amax tensor (any shape)."""
    amax = _grid(amax)
    scale, scale_inv = torch.empty_like(amax), torch.empty_like(amax)
    k.lib.fp8lab_e8m0_scales(amax.data_ptr(), amax.numel(), rcp, scale.data_ptr(), scale_inv.data_ptr())
    return scale, scale_inv


def nvfp4_scales(k: Kernel, block_amax: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``nvfp4_scales.block_scales`` of a CPU grid and tensor amax: (decode, encode)."""
    block_amax = _grid(block_amax)
    decode, encode = torch.empty_like(block_amax), torch.empty_like(block_amax)
    k.lib.fp8lab_nvfp4_scales(
        block_amax.data_ptr(), block_amax.numel(), float(amax), decode.data_ptr(), encode.data_ptr()
    )
    return decode, encode


def nvfp4_cast(
    k: Kernel,
    x: torch.Tensor,
    block: tuple[int, int],
    signs: torch.Tensor | None,
    sr_key: int | None,
    dtype: torch.dtype,
    count_nans: bool = False,
):
    """NVFP4's cast of a ``readable`` x in one call: ``blocks_amax`` (of ``rht_dim0(x, signs)`` in
    (16, 1) blocks where ``signs`` is given, the transform made in the passes), the tensor amax (the
    largest block amax), ``nvfp4_scales.block_scales`` and ``block_cast_e2m1`` (``rht_cast_e2m1``).
    Returns (values in ``dtype``, tensor amax 0-dim, decode scales, the number of NaN elements of x or
    None unless ``count_nans``, which the transformed cast does not count)."""
    if signs is not None:
        signs, block = _signs(signs), (16, 1)
    r, c = x.shape
    grid_shape = _grid_shape(x, block)
    grid, decode, encode = (torch.empty(grid_shape, dtype=torch.float32) for _ in range(3))
    amax = torch.empty((), dtype=torch.float32)
    out = torch.empty(grid_shape[0] * 16 if signs is not None else r, c, dtype=dtype)
    nans = ctypes.c_int64(0) if count_nans and signs is None else None
    k.lib.fp8lab_nvfp4_cast(
        x.data_ptr(), int(x.dtype == torch.bfloat16), x.stride(0), r, c, *block,
        None if signs is None else signs.data_ptr(), int(sr_key is not None), 0 if sr_key is None else sr_key, c, 1,
        grid.data_ptr(), amax.data_ptr(), decode.data_ptr(), encode.data_ptr(),
        None if nans is None else ctypes.byref(nans),
        out.data_ptr(), int(dtype == torch.bfloat16), c, torch.get_num_threads(),
    )  # fmt: skip
    return out, amax, decode, None if nans is None else nans.value
