"""The fake-CUDA child process: ``python -m tests.fake_cuda.child SCENARIO 'JSON args'``.

Loads the shim before torch (``tests.fake_cuda.device``), fakes the device, runs one
scenario and prints ``FAKE_CUDA_RESULT {json}`` as its last line (``tests.fake_cuda.run_child``
reads it). Scenarios:

- ``contract``: fp8lab.Linear forward + backward + update_scales per configuration under
  ``StrictScaledMM``; per configuration the plan, the ``_scaled_mm`` calls made and any
  refusal (see ``tests/test_fake_cuda_contract.py``).
- ``mutants``: the same for planted bugs in the scaled_mm backend, once with torch's meta
  kernel alone and once with the strict checks, so a test sees which layer catches which.
- ``train``: GPT steps through ``fp8lab.Monitor`` with device-to-host reads counted per step,
  and a checkpoint round trip (``tests/test_fake_cuda_training.py``).
"""

from __future__ import annotations

import json
import os
import sys
import time

from tests.fake_cuda import RESULT_MARK
from tests.fake_cuda.device import load_shim

load_shim()  # before torch

import torch  # noqa: E402

from tests.fake_cuda.device import fake_mode, install  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _scaling(name: str):
    import fp8lab

    return {
        "delayed": lambda: fp8lab.DelayedScaling(amax_history_len=4),
        "current": fp8lab.Float8CurrentScaling,
        "block": fp8lab.Float8BlockScaling,
        "block_x2d": lambda: fp8lab.Float8BlockScaling(x_block_scaling_dim=2, w_block_scaling_dim=1),
        "block_g2d": lambda: fp8lab.Float8BlockScaling(w_block_scaling_dim=1, grad_block_scaling_dim=2),
        "mxfp8": fp8lab.MXFP8BlockScaling,
    }[name]()


