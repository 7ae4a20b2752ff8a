"""``fp8lab info``: the facts collected on this machine and the text printed for them."""

from __future__ import annotations

import json

import torch

from fp8lab.gemm.backends.select import DeviceFacts, TEFacts, probe_te
from fp8lab.gemm.exact import gemm_path
from fp8lab.run.info import auto_choices, collect_info, format_info


def test_collect_info_has_every_key_and_is_json():
    info = collect_info()
    assert set(info) == {
        "fp8lab",
        "torch",
        "cuda",
        "cuda_available",
        "transformer_engine",
        "probe_dims",
        "devices",
        "accumulation",
        "block_casts",
    }
    assert info["block_casts"]["path"] in ("c", "torch") and "block casts" in info["block_casts"]["reason"]
    assert info["accumulation"]["path"] in ("c-avx512", "c-avx2", "c-generic", "torch")
    assert set(info["accumulation"]["te"]) == {"delayed", "current", "block", "mxfp8", "rowwise", "nvfp4"}
    assert info["accumulation"]["te"]["rowwise"] == (  # torchao's use_fast_accum: output GEMM only
        "fprop fast (13-bit, 32 per instruction), "
        "dgrad and wgrad promoted every 4 instructions (13-bit, 32 per instruction)"
    )
    assert (
        info["accumulation"]["te"]["block"]
        == "fprop and dgrad and wgrad promoted every 4 instructions (13-bit, 32 per instruction)"
    )
    assert info["accumulation"]["te"]["mxfp8"] == "fprop and dgrad and wgrad fp32"
    assert info["torch"] == torch.__version__ and info["cuda"] == torch.version.cuda
    assert set(info["transformer_engine"]) == {"version", "importable", "why_not"}
    assert info["transformer_engine"]["version"] == probe_te().version
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert [row["device"] for row in info["devices"]] == ["cpu"] + [f"cuda:{i}" for i in range(n_cuda)]
    for row in info["devices"]:
        assert set(row) == {"device", "name", "capability", "fp8_tensor_cores", "gemm_path", "auto"}
        assert row["gemm_path"]["name"] == gemm_path(row["device"].split(":")[0]).name
        assert [c["fallback"] for c in row["auto"]] == ["bf16", "emulated"]
    json.dumps(info)  # the CLI may print it as JSON


def test_cpu_reason_appears_in_dict_and_text():
    info = collect_info()
    cpu = info["devices"][0]
    assert cpu["auto"] == [
        {"fallback": "bf16", "backend": "bf16", "reason": "no FP8 hardware on CPU"},
        {"fallback": "emulated", "backend": "emulated", "reason": "no FP8 hardware on CPU; FP8 emulated in software"},
    ]
    text = format_info(info)
    assert f"torch {torch.__version__}" in text
    assert "cpu: CPU (no FP8 hardware)" in text
    assert "backend='auto', fallback='bf16', 4096x4096 Linear -> bf16: no FP8 hardware on CPU" in text
    assert "-> emulated: no FP8 hardware on CPU; FP8 emulated in software" in text


def test_format_of_a_hopper_with_te_and_an_ampere():
    """The text for facts as collect_info reports them on a two-GPU machine."""
    te = TEFacts("2.20.2")
    h100 = DeviceFacts("cuda", (9, 0), "NVIDIA H100 80GB HBM3")
    a100 = DeviceFacts("cuda", (8, 0), "NVIDIA A100-SXM4-80GB")
    info = {
        "fp8lab": "0.1.0",
        "torch": "2.13.0+cu128",
        "cuda": "12.8",
        "cuda_available": True,
        "transformer_engine": {"version": "2.20.2", "importable": True, "why_not": ""},
        "probe_dims": [4096, 4096],
        "accumulation": {
            "path": "c-avx2",
            "reason": "FP8 accumulator model: C kernel",
            "te": {"delayed": "fprop fast, dgrad and wgrad promoted"},
        },
        "block_casts": {"path": "c", "reason": "block casts: C kernel built by cc 12"},
        "devices": [
            {
                "device": "cuda:0",
                "name": h100.name,
                "capability": [9, 0],
                "fp8_tensor_cores": True,
                "auto": auto_choices(h100, te),
            },
            {
                "device": "cuda:1",
                "name": a100.name,
                "capability": [8, 0],
                "fp8_tensor_cores": False,
                "auto": auto_choices(a100, te),
            },
        ],
    }
    lines = format_info(info).splitlines()
    assert lines[:2] == ["fp8lab 0.1.0  torch 2.13.0+cu128  CUDA 12.8", "Transformer Engine 2.20.2: installed"]
    assert lines[2] == "cuda:0: NVIDIA H100 80GB HBM3 (sm_90, FP8 tensor cores: yes)"
    assert lines[3].endswith("-> te: Transformer Engine 2.20.2 on NVIDIA H100 80GB HBM3 (sm_90)")
    assert lines[5] == "cuda:1: NVIDIA A100-SXM4-80GB (sm_80, FP8 tensor cores: no)"
    assert lines[6].endswith("-> bf16: NVIDIA A100-SXM4-80GB (sm_80) has no FP8 tensor cores")
    assert lines[7].endswith(
        "-> emulated: NVIDIA A100-SXM4-80GB (sm_80) has no FP8 tensor cores; FP8 emulated in software"
    )
    assert lines[8:] == [
        "FP8 accumulator model: C kernel; accumulation='te' (the default) per scaling:",
        "  delayed: fprop fast, dgrad and wgrad promoted",
        "block casts: C kernel built by cc 12",
    ]


def test_broken_te_install_is_reported_with_its_error():
    info = collect_info(import_te=False)
    info["transformer_engine"] = {
        "version": "2.20.2",
        "importable": False,
        "why_not": "import transformer_engine.pytorch failed: OSError: libcudnn.so.9",
    }
    text = format_info(info)
    assert (
        "Transformer Engine 2.20.2: installed but unusable (import transformer_engine.pytorch failed: OSError: "
        "libcudnn.so.9)" in text
    )
    assert "use backend='scaled_mm'" in text
