"""Rules of a RunConfig that no single section can check alone.

Invariant: ``RunConfig.__post_init__`` calls ``check_types`` first and ``check_run``
last, so a RunConfig that exists passes every rule here; a failure is a ``ConfigError``
whose message starts with the dotted key (``model.hidden_size``,
``variants.fp8.keep_bf16``) and says what to do. Nothing here allocates a tensor.

Rules:
- the run name is one folder name, so the run stays inside ``--out``;
- the model's shape is one ``GPTConfig`` accepts (hidden size divisible by the heads...);
- every variant names a known backend, and its precision policy is well formed;
- an FP8 variant's margin leaves the amax representable in E4M3 (else all casts are 0),
  and so does its amax_epsilon for any tensor whose amax is at most 1;
- a loss-scaled variant's scale, at the start and after one backoff, keeps some FP16
  gradient from flushing to zero (``loss_scale.flushing_scale``);
- under ``train.parallel='fsdp'`` AdamW's moments stay fp32 (``optimizer_state``);
- an FP8 variant keeps at least one layer in FP8, and every ``keep_bf16`` pattern
  matches a layer (a pattern that matches nothing is almost always a typo).
"""

from __future__ import annotations

import itertools
import math
import re

from fp8lab.formats import E4M3
from fp8lab.layers.gpt import PRESETS, GPTConfig
from fp8lab.layers.policy import PrecisionPolicy
from fp8lab.run.checks import ConfigError
from fp8lab.run.loss_scale import flushing_scale
from fp8lab.run.precision import rung_of
from fp8lab.run.sections import DataConfig, ModelConfig, TrainConfig, Variant

RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")  # one folder under --out
RESERVED_VARIANT_NAMES = ("checkpoints",)  # folders of the run folder itself
# The fp8lab.Linear layers of a GPT (fp8lab/gpt.py): 4 per block, then the LM head.
BLOCK_LAYERS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
HEAD_LAYER = "lm_head"
# Above this many blocks, the policy rules are checked on the first and last
# ENUMERATED_BLOCKS // 2 candidate blocks only (fnmatch patterns name blocks by number).
ENUMERATED_BLOCKS = 4096


def check_types(config) -> None:
    """The sections are the right objects (a recipe could hand anything to RunConfig)."""
    _is(
        isinstance(config.name, str) and RUN_NAME.fullmatch(config.name) is not None,
        "name",
        "a folder name: letters, digits, '_', '-', '.', not starting with '.' or '-' (the run goes to "
        "--out/<name>/<run_id>, and a name with '/' or '..' would write elsewhere)",
        config.name,
    )
    for key, cls in (("data", DataConfig), ("model", ModelConfig), ("train", TrainConfig)):
        _is(isinstance(getattr(config, key), cls), key, f"a {cls.__name__}", getattr(config, key))
    _is(
        isinstance(config.variants, tuple) and all(isinstance(v, Variant) for v in config.variants),
        "variants",
        "a tuple of Variant",
        config.variants,
    )
    _is(isinstance(config.baseline, str), "baseline", "a variant name (str)", config.baseline)


def check_run(config) -> None:
    """Cross-field rules; see the module docstring."""
    _check_data(config.data)
    num_layers = _check_model(config)
    tokens = config.train.batch_size * config.train.block_size
    for variant in config.variants:
        _check_variant(variant, num_layers)
        _check_sharding(variant, config.train)
        if rung_of(variant).loss_scaling:
            _check_loss_scale(variant, tokens)


def _is(ok: bool, key: str, allowed: str, value) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {allowed}, got {value!r}")


def _check_data(data: DataConfig) -> None:
    kind, _, path = data.source.partition(":")
    _is(data.source == "stdlib" or bool(path), "data.source", f"'{kind}:PATH' with a file path", data.source)


def _check_model(config) -> int:
    """The GPT shape of ``model`` + ``train.block_size``; returns its number of blocks."""
    fields = {**PRESETS[config.model.preset], **config.model.overrides()}
    hidden, heads = fields["hidden_size"], fields["num_attention_heads"]
    if hidden % heads:
        raise ConfigError(
            f"model.hidden_size ({hidden}) must be divisible by model.num_attention_heads ({heads}): every "
            f"head gets hidden_size / num_attention_heads channels; "
            f"e.g. set model.hidden_size={hidden - hidden % heads or heads}"
        )
    try:
        GPTConfig.from_preset(config.model.preset, **config.model.overrides(), block_size=config.train.block_size)
    except ValueError as err:
        raise ConfigError(f"model (preset {config.model.preset!r} with the model.* settings): {err}") from None
    return fields["num_layers"]


def _check_sharding(variant: Variant, train: TrainConfig) -> None:
    """FSDP shards AdamW's moments; the FP8/FP16-stored moments of ``LowPrecisionAdamW`` keep
    per-tensor and per-block scales that a shard alone cannot compute as the whole tensor's."""
    if train.parallel == "fsdp" and variant.optimizer_state != "fp32":
        raise ConfigError(
            f"variants.{variant.name}.optimizer_state must be 'fp32' when train.parallel is 'fsdp', got "
            f"{variant.optimizer_state!r}: moments stored in FP8/FP16 take scales over whole tensors (or blocks "
            "that shards would cut); use train.parallel='ddp' for this variant's run"
        )


