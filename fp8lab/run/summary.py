"""The run summary: final metrics of every variant, gaps to the baseline (BF16, or the FP32
reference of a precision ladder), memory, loss scale, layers worth attention.

Invariant: fed only host values (from log and eval steps); ``to_dict`` is what
``summary.json`` holds and ``table`` is what the runner prints at the end.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from fp8lab.formats import ROLE_NAMES
from fp8lab.quantize.tensor import STAT_NAMES
from fp8lab.run.config import RunConfig
from fp8lab.run.loss_scale import flushing_scale
from fp8lab.run.precision import rung_of

# A growing weight clamps a handful of values at every delayed-scaling step; a log step
# counts as "saturated" only above the report's threshold (0.01% of the tensor).
from fp8lab.run.report import M_OVER_EPS_PCT, OVERFLOW_PCT
from fp8lab.run.whatif_report import best_by_layer
from fp8lab.scaling.whatif import WHATIF_RECIPES
from fp8lab.telemetry.collector import LayerStats
from fp8lab.telemetry.keys import FP16_FLUSH, OPTIMIZER_STATE, parse_tag
from fp8lab.telemetry.step import FaultTotals

TOP_LAYERS = 3
# Exact byte counts a log step records (fp8lab/run/footprint.py), as summary.json names them.
MEMORY_TAGS = {
    "perf/mem_params_bytes": "params_bytes",
    "perf/mem_grads_bytes": "grads_bytes",
    "perf/mem_optimizer_bytes": "optimizer_bytes",
    "perf/mem_activations_saved_bytes": "activations_saved_bytes",
    "perf/mem_weight_copies_saved_bytes": "weight_copies_saved_bytes",
    "perf/all_gather_bytes_per_step": "all_gather_bytes_per_step",  # FSDP: what one rank receives
}
SQNR, OVERFLOW, UNDERFLOW = (STAT_NAMES.index(s) for s in ("sqnr_db", "overflow_pct", "underflow_pct"))


def _by_name(table: dict[tuple[str, ...], object]) -> dict[str, object]:
    """{(a, b, ...): v} -> {"a/b/...": v}: the checkpoint's and summary.json's form."""
    return {"/".join(key): value for key, value in table.items()}


def _layer_role(name: str) -> tuple[str, str]:
    layer, role = name.rsplit("/", 1)  # layer names hold no "/"
    return layer, role


class RunSummary:
    def __init__(self, config: RunConfig, names: list[str]):
        self.config = config
        self.names = names
        self.evals: dict[str, list[tuple[int, dict]]] = {n: [] for n in names}
        self.train: dict[str, list[tuple[int, dict]]] = {n: [] for n in names}
        self.log_steps: dict[str, int] = defaultdict(int)
        # per variant, per (layer, role): log steps over the overflow threshold, summed underflow %
        self.overflow_steps: dict[str, dict[tuple[str, str], int]] = {n: defaultdict(int) for n in names}
        self.underflow_sum: dict[str, dict[tuple[str, str], float]] = {n: defaultdict(float) for n in names}
        self.nonfinite: dict[str, FaultTotals] = {n: FaultTotals() for n in names}
        self.first_batch: dict[str, str | None] = {}
        self.sharding: dict[str, dict] = {}  # FSDP variants: how each layer's weight is all-gathered
        # what-if SQNR (dB) and lost % per (layer, recipe), over roles and log steps
        self.whatif_sqnr: dict[str, dict[tuple[str, str], list[float]]] = {n: defaultdict(list) for n in names}
        self.whatif_lost: dict[str, dict[tuple[str, str], list[float]]] = {n: defaultdict(list) for n in names}

    def state_dict(self) -> dict:
        """Plain containers only (checkpoints load with weights_only=True); keys of layers
        and recipes as "layer/role" and "layer|recipe|sqnr" strings (the checkpoint format)."""
        whatif = {
            n: {
                f"{layer}|{recipe}|{what}": values
                for what, table in (("sqnr", self.whatif_sqnr[n]), ("lost", self.whatif_lost[n]))
                for (layer, recipe), values in table.items()
            }
            for n in self.names
        }
        return {
            "evals": self.evals,
            "train": self.train,
            "log_steps": dict(self.log_steps),
            "overflow_steps": {n: _by_name(v) for n, v in self.overflow_steps.items()},
            "underflow_sum": {n: _by_name(v) for n, v in self.underflow_sum.items()},
            "nonfinite": {n: totals.by_layer_role() for n, totals in self.nonfinite.items()},
            "whatif": whatif,
        }

    def load_state_dict(self, state: dict) -> None:
        self.evals = {n: list(v) for n, v in state["evals"].items()}
        self.train = {n: list(v) for n, v in state["train"].items()}
        self.log_steps = defaultdict(int, state["log_steps"])
        self.overflow_steps = {
            n: defaultdict(int, {_layer_role(k): c for k, c in v.items()}) for n, v in state["overflow_steps"].items()
        }
        self.underflow_sum = {
            n: defaultdict(float, {_layer_role(k): c for k, c in v.items()}) for n, v in state["underflow_sum"].items()
        }
        for n, by_layer_role in state["nonfinite"].items():
            self.nonfinite[n].load(by_layer_role)
        for n in self.names:
            for key, values in state.get("whatif", {}).get(n, {}).items():
                layer, recipe, what = key.split("|")
                (self.whatif_sqnr if what == "sqnr" else self.whatif_lost)[n][(layer, recipe)] = list(values)

    def record_train(self, name: str, step: int, metrics: dict, stats: LayerStats | None) -> None:
        self.train[name].append((step, metrics))
        if stats is None or not stats.layers:
            return
        self.log_steps[name] += 1
        self.nonfinite[name].add(stats)
        for i, layer in enumerate(stats.layers):
            for r, role in enumerate(ROLE_NAMES):
                self.overflow_steps[name][(layer, role)] += int(stats.values["overflow_pct"][i, r] > OVERFLOW_PCT)
                self.underflow_sum[name][(layer, role)] += float(stats.values["underflow_pct"][i, r])
                for j, recipe in enumerate(WHATIF_RECIPES):
                    row = stats.whatif[i, r, j]
                    if math.isfinite(float(row[SQNR])):
                        self.whatif_sqnr[name][(layer, recipe)].append(float(row[SQNR]))
                        self.whatif_lost[name][(layer, recipe)].append(float(row[OVERFLOW]) + float(row[UNDERFLOW]))

    def fault_scalars(self, name: str) -> dict[str, float]:
        """Cumulative non-finite amax counts of the layers/roles that had any."""
        return self.nonfinite[name].scalars()

    def record_eval(self, name: str, step: int, metrics: dict) -> None:
        self.evals[name].append((step, dict(metrics)))

    def last_train(self, name: str) -> dict:
        return self.train[name][-1][1] if self.train[name] else {}

    def _attention(self, name: str) -> dict:
        n = max(self.log_steps[name], 1)
        saturated = sorted(_by_name(self.overflow_steps[name]).items(), key=lambda kv: -kv[1])
        underflow = sorted(_by_name(self.underflow_sum[name]).items(), key=lambda kv: -kv[1])
        return {
            "most_saturated": [
                {"layer_role": k, "log_steps_over_threshold_pct": 100.0 * v / n}
                for k, v in saturated[:TOP_LAYERS]
                if v > 0
            ],
            "most_underflow": [
                {"layer_role": k, "mean_underflow_pct": v / n} for k, v in underflow[:TOP_LAYERS] if v > 0
            ],
        }

    def _precision(self, name: str) -> dict:
        """Memory (exact bytes of the last log step; peak MiB), final loss scale (and whether every
        FP16 gradient flushes at it), the layers whose gradients FP16 would most flush without
        loss scaling, and those whose 16-bit AdamW ``exp_avg_sq`` is most often zero where
        ``exp_avg`` is not (mean % over log steps)."""
        variant = next(v for v in self.config.variants if v.name == name)
        last = self.train[name][-1][1] if self.train[name] else {}
        memory = {key: int(last[tag]) for tag, key in MEMORY_TAGS.items() if tag in last}
        flush, m_over_eps = defaultdict(list), defaultdict(list)
        for _, metrics in self.train[name]:
            for tag, value in metrics.items():
                key = parse_tag(tag)
                if key is not None and key.group == FP16_FLUSH:
                    flush[key.layer].append(value)
                elif key is not None and key.group == OPTIMIZER_STATE and key.stat == "m_over_eps_pct":
                    m_over_eps[key.layer].append(value)
        means = sorted(((layer, float(np.mean(v))) for layer, v in flush.items()), key=lambda kv: -kv[1])
        state = sorted(((layer, float(np.mean(v))) for layer, v in m_over_eps.items()), key=lambda kv: -kv[1])
        scale = last.get("precision/loss_scale")
        tokens = self.config.train.batch_size * self.config.train.block_size
        return {
            "precision": variant.precision,
            "activations": rung_of(variant).activations,
            "master_weights": variant.master_weights,
            "optimizer_state": variant.optimizer_state,
            "weights": variant.weights,
            "memory": {**memory, "peak_mem_mb": last.get("perf/peak_mem_mb")},
            "loss_scale": scale,
            "loss_scale_flushes": scale is not None and scale <= flushing_scale(tokens),
            "most_fp16_flush": [{"layer": k, "mean_flush_pct": v} for k, v in means[:TOP_LAYERS]],
            "most_adam_state_underflow": [
                {"layer": k, "mean_m_over_eps_pct": v} for k, v in state[:TOP_LAYERS] if v > M_OVER_EPS_PCT
            ],
        }

    def to_dict(self, fingerprint: str, device: str) -> dict:
        base_loss = self.evals[self.config.baseline][-1][1]["loss/val"] if self.evals[self.config.baseline] else None
        variants = {}
        for name in self.names:
            final = self.evals[name][-1][1] if self.evals[name] else {}
            tps = [m["perf/tokens_per_s"] for _, m in self.train[name] if m.get("perf/tokens_per_s")]
            log_ms = [m["perf/log_step_ms"] for _, m in self.train[name] if m.get("perf/log_step_ms")]
            loss = final.get("loss/val")
            variant = next(v for v in self.config.variants if v.name == name)
            variants[name] = {
                "precision": variant.precision,
                "scaling": variant.scaling.name if variant.precision == "fp8" else None,
                "final_val_loss": loss,
                "final_val_ppl": final.get("metrics/val_ppl"),
                "final_val_token_acc": final.get("metrics/val_token_acc"),
                "val_loss_rel_gap": None
                if loss is None or base_loss is None or name == self.config.baseline
                else (loss - base_loss) / base_loss,
                "tokens_per_s": float(np.median(tps)) if tps else None,
                "log_step_ms": float(np.median(log_ms)) if log_ms else None,
                "first_train_loss": self.train[name][0][1]["loss/train"] if self.train[name] else None,
                "first_batch_sha": self.first_batch.get(name),
                **({"fsdp": self.sharding[name]} if name in self.sharding else {}),
                "skipped_steps": self.train[name][-1][1].get("faults/skipped_steps", 0.0) if self.train[name] else 0.0,
                "nonfinite_amax": self.nonfinite[name].by_layer_role(),
                **self._attention(name),
                "best_scaling": best_by_layer(self.whatif_sqnr[name], self.whatif_lost[name]),
                **self._precision(name),
            }
        return {
            "recipe": self.config.name,
            "config_hash": self.config.hash(),
            "corpus_fingerprint": fingerprint,
            "device": device,
            "steps": self.config.train.steps,
            "baseline": self.config.baseline,
            "variants": variants,
        }

    def table(self, result: dict) -> str:
        gap_head = f"gap vs {result['baseline']}"
        head = (
            f"{'variant':<16} {'scaling':<8} {'val loss':>9} {gap_head:>12} {'tokens/s':>10} {'state MiB':>10} "
            f"{'saved MiB':>10} {'skipped':>8}  layers to watch"
        )
        lines = [head, "-" * len(head)]
        for name, v in result["variants"].items():
            gap = "baseline" if v["val_loss_rel_gap"] is None else f"{100 * v['val_loss_rel_gap']:+.2f}%"
            mem = v["memory"]
            state = sum(mem.get(k, 0) for k in ("params_bytes", "grads_bytes", "optimizer_bytes"))
            state_mib = f"{state / 2**20:.2f}" if state else "-"
            saved_mib = f"{mem['activations_saved_bytes'] / 2**20:.2f}" if "activations_saved_bytes" in mem else "-"
            watch = ", ".join(
                f"{d['layer_role']} (overflow in {d['log_steps_over_threshold_pct']:.0f}% of logs)"
                for d in v["most_saturated"][:1]
            )
            watch += ("; " if watch and v["most_underflow"] else "") + ", ".join(
                f"{d['layer_role']} (underflow {d['mean_underflow_pct']:.2f}%)" for d in v["most_underflow"][:1]
            )
            watch += ("; " if watch and v.get("most_adam_state_underflow") else "") + ", ".join(
                f"{d['layer']} (AdamW exp_avg_sq 0 where exp_avg is not: {d['mean_m_over_eps_pct']:.1f}%)"
                for d in v.get("most_adam_state_underflow", [])[:1]
            )
            if v.get("loss_scale_flushes"):
                watch = f"loss scale {v['loss_scale']:.3g}: every FP16 gradient flushes to zero" + (
                    f"; {watch}" if watch else ""
                )
            loss = f"{v['final_val_loss']:.4f}" if v["final_val_loss"] is not None else "-"
            tps = f"{v['tokens_per_s']:.0f}" if v["tokens_per_s"] else "-"
            scaling = v.get("scaling") or v.get("precision") or "-"
            lines.append(
                f"{name:<16} {scaling:<8} {loss:>9} {gap:>12} {tps:>10} {state_mib:>10} {saved_mib:>10} "
                f"{v['skipped_steps']:>8.0f}  {watch or '-'}"
            )
        return "\n".join(lines)
