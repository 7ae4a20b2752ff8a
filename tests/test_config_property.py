"""Property: whatever a user types as --set, or hands RunConfig in a recipe, the result is
a valid config or a ConfigError -- never another exception, never a config that breaks
later. "Valid" is checked the way the runner uses a config: it rebuilds, hashes,
and every number it will compute with is finite and in range."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fp8lab.run.config import ConfigError, DataConfig, ModelConfig, RunConfig, TrainConfig, Variant
from fp8lab.run.overrides import apply_overrides
from fp8lab.run.recipe_file import load_recipe
from fp8lab.run.validate import max_margin
from fp8lab.scaling import DelayedScaling

ROOT = Path(__file__).resolve().parents[1]
BASE = load_recipe(ROOT / "recipes" / "layerwise.py")  # three variants, two of them FP8
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}
KEYS = (
    [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    + [f"fp8.{f.name}" for f in dataclasses.fields(DelayedScaling)]
    + [
        f"variants.{v}.{f.name}"
        for v in ("bf16", "fp8_all", "fp8_first_last_bf16", "nope")
        for f in dataclasses.fields(Variant)
    ]
)
WORDS = [
    "none",
    "None",
    "true",
    "false",
    "yes",
    "0",
    "1",
    "-1",
    "2",
    "3",
    "16",
    "1e999",
    "-inf",
    "inf",
    "nan",
    "0.5",
    "1e-30",
    "1e30",
    str(2**64),
    str(2**64 - 1),
    "",
    " ",
    "*",
    "lm_head",
    "blocks.0.*",
    "blocks.*",
    "blocks.9.*",
    "lm_head,blocks.0.*",
    "auto",
    "te",
    "emulated",
    "emulate",
    "bf16",
    "fp8",
    "fp32",
    "scaled_mm",
    "hybrid",
    "e4m3",
    "max",
    "most_recent",
    "stdlib",
    "text:",
    "tokens:/nonexistent",
    "text:../../etc",
    "tiny",
    "gpt2-124m",
    "cpu",
    "cuda",
    "fp32",
    "native",
    "=",
    "..",
    "\x00",
    "1_000",
    "٣",
]
values = st.one_of(
    st.sampled_from(WORDS),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=12),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=20))
assignments = st.one_of(st.tuples(keys, values).map(lambda kv: f"{kv[0]}={kv[1]}"), st.text(max_size=30))


def assert_usable(config: RunConfig) -> None:
    """What the runner relies on, beyond "the constructor did not raise"."""
    assert dataclasses.replace(config) == config  # revalidates: the invariant holds on a rebuild
    assert len(config.hash()) == 12
    t = config.train
    for name in ("lr", "min_lr", "weight_decay"):
        assert math.isfinite(getattr(t, name))
    assert 0 < t.lr <= 1 and 0 <= t.min_lr <= t.lr and t.lr * t.weight_decay < 1 and t.grad_clip > 0
    assert 0 <= t.seed < 2**64
    for variant in config.variants:
        assert isinstance(variant.keep_bf16, tuple) and all(isinstance(p, str) for p in variant.keep_bf16)
        assert variant.precision != "fp8" or variant.scaling.margin <= max_margin()


@SETTINGS
@given(st.lists(assignments, min_size=1, max_size=4))
def test_set_overrides_give_a_valid_config_or_a_config_error(overrides):
    try:
        config = apply_overrides(BASE, overrides)
    except ConfigError as err:
        assert str(err)  # a message, always
        return
    assert_usable(config)


anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(WORDS),
    st.tuples(st.text(max_size=6)),
    st.lists(st.integers(), max_size=2),
)


def _section(cls):
    """A section built from random values for some fields (the others keep their defaults)."""
    fields = [f.name for f in dataclasses.fields(cls)]
    return st.dictionaries(st.sampled_from(fields), anything, max_size=3).map(lambda kw: (cls, kw))


@SETTINGS
@given(
    _section(TrainConfig),
    _section(ModelConfig),
    _section(DataConfig),
    _section(Variant),
    st.one_of(anything, st.just("r")),
)
def test_recipe_values_give_a_valid_config_or_a_config_error(train, model, data, variant, name):
    try:
        sections = {key: cls(**kw) for key, (cls, kw) in (("train", train), ("model", model), ("data", data))}
        extra = variant[0](**{"name": "x", **variant[1]})
        config = RunConfig(name=name, variants=(Variant(name="bf16", precision="bf16"), extra), **sections)
    except ConfigError as err:
        assert str(err)
        return
    assert_usable(config)