def _check_variant(variant: Variant, num_layers: int) -> None:
    key = f"variants.{variant.name}"
    _is(
        variant.name not in RESERVED_VARIANT_NAMES,
        "variant.name",
        f"a name other than {', '.join(map(repr, RESERVED_VARIANT_NAMES))} (a folder the run folder holds itself)",
        variant.name,
    )
    try:
        policy = PrecisionPolicy(keep_bf16=variant.keep_bf16, first_last_bf16=variant.first_last_bf16)
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from None
    if variant.precision != "fp8":
        return  # the policy only moves FP8 layers; a BF16/FP32/FP16 variant has none
    limit = max_margin()
    margin = getattr(variant.scaling, "margin", 0)  # only delayed scaling has one
    _is(
        margin <= limit,
        f"fp8.margin (of {key})",
        f"<= {limit}: a larger margin puts even the amax below E4M3's smallest subnormal, so every value casts to zero",
        margin,
    )
    epsilon, epsilon_limit = getattr(variant.scaling, "amax_epsilon", 0.0), max_epsilon()
    _is(
        epsilon <= epsilon_limit,
        f"fp8.amax_epsilon (of {key})",
        f"<= {epsilon_limit:g} (E4M3's max / its smallest subnormal): the epsilon is a floor under every amax, "
        f"so a tensor whose amax is at most 1 (a transformer's weights, its normalised activations) is scaled by "
        f"{E4M3.max:g} / amax_epsilon or less, and a larger epsilon puts even its amax below E4M3's smallest "
        "subnormal: every value casts to zero",
        epsilon,
    )
    blocks = _Blocks(num_layers)
    if not any(policy.reason_for(name, blocks) is None for name in _candidates(num_layers, variant.first_last_bf16)):
        raise ConfigError(
            f"{key} has precision 'fp8' but its policy keeps every layer in BF16 (keep_bf16={variant.keep_bf16!r}, "
            f"first_last_bf16={variant.first_last_bf16} of {num_layers} blocks): it would train a BF16 model under "
            f"an FP8 name; narrow {key}.keep_bf16 or lower {key}.first_last_bf16"
        )
    if num_layers <= ENUMERATED_BLOCKS:
        names = _layer_names(range(num_layers))
        for pattern in variant.keep_bf16:
            if not any(PrecisionPolicy(keep_bf16=(pattern,)).reason_for(n, blocks) for n in names):
                raise ConfigError(
                    f"{key}.keep_bf16 pattern {pattern!r} matches no layer; layers are "
                    f"blocks.<0..{num_layers - 1}>.{{{','.join(BLOCK_LAYERS)}}} and {HEAD_LAYER} (fnmatch patterns, "
                    "e.g. 'blocks.0.*')"
                )


def _check_loss_scale(variant: Variant, tokens: int) -> None:
    """The loss scale at the start and after one backoff does not flush every FP16 gradient to
    zero (``loss_scale.flushing_scale``). (Growth needs no bound: torch's update never grows the
    scale past float32's max.)"""
    key, c, flush = f"variants.{variant.name}", variant.loss_scale, flushing_scale(tokens)
    why = (
        f"train.batch_size x train.block_size = {tokens} tokens x 2**-25: the loss is a mean over {tokens} tokens, "
        f"so no logit gradient exceeds loss_scale / {tokens}, and FP16 rounds every |g| <= 2**-25 to zero; at or "
        "below it every gradient is zero and nothing trains"
    )
    _is(c.init > flush, f"{key}.loss_scale_init", f"> {flush:.4g} ({why})", c.init)
    _is(
        c.init * c.backoff_factor > flush,
        f"{key}.loss_scale_backoff_factor",
        f"> {flush / c.init:.4g} (one skipped step multiplies loss_scale_init={c.init:g} by it; the scale must stay "
        f"above {flush:.4g}, {why})",
        c.backoff_factor,
    )


def max_epsilon() -> float:
    """The largest amax_epsilon that keeps an amax of 1 representable in E4M3: the epsilon
    floors the amax, so the scale is at most fp8_max / epsilon and the amax maps to
    amax * fp8_max / epsilon, which must stay >= the smallest subnormal (``max_margin``'s
    reasoning, for an amax of 1)."""
    return E4M3.max / (E4M3.min_normal * 2.0**-E4M3.mantissa_bits)


def max_margin() -> int:
    """The largest margin that keeps the amax itself representable in E4M3:
    (fp8_max / 2**margin) >= the smallest subnormal."""
    smallest = E4M3.min_normal * 2.0**-E4M3.mantissa_bits
    return math.floor(math.log2(E4M3.max / smallest))


class _Blocks:
    """What ``PrecisionPolicy.reason_for`` reads of a GPT: ``len(model.blocks)``."""

    def __init__(self, n: int):
        self.n = n

    def get_submodule(self, name: str):
        return range(self.n)


def _layer_names(blocks) -> list[str]:
    return [f"blocks.{i}.{layer}" for i in blocks for layer in BLOCK_LAYERS] + [HEAD_LAYER]


def _candidates(num_layers: int, first_last: int) -> list[str]:
    """Names that could stay FP8: the blocks first_last_bf16 leaves, and the LM head."""
    start, stop = min(first_last, num_layers), max(num_layers - first_last, first_last)
    middle = range(start, stop)
    if stop - start > ENUMERATED_BLOCKS:  # arithmetic, not len(): a range past 2**63 has none
        half = ENUMERATED_BLOCKS // 2
        middle = itertools.chain(range(start, start + half), range(stop - half, stop))
    return _layer_names(middle)
