"""The ``train`` scenario of the fake-CUDA child: a GPT trained through ``fp8lab.Monitor``.

A tiny GPT on a fake sm_90 (``backend="auto"``: torch._scaled_mm, no TE), real autograd
and ``torch.autocast("cuda", bf16)``, AdamW (``capturable=True``: its step counters live on
the device, so the optimizer itself reads nothing back), every ``_scaled_mm`` under
``StrictScaledMM``, and ``D2HCounter`` around each whole optimizer step: ``begin_step``,
forward, backward, ``optimizer.step``, ``end_step`` (which calls ``update_scales`` and, on
log steps, reads the telemetry). Then a checkpoint round trip: ``state_dict`` saved with
``torch.serialization.skip_data`` (fake tensors have no bytes), loaded back with
``weights_only=True`` under the fake mode into a fresh model, which runs one more step.
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.nn.functional as F

from tests.fake_cuda.d2h import D2HCounter
from tests.fake_cuda.device import fake_mode, install
from tests.fake_cuda.strict_scaled_mm import StrictScaledMM


def _model(scaling_name: str):
    import fp8lab

    scaling = {
        "delayed": fp8lab.DelayedScaling(amax_history_len=8),
        "current": fp8lab.Float8CurrentScaling(),
        "block": fp8lab.Float8BlockScaling(),
    }[scaling_name]
    # Built on the device (torch's default-device context): ``.to("cuda")`` of a model made of
    # fake CPU tensors would swap parameter subclasses, which fake tensors do not allow.
    with torch.device("cuda"):
        return fp8lab.GPT.from_preset("tiny", scaling=scaling, backend="auto", block_size=16, num_layers=2)


def _step(model, opt, monitor, batch, counter) -> dict:
    idx, targets = batch[:, :-1], batch[:, 1:]
    counter.reset()
    log = monitor.log_step
    with counter:
        monitor.begin_step()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(idx)  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        written = monitor.end_step(loss)
    return {
        "log_step": log,
        "d2h": dict(counter.counts),
        "where": list(counter.where),
        "tags": len(written) if written is not None else None,
    }


def train(args: dict) -> dict:
    import fp8lab

    install(tuple(args.get("capability", (9, 0))))
    steps, log_interval = args.get("steps", 5), args.get("log_interval", 2)
    out: dict = {"steps": []}
    with tempfile.TemporaryDirectory() as tmp, fake_mode():
        torch.manual_seed(0)
        model = _model(args.get("scaling", "delayed"))
        out["plans"] = sorted({f"{r.backend}: {r.reason}" for r in fp8lab.describe(model)})
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=True)
        monitor = fp8lab.Monitor(
            model,
            os.path.join(tmp, "fp8"),
            log_interval=log_interval,
            histogram_interval=args.get("histogram_interval", 4),
        )
        counter = D2HCounter()
        data = torch.randint(0, 256, (steps + 1, 2, 17), device="cuda")  # (steps, B, T + 1)
        with StrictScaledMM(capability=(9, 0)) as strict:
            for step in range(steps):
                out["steps"].append(_step(model, opt, monitor, data[step], counter))
            out["scaled_mm_calls"] = len(strict.calls)

            # checkpoint: the model's state_dict, saved and loaded as plain tensors
            path = os.path.join(tmp, "ckpt.pt")
            state = model.state_dict()
            with torch.serialization.skip_data(materialize_fake_tensors=True):
                torch.save(state, path)
            loaded = torch.load(path, weights_only=True)
            out["checkpoint"] = {
                "keys_equal": list(loaded) == list(state),
                "mismatched": [
                    k
                    for k in state
                    if (loaded[k].shape, loaded[k].dtype, loaded[k].device)
                    != (state[k].shape, state[k].dtype, state[k].device)
                ],
                "fp8_state_keys": sum(k.endswith("fp8_state.amax_history") for k in state),
            }
            fresh = _model(args.get("scaling", "delayed"))
            fresh.load_state_dict(loaded)
            opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3, capturable=True)
            monitor2 = fp8lab.Monitor(fresh, os.path.join(tmp, "fp8-resumed"), log_interval=log_interval)
            out["resumed_step"] = _step(fresh, opt2, monitor2, data[steps], counter)
            monitor.close()
            monitor2.close()
    return out
