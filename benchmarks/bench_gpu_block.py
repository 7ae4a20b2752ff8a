"""GPU: FP8 (torch._scaled_mm) vs BF16 training steps, torchao's FP8 on the same shapes,
and what update_scales and telemetry cost per step.

Needs a CUDA device with compute capability >= 8.9. Every timing is CUDA events around
whole steps, variants interleaved round by round in one process (as benchmarks/common.py
does on CPU); the table gives medians and each variant's speed-up over fp8lab's BF16
(the paired median of per-round ratios). A step is forward + backward under bf16 autocast
+ ``fp8lab.update_scales`` for fp8lab's FP8 variant; GPT-2 steps also run fused AdamW.

Variants:
- bf16:       fp8lab layers kept in BF16 (the baseline fp8lab compares against);
- torch-bf16: the same module with ``nn.Linear`` under autocast (plain PyTorch);
- fp8lab:     fp8lab layers with backend "scaled_mm" (delayed scaling);
- torchao:    ``torchao.float8.convert_to_float8_training`` of the nn.Linear module,
              default tensorwise dynamic scaling, eager (``--compile-torchao`` adds a
              torch.compile'd torchao variant, as torchao recommends).

    python benchmarks/bench_gpu_block.py [--hidden 768 2048 4096] [--repeats 20] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fp8lab  # noqa: E402
from benchmarks.bench_emulated import to_fp8lab_bf16, to_nn_linear  # noqa: E402


def block_step(model: nn.Module, x: torch.Tensor, fp8: bool):
    def step():
        x.grad = None
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = model(x)
        y.float().pow(2).mean().backward()
        if fp8:
            fp8lab.update_scales(model)

    return step


def gpt_step(model: nn.Module, batch: torch.Tensor, fp8: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(batch[:, :-1])
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if fp8:
            fp8lab.update_scales(model)

    return step


def time_interleaved(steps: dict, repeats: int, warmup: int = 3) -> dict[str, list[float]]:
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    torch.cuda.synchronize()
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            steps[name]()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    return times


def table(title: str, times: dict[str, list[float]], base: str = "bf16") -> str:
    lines = [f"**{title}**", "", "| variant | median ms | min-max ms | speed-up vs bf16 |", "|---|---|---|---|"]
    for name, t in times.items():
        ratio = statistics.median(b / a for a, b in zip(t, times[base]))
        lines.append(f"| {name} | {statistics.median(t):.2f} | {min(t):.2f}-{max(t):.2f} | {ratio:.2f}x |")
    return "\n".join(lines)


def torchao_variant(module_nn: nn.Module, compile_it: bool) -> nn.Module | None:
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        return None
    model = convert_to_float8_training(copy.deepcopy(module_nn), config=Float8LinearConfig())
    return torch.compile(model) if compile_it else model


def bench_blocks(hiddens, tokens: int, repeats: int, compile_torchao: bool) -> list[str]:
    out = []
    for hidden in hiddens:
        heads = hidden // 64 if hidden < 4096 else 32
        seq = 2048
        torch.manual_seed(0)
        fp8 = fp8lab.FP8Options(scaling=fp8lab.DelayedScaling(amax_history_len=16), backend="scaled_mm")
        block = fp8lab.TransformerBlock(hidden, 4 * hidden, heads, fp8=fp8).cuda()
        x = torch.randn(tokens // seq, seq, hidden, device="cuda", requires_grad=True)
        torch_nn = to_nn_linear(block)
        steps = {
            "bf16": block_step(to_fp8lab_bf16(block), x, False),
            "torch-bf16": block_step(torch_nn, x, False),
            "fp8lab": block_step(block, x, True),
        }
        ao = torchao_variant(torch_nn, False)
        if ao is not None:
            steps["torchao"] = block_step(ao, x, False)
            if compile_torchao:
                steps["torchao-compiled"] = block_step(torchao_variant(torch_nn, True), x, False)
        times = time_interleaved(steps, repeats)
        out.append(
            table(
                f"TransformerBlock hidden {hidden}, ffn {4 * hidden}, heads {heads}, {tokens // seq}x{seq} tokens",
                times,
            )
        )
        print(out[-1], flush=True)
        del block, torch_nn, steps, ao
        torch.cuda.empty_cache()
    return out


def bench_gpt2(repeats: int) -> tuple[list[str], nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    batch = torch.randint(0, 50257, (8, 1025), device="cuda")
    fp8 = fp8lab.GPT.from_preset("gpt2-124m", backend="scaled_mm").cuda()
    bf16 = fp8lab.GPT.from_preset("gpt2-124m", backend="bf16").cuda()
    bf16.load_state_dict(fp8.state_dict())
    times = time_interleaved({"bf16": gpt_step(bf16, batch, False), "fp8lab": gpt_step(fp8, batch, True)}, repeats)
    text = [table("GPT-2 124M training step (8 x 1024 tokens, fused AdamW)", times)]
    print(text[-1], flush=True)
    return text, fp8, batch


def bench_overheads(model: nn.Module, batch: torch.Tensor, repeats: int) -> str:
    """update_scales alone, and a telemetry log step against a plain step."""
    from fp8lab.telemetry.collector import ScalingCollector

    step = gpt_step(model, batch, True)
    collector = ScalingCollector(model)

    def update_only():
        fp8lab.update_scales(model)

    def log_step():
        collector.arm()
        step()  # update_scales runs inside; snapshot before it in the runner: read after here
        collector.read(collector.snapshot())

    times = time_interleaved({"step": step, "log step": log_step, "update_scales": update_only}, repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    n = len(collector.layers)
    return (
        f"**Overheads on the GPT-2 124M FP8 step** ({n} FP8 layers): step {med['step']:.2f} ms; "
        f"update_scales alone {med['update_scales']:.3f} ms ({100 * med['update_scales'] / med['step']:.2f}% "
        f"of a step); a telemetry log step {med['log step']:.2f} ms "
        f"(+{100 * (med['log step'] / med['step'] - 1):.1f}%, "
        f"so +{10 * (med['log step'] / med['step'] - 1):.2f}% per step at log_interval 10)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[768, 2048, 4096])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--compile-torchao", action="store_true")
    parser.add_argument("--skip-gpt2", action="store_true")
    parser.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise SystemExit("bench_gpu_block needs a CUDA device with compute capability >= 8.9")
    t0 = time.time()
    head = (
        f"device: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}), "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}"
    )
    print(head, flush=True)
    sections = [head, ""]
    sections += bench_blocks(args.hidden, args.tokens, args.repeats, args.compile_torchao)
    if not args.skip_gpt2:
        text, model, batch = bench_gpt2(args.repeats)
        sections += text
        sections.append(bench_overheads(model, batch, args.repeats))
        print(sections[-1], flush=True)
    sections.append(f"(benchmark wall time {time.time() - t0:.0f} s)")
    if args.out:
        args.out.write_text("\n\n".join(sections) + "\n")


if __name__ == "__main__":
    main()
