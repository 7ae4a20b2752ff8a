"""Bad precision settings exit 2, name the key, and write nothing (fp8lab/run/precision.py)."""

from __future__ import annotations

import pytest

from fp8lab.run.config import ConfigError, RunConfig, Variant
from fp8lab.run.overrides import apply_overrides
from fp8lab.run.recipe_file import load_recipe
from tests.helpers import LADDER, assert_bad_override_exits_2

BAD = [
    ("variants.fp16.precision=fp4", "variants.fp16.precision must be one of ('bf16', 'fp8', 'fp32', 'fp16')"),
    ("variants.bf16.first_last_bf16=1", "variants.bf16.first_last_bf16 does not apply to precision 'bf16'"),
    ("variants.fp32.keep_bf16=blocks.0.*", "variants.fp32.keep_bf16 does not apply to precision 'fp32'"),
    ("variants.fp16.backend=emulated", "variants.fp16.backend does not apply to precision 'fp16'"),
    ("variants.fp32.master_weights=false", "variants.fp32.master_weights does not apply to precision 'fp32'"),
    ("variants.fp16.activations=bf16", "variants.fp16.activations does not apply to precision 'fp16'"),
    ("variants.fp8.activations=fp32", "variants.fp8.activations must be one of ('bf16', 'fp16')"),
    ("variants.bf16.loss_scale_init=1024", "variants.bf16.loss_scale_init does not apply to precision 'bf16'"),
    (
        "variants.fp8.loss_scale_growth_interval=10",
        "variants.fp8.loss_scale_growth_interval does not apply to precision 'fp8'",
    ),
    ("variants.fp32.loss_scale_backoff_factor=0.25", "variants.fp32.loss_scale_backoff_factor does not apply"),
    ("variants.fp16.loss_scale_growth_interval=0", "variants.fp16.loss_scale_growth_interval must be an int in [1,"),
    (
        "variants.fp16.loss_scale_backoff_factor=1.5",
        "variants.fp16.loss_scale_backoff_factor must be a float in (0, 1)",
    ),
    (
        "variants.fp8_fp16.loss_scale_growth_factor=1",
        "variants.fp8_fp16.loss_scale_growth_factor must be a finite float > 1",
    ),
    ("variants.fp16.loss_scale_init=inf", "variants.fp16.loss_scale_init must be a finite float > 0"),
    ("variants.fp16.master_weights=maybe", "variants.fp16.master_weights must be a bool"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[b[0] for b in BAD])
def test_bad_precision_setting_exits_2_naming_the_key(tmp_path, capsys, override, message):
    assert_bad_override_exits_2(tmp_path, capsys, LADDER, override, message)


def test_fields_that_apply_are_accepted():
    config = apply_overrides(
        load_recipe(LADDER),
        [
            "variants.fp16.loss_scale_growth_interval=100",
            "variants.fp16.master_weights=false",
            "variants.fp8.activations=fp16",
            "variants.fp8.loss_scale_init=1024",
            "variants.bf16.master_weights=false",
        ],
    )
    fp8 = next(v for v in config.variants if v.name == "fp8")
    assert fp8.loss_scale.init == 1024.0 and fp8.activations == "fp16"


def test_baseline_must_be_bf16_or_fp32_and_defaults_to_the_fp32_reference():
    ladder = (
        Variant(name="fp32", precision="fp32"),
        Variant(name="fp16", precision="fp16"),
        Variant(name="bf16", precision="bf16"),
    )
    assert RunConfig(name="r", variants=ladder).baseline == "fp32"
    assert RunConfig(name="r", variants=ladder[1:]).baseline == "bf16"
    with pytest.raises(ConfigError, match="baseline must be a variant with precision 'bf16' or 'fp32'"):
        RunConfig(name="r", variants=ladder, baseline="fp16")
