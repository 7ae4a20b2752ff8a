"""The run configuration a recipe returns: frozen, keyword-only, validated sections.

Invariant: a RunConfig that exists is valid; every field is checked in ``__post_init__``
(each section's own fields in ``sections``, the rules across sections in ``validate``)
and a bad one raises ``ConfigError`` whose message starts with the field's dotted name
(``train.steps``) and says what is allowed. Recipes only construct these objects:
``from fp8lab.run.config import ModelConfig, RunConfig, TrainConfig, Variant``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from fp8lab.run import validate
from fp8lab.run.checks import ConfigError, check
from fp8lab.run.sections import DataConfig, ModelConfig, TrainConfig, Variant

__all__ = ["ConfigError", "DataConfig", "ModelConfig", "RunConfig", "TrainConfig", "Variant"]


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """A whole recipe: data, model, training and the variants compared on the same batches."""

    name: str
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    variants: tuple[Variant, ...] = (Variant(name="bf16", precision="bf16"), Variant(name="fp8"))
    # What every gap is measured against: a bf16 or fp32 variant. None: the run's (first)
    # fp32 variant when it has one (the reference of the precision ladder), else "bf16".
    baseline: str | None = None

    def __post_init__(self):
        if self.baseline is None and isinstance(self.variants, tuple):
            fp32 = [v.name for v in self.variants if isinstance(v, Variant) and v.precision == "fp32"]
            object.__setattr__(self, "baseline", fp32[0] if fp32 else "bf16")
        validate.check_types(self)
        names = [v.name for v in self.variants]
        check(len(names) == len(set(names)) and names, "variants", "a non-empty tuple with unique names", names)
        check(self.baseline in names, "baseline", f"one of the variant names {names}", self.baseline)
        base = next(v for v in self.variants if v.name == self.baseline)
        check(
            base.precision in ("bf16", "fp32"), "baseline", "a variant with precision 'bf16' or 'fp32'", base.precision
        )
        validate.check_run(self)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for variant, saved in zip(self.variants, out["variants"]):  # the recipe's kind, not only its fields
            saved["scaling"] = {"kind": variant.scaling.name, **saved["scaling"]}
        return out

    def hash(self) -> str:
        """A short stable hash of the resolved config (checkpoints refuse other configs)."""
        return hash_of(self.to_dict())


def hash_of(config_dict: dict) -> str:
    """The hash of a config's ``to_dict`` (``RunConfig.hash``), also of one read from a checkpoint."""
    text = json.dumps(config_dict, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def upgrade(saved: dict) -> dict:
    """A config dict written by an earlier fp8lab, with the fields it did not have yet set to
    what that fp8lab did (so its hash is comparable with today's configs):

    - ``variants.<v>.accumulation``: absent before the accumulator model; those runs accumulated
      every FP8 GEMM in fp32 ("fp32"); other precisions take the default ("te", unused).
    - ``variants.<v>.optimizer_state``: absent before low-precision AdamW state; those runs kept
      it in fp32 ("fp32", torch's fused AdamW).
    - ``variants.<v>.fp8_dpa``: absent before FP8 attention; those runs' attention core was not FP8.
    - ``variants.<v>.weights``: absent before FP8 primary weights; those runs' weights were fp32 ("hp").
    - ``train.parallel`` and ``train.fp8_all_gather``: absent before FSDP runs; those runs used
      DDP ("ddp"), and the FP8 all-gather flag (FSDP only) takes its default (True).
    """
    variants = [
        {
            **v,
            "accumulation": v.get("accumulation", "fp32" if v.get("precision") == "fp8" else "te"),
            "optimizer_state": v.get("optimizer_state", "fp32"),
            "fp8_dpa": v.get("fp8_dpa", False),
            "weights": v.get("weights", "hp"),
        }
        for v in saved.get("variants", [])
    ]
    train = saved.get("train")
    if isinstance(train, dict):
        train = {**train, "parallel": train.get("parallel", "ddp"), "fp8_all_gather": train.get("fp8_all_gather", True)}
        return {**saved, "train": train, "variants": variants}
    return {**saved, "variants": variants}
