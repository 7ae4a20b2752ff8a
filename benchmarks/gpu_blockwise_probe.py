"""GPU: what torch's blockwise scaled GEMM (1x128 / 128x128 float32 scales) accepts, and
whether it computes what fp8lab's Float8BlockScaling emulation computes.

Without Transformer Engine, fp8lab runs Float8BlockScaling on sm_90 (CUDA >= 12.9) through
``torch.nn.functional.scaled_mm`` (``fp8lab.gemm.backends.scaled_mm._block_gemm``); its CPU
kernel refuses blockwise scales, so its layouts were checked only against torch's meta kernel
and ``tests/fake_cuda/strict_scaled_mm.refusal_v2`` (read from ScaledBlas.cpp). This script
answers, on a GPU:

1. which scale layouts torch's v1 ``torch._scaled_mm`` accepts for the three GEMMs of a Linear
   (fprop: 1x128 x 128x128, dgrad: 1x128 x 128x128 transposed, wgrad: 1x128 x 1x128), for
   K/128 a multiple of 4 and not (cuBLASLt documents 16-byte aligned scale strides; torch's
   v1 check wants the stride to equal K/128 exactly), and where ``tests/fake_cuda/
   strict_scaled_mm`` agrees;
2. for the accepted ones, the output against the same FP8 values and scales dequantized and
   multiplied in float64 (the hardware model with promoted accumulation): share of bf16
   outputs bit-equal, max relative error;
3. the same for fp8lab's own calls (the v2 API, padded layouts), at a token count that is and
   one that is not a multiple of 128.

    python -m benchmarks.gpu_blockwise_probe [--m 256] [--n 512] [--k 768 1024]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fake_cuda.strict_scaled_mm import refusal  # noqa: E402

E4M3 = torch.float8_e4m3fn


def _cdiv(a, b):
    return -(-a // b)


def quantize_1x128(x: torch.Tensor):
    """(x_fp8, scale_inv (rows, cols/128)): power-of-2 scales per 1x128 block of each row."""
    rows, cols = x.shape
    blocks = x.float().reshape(rows, _cdiv(cols, 128), 128).abs().amax(-1).clamp_min(1e-12)
    scale = torch.exp2(torch.floor(torch.log2(448.0 / blocks)))
    q = (x.float().reshape(rows, -1, 128) * scale[..., None]).clamp(-448, 448).reshape(rows, cols).to(E4M3)
    return q, 1.0 / scale


def quantize_128x128(w: torch.Tensor):
    """(w_fp8, scale_inv (rows/128, cols/128))."""
    rows, cols = w.shape
    blocks = w.float().reshape(rows // 128, 128, cols // 128, 128).abs().amax((1, 3)).clamp_min(1e-12)
    scale = torch.exp2(torch.floor(torch.log2(448.0 / blocks)))
    q = (w.float().reshape(rows // 128, 128, cols // 128, 128) * scale[:, None, :, None]).clamp(-448, 448)
    return q.reshape(rows, cols).to(E4M3), 1.0 / scale


def dequant(q, scale_inv, block):
    r, c = q.shape
    s = scale_inv.repeat_interleave(block[0], 0)[:r].repeat_interleave(block[1], 1)[:, :c]
    return q.double() * s.double()


def _measure(ref: torch.Tensor, gemm, *args, **kwargs) -> dict:
    """Run ``gemm(*args, **kwargs)`` (a bf16 output): whether CUDA accepts it, and against the
    float64 ``ref`` the share of outputs bit-equal to ref in bf16 and the max error / max|ref|."""
    try:
        out = gemm(*args, **kwargs)
        if out.is_cuda:
            torch.cuda.synchronize()
    except Exception as err:  # noqa: BLE001 - recorded: the point is what CUDA refuses
        return {"cuda": f"refuses: {str(err).splitlines()[0][:120]}"}
    return {
        "cuda": "accepts",
        "bit_equal": f"{(out == ref.to(torch.bfloat16)).float().mean().item():.4f}",
        "max_rel_err": f"{((out.double() - ref).abs().max() / ref.abs().max()).item():.2e}",
    }


def probe(m: int, n: int, k: int) -> list[dict]:
    torch.manual_seed(0)
    x, w, g = (
        torch.randn(m, k, device="cuda"),
        torch.randn(n, k, device="cuda") * 0.05,
        torch.randn(m, n, device="cuda"),
    )
    x_q, x_s = quantize_1x128(x)  # fprop A: rows of x, blocks along K
    w_q, w_s = quantize_128x128(w)  # (N, K) with (N/128, K/128) scales
    g_q, g_s = quantize_1x128(g)  # dgrad A: rows of g, blocks along N
    gt_q, gt_s = quantize_1x128(g.t().contiguous())  # wgrad A: g^T rows, blocks along M
    xt_q, xt_s = quantize_1x128(x.t().contiguous())  # wgrad B: x^T rows (K, M), blocks along M
    cases = {
        # name: (A, scale_a, B, scale_b, reference)
        "fprop 1x128 x 128x128": (
            x_q,
            x_s.t().contiguous().t(),
            w_q.t(),
            w_s.t(),
            dequant(x_q, x_s, (1, 128)) @ dequant(w_q, w_s, (128, 128)).t(),
        ),
        "dgrad 1x128 x 128x128": (
            g_q,
            g_s.t().contiguous().t(),
            w_q.t().contiguous().t(),
            w_s.t().contiguous().t(),
            dequant(g_q, g_s, (1, 128)) @ dequant(w_q, w_s, (128, 128)),
        ),
        "wgrad 1x128 x 1x128": (
            gt_q,
            gt_s.t().contiguous().t(),
            xt_q.t(),
            xt_s.t().contiguous(),
            dequant(gt_q, gt_s, (1, 128)) @ dequant(xt_q, xt_s, (1, 128)).t(),
        ),
    }
    rows = []
    cap = torch.cuda.get_device_capability()
    cublas = tuple(int(p) for p in torch.version.cuda.split(".")[:2])
    for name, (a, sa, b, sb, ref) in cases.items():
        row = {
            "gemm": name,
            "shape": f"{tuple(a.shape)} @ {tuple(b.shape)}",
            "scale_a": f"{tuple(sa.shape)} {sa.stride()}",
            "scale_b": f"{tuple(sb.shape)} {sb.stride()}",
            "model": refusal(a, b, sa.float(), sb.float(), out_dtype=torch.bfloat16, capability=cap, cublas=cublas)
            or "accepts",
        }
        row |= _measure(ref, torch._scaled_mm, a, b, sa.float(), sb.float(), out_dtype=torch.bfloat16)
        rows.append(row)
    return rows


def probe_fp8lab(m: int, n: int, k: int, device: str = "cuda") -> list[dict]:
    """fp8lab's own blockwise calls (``torch.nn.functional.scaled_mm``, the layouts and padding
    of ``fp8lab.gemm.backends.scaled_mm._block_gemm``) for the three GEMMs of a Linear with
    Float8BlockScaling's defaults, against the float64 model; ``m`` may be any token count,
    ``k`` and ``n`` are multiples of 128."""
    from fp8lab.gemm.backends.scaled_mm import _block_gemm

    torch.manual_seed(1)
    x = torch.randn(m, k, device=device)
    w = torch.randn(n, k, device=device) * 0.05
    g = torch.randn(m, n, device=device)
    m_pad = -(-m // 128) * 128  # the wgrad's 1x128 tiles run along the tokens: zero rows past m

    def tokens_last(t):  # (m, c) -> (c, m_pad) contiguous, then cast along the tokens
        return torch.nn.functional.pad(t, (0, 0, 0, m_pad - m)).t().contiguous()

    x_q, x_s = quantize_1x128(x)  # (M, K), (M, K/128)
    w_q, w_s = quantize_128x128(w)  # (N, K), (N/128, K/128)
    g_q, g_s = quantize_1x128(g)  # (M, N), (M, N/128)
    gt_q, gt_s = quantize_1x128(tokens_last(g))  # (N, M_pad), (N, M_pad/128)
    xt_q, xt_s = quantize_1x128(tokens_last(x))  # (K, M_pad), (K, M_pad/128)
    cases = {  # name: (A, B, A's group scales (rows, K/128), B's (K/128, cols), block shapes)
        "fprop 1x128 x 128x128": (
            x_q,
            w_q.t(),
            x_s,
            w_s.repeat_interleave(128, 0)[:n].t(),
            ((1, 128), (128, 128)),
        ),
        "dgrad 1x128 x 128x128": (g_q, w_q, g_s, w_s.repeat_interleave(128, 1)[:, :k], ((1, 128), (128, 128))),
        "wgrad 1x128 x 1x128": (gt_q[:, :m], xt_q[:, :m].t(), gt_s, xt_s.t(), ((1, 128), (128, 1))),
    }
    rows = []
    for name, (a, b, sa, sb, blocks) in cases.items():
        ref = (a.double() * sa.double().repeat_interleave(128, 1)[:, : a.shape[1]]) @ (
            b.double() * sb.double().repeat_interleave(128, 0)[: b.shape[0]]
        )
        row = {"gemm": name, "shape": f"{tuple(a.shape)} @ {tuple(b.shape)}"}
        row |= _measure(ref, _block_gemm, a, b, torch.bfloat16, None, (sa.float(), sb.float()), blocks)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=256)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--k", type=int, nargs="+", default=[768, 1024])  # K/128 = 6 (not a multiple of 4), 8
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to probe")
        return
    print(
        f"# torch._scaled_mm blockwise on {torch.cuda.get_device_name()} "
        f"(sm_{''.join(map(str, torch.cuda.get_device_capability()))}), "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}\n"
    )
    keys = ["gemm", "shape", "scale_a", "scale_b", "model", "cuda", "bit_equal", "max_rel_err"]
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for k in args.k:
        for row in probe(args.m, args.n, k):
            print("| " + " | ".join(str(row.get(key, "")) for key in keys) + " |")
    print("\n# fp8lab's calls (torch.nn.functional.scaled_mm, fp8lab.gemm.backends.scaled_mm._block_gemm)\n")
    keys = ["gemm", "shape", "cuda", "bit_equal", "max_rel_err"]
    print("| m | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for k in args.k:
        for m in (args.m, 21):
            for row in probe_fp8lab(m, args.n, k):
                print(f"| {m} | " + " | ".join(str(row.get(key, "")) for key in keys) + " |")


if __name__ == "__main__":
    main()