def _input(shape: str, m: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """(..., K) activations with M tokens in one of the layouts a model hands a Linear."""
    if shape == "2d":
        return torch.empty(m, k, device="cuda", dtype=dtype)
    if shape == "4d":  # (2, 1, M/2, K) when M is even, else (1, 1, M, K)
        return (
            torch.empty(2, 1, m // 2, k, device="cuda", dtype=dtype)
            if m % 2 == 0
            else torch.empty(1, 1, m, k, device="cuda", dtype=dtype)
        )
    if shape == "permuted":  # (M, K) seen through a transpose: not contiguous
        return torch.empty(k, m, device="cuda", dtype=dtype).t()
    if shape == "sliced":  # (M, K) columns of a wider tensor: rows 16-byte aligned only if the parent's are
        return torch.empty(m, k + 8, device="cuda", dtype=dtype)[:, 8:]
    raise ValueError(shape)


def run_config(cfg: dict, strict) -> dict:
    """One Linear through forward, backward, update_scales, and a second forward+backward."""
    import fp8lab

    k, n = cfg.get("k", 64), cfg.get("n", 48)
    layer = fp8lab.Linear(
        k,
        n,
        bias=cfg["bias"],
        fp8=fp8lab.FP8Options(scaling=_scaling(cfg["scaling"]), backend=cfg.get("backend", "auto")),
        device="cuda",
    )
    plan = layer.plan()
    result = {"plan": plan.backend, "reason": plan.reason}
    x_dtype = DTYPES[cfg.get("x_dtype", "fp32")]
    amp = cfg.get("amp", "off")
    n_calls = len(strict.calls) if strict is not None else 0
    try:
        for _ in range(cfg.get("steps", 2)):
            x = _input(cfg.get("shape", "2d"), cfg["m"], k, x_dtype).requires_grad_()
            if amp == "off":
                y = layer(x)
            else:
                with torch.autocast("cuda", dtype=DTYPES[amp]):
                    y = layer(x)
            want = DTYPES[amp] if amp != "off" else x_dtype
            assert y.dtype == want and y.shape == (*x.shape[:-1], n), (y.dtype, y.shape)
            y.backward(torch.empty_like(y))
            assert x.grad.shape == x.shape and x.grad.dtype == x.dtype, (x.grad.shape, x.grad.dtype)
            assert layer.weight.grad.shape == (n, k) and layer.weight.grad.dtype == torch.float32
            if cfg["bias"]:
                assert layer.bias.grad.shape == (n,)
            layer.weight.grad = None
            fp8lab.update_scales(layer)
    except Exception as err:  # noqa: BLE001 - reported to the parent with its kind
        result["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        result["caught_by"] = _caught_by(err)
    if strict is not None:
        calls = strict.calls[n_calls:]
        result["calls"] = [
            {
                "shapes": c.shapes,
                "strides": c.strides,
                "dtypes": c.dtypes,
                "scaling": c.scaling,
                "out": c.out_dtype,
                "bias": c.bias,
                "fast_accum": c.fast_accum,
            }
            for c in calls
        ]
    return result


def _caught_by(err: BaseException) -> str:
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

    from tests.fake_cuda.strict_scaled_mm import CudaRefusal

    if isinstance(err, CudaRefusal):
        return "strict"
    if isinstance(err, (DataDependentOutputException, DynamicOutputShapeException)):
        return "fake-host-read"
    if isinstance(err, AssertionError):
        return "contract-assert"
    return "meta"


def contract(args: dict) -> dict:
    """``configs`` on a device of ``capability`` (torch built with CUDA ``cuda``, default
    12.9), each under StrictScaledMM."""
    from tests.fake_cuda.strict_scaled_mm import StrictScaledMM

    install(tuple(args["capability"]), cuda=args.get("cuda", "12.9"))
    cublas = tuple(int(p) for p in args.get("cuda", "12.9").split("."))
    out = []
    with fake_mode():
        for cfg in args["configs"]:
            with StrictScaledMM(capability=tuple(args["capability"]), cublas=cublas) as strict:
                out.append(run_config(cfg, strict))
    return {"results": out}


def mutants(args: dict) -> dict:
    """Each planted bug of ``tests.fake_cuda.mutants`` through ``configs`` until one fails,
    with the meta kernel alone, then with the strict checks too."""
    from tests.fake_cuda import mutants as planted
    from tests.fake_cuda.strict_scaled_mm import StrictScaledMM

    install(tuple(args["capability"]))
    out = {}
    with fake_mode():
        for name in args["names"]:
            row = {}
            for checks in ("meta", "strict"):
                first = None
                with planted.planted(name):
                    for cfg in args["configs"]:
                        if checks == "strict":
                            with StrictScaledMM(capability=tuple(args["capability"])) as strict:
                                res = run_config(cfg, strict)
                        else:
                            res = run_config(cfg, None)
                        if "error" in res:
                            first = {"config": cfg, "error": res["error"], "caught_by": res["caught_by"]}
                            break
                row[checks] = first
            out[name] = row
    return {"mutants": out}


def syncs(args: dict) -> dict:
    """Host syncs (``D2HCounter``) of one training step of a Linear per configuration:
    forward, backward and ``update_scales``, no telemetry armed (a step between log steps)."""
    import fp8lab
    from tests.fake_cuda.d2h import D2HCounter

    install(tuple(args["capability"]))
    out = []
    with fake_mode():
        for cfg in args["configs"]:
            layer = fp8lab.Linear(
                64,
                48,
                fp8=fp8lab.FP8Options(
                    scaling=_scaling(cfg["scaling"]), backend=cfg.get("backend", "auto"), fallback="emulated"
                ),
                device="cuda",
            )
            counter = D2HCounter()
            error = None
            try:
                with counter:
                    x = torch.empty(21, 64, device="cuda", requires_grad=True)
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        y = layer(x)
                    y.backward(torch.empty_like(y))
                    fp8lab.update_scales(layer)
            except Exception as err:  # noqa: BLE001
                error = f"{type(err).__name__}: {str(err)[:300]}"
            out.append(
                {"plan": layer.plan().backend, "d2h": dict(counter.counts), "where": counter.where, "error": error}
            )
    return {"results": out}


def verdicts(args: dict) -> dict:
    """The strict model's verdict on each crafted call of ``tests.fake_cuda.strict_calls``
    (at ``capability``), and on a blockwise 1x128 x 128x128 call on several devices."""
    from tests.fake_cuda.strict_calls import calls
    from tests.fake_cuda.strict_scaled_mm import refusal, refusal_v2, scaling_kinds

    install(tuple(args["capability"]))
    cap = tuple(args["capability"])
    with fake_mode():
        crafted = {name: refusal(**call, capability=cap) for name, call in calls("cuda").items()}
        good = calls("cuda")["fprop-like, bf16 out, bf16 bias"]
        arch = {f"sm_{c[0]}{c[1]}": refusal(**good, capability=c) for c in ((8, 0), (8, 6), (8, 9), (9, 0), (10, 0))}
        m, k, n = 32, 512, 256
        a = torch.empty(m, k, device="cuda", dtype=torch.float8_e4m3fn)
        b = torch.empty(n, k, device="cuda", dtype=torch.float8_e4m3fn).t()  # (K, N) column-major
        scale_a = torch.empty(k // 128, m, device="cuda").t()  # (M, K/128), outer-dim-major
        scale_b = torch.empty(n // 128, k // 128, device="cuda").t()  # (K/128, N/128)
        call = dict(mat1=a, mat2=b, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)
        block = {
            "kinds": scaling_kinds(a, b, scale_a, scale_b),
            "sm_90": refusal(**call, capability=(9, 0)),
            "sm_89": refusal(**call, capability=(8, 9)),
            "sm_100": refusal(**call, capability=(10, 0)),
            "cublas_12.8": refusal(**call, capability=(9, 0), cublas=(12, 8)),
            "fast_accum": refusal(**call, use_fast_accum=True, capability=(9, 0)),
            "scale_a_row_major": refusal(**call | {"scale_a": scale_a.contiguous()}, capability=(9, 0)),
        }
        block_v2 = _v2_verdicts(refusal_v2)
    return {"crafted": crafted, "arch": arch, "block": block, "block_v2": block_v2}


def _v2_verdicts(refusal_v2) -> dict:
    """``refusal_v2`` on a blockwise 1x128 x 128x128 call as fp8lab makes it (K/128 = 6, so the
    128x128 scales are padded to L4 = 8) and on variants that each break one rule."""
    m, k, n = 32, 768, 256
    a = torch.empty(m, k, device="cuda", dtype=torch.float8_e4m3fn)
    b = torch.empty(n, k, device="cuda", dtype=torch.float8_e4m3fn).t()
    scale_a = torch.empty(k // 128, m, device="cuda").t()  # (M, K/128), strides (1, M)
    scale_b = torch.empty(n // 128, 8, device="cuda").t()  # (L4, N/128), strides (1, L4)
    good = dict(
        mat1=a,
        mat2=b,
        scale_a=[scale_a],
        recipe_a=[4],
        swizzle_a=[],
        scale_b=[scale_b],
        recipe_b=[5],
        swizzle_b=[],
        out_dtype=torch.bfloat16,
    )
    sm90 = dict(capability=(9, 0))
    return {
        "good": refusal_v2(**good, **sm90),
        "unpadded_L4": refusal_v2(**good | {"scale_b": [torch.empty(n // 128, 6, device="cuda").t()]}, **sm90),
        "scale_a_row_major": refusal_v2(**good | {"scale_a": [scale_a.contiguous()]}, **sm90),
        "fast_accum": refusal_v2(**good | {"use_fast_accum": True}, **sm90),
        "sm_89": refusal_v2(**good, capability=(8, 9)),
        "sm_100": refusal_v2(**good, capability=(10, 0)),
        "cublas_12.8": refusal_v2(**good, capability=(9, 0), cublas=(12, 8)),
        "scales_on_cpu": refusal_v2(**good | {"scale_b": [torch.empty(2, 8).t()]}, **sm90),
        "b_row_major": refusal_v2(**good | {"mat2": b.contiguous()}, **sm90),
        "fp32_bias_bf16_out": refusal_v2(**good | {"bias": torch.empty(n, device="cuda")}, **sm90),
    }


def suite(args: dict) -> dict:
    """Several ``contract``/``mutants`` jobs in one process (one interpreter start):
    ``{"jobs": {name: {"kind": ..., **job args}}}`` -> ``{name: result}``."""
    return {name: _scenario(job["kind"])(job) for name, job in args["jobs"].items()}


SCENARIOS = {"contract": contract, "mutants": mutants, "syncs": syncs, "verdicts": verdicts, "suite": suite}


def _scenario(name: str):
    if name == "train":
        from tests.fake_cuda.train import train

        return train
    return SCENARIOS[name]


def main() -> None:
    scenario, args = sys.argv[1], json.loads(sys.argv[2])
    fn = _scenario(scenario)
    start = time.perf_counter()
    result = fn(args)
    result["seconds"] = round(time.perf_counter() - start, 3)
    print(RESULT_MARK + json.dumps(result), flush=True)
    sys.stderr.flush()
    # Skip interpreter teardown: static destructors can meet autograd's fake-CUDA worker
    # thread still joinable and abort ("terminate called without an active exception").
    os._exit(0)


if __name__ == "__main__":
    main()
