"""``--set section.key=value`` overrides, type-checked against the config's own fields.

Invariant: an override either produces a new, fully validated RunConfig or raises
``ConfigError`` naming the key and what is allowed; it never half-applies.

Keys: ``data.*``, ``model.*``, ``train.*``; ``fp8.<field>`` sets a scaling field (e.g.
DelayedScaling's ``amax_history_len``, ``margin``; every recipe's ``fp8_format``) on
every FP8 variant whose scaling has it; ``variants.<name>.<field>`` sets one variant's
field (``precision``, ``backend``, ``fallback``, ``keep_bf16``, ``first_last_bf16``,
``activations``, ``master_weights``, ``loss_scale_*``, and ``scaling``: "delayed",
"current", "block" or "mxfp8", TE's defaults); ``variants.<name>.scaling.<field>`` sets
one field of one variant's scaling.
"""

from __future__ import annotations

import dataclasses
import types
import typing

from fp8lab.run.config import ConfigError, RunConfig
from fp8lab.scaling import SCALINGS


def _parse(text: str, hint, key: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # "int | None"
        if text.lower() == "none" and type(None) in args:
            return None
        return _parse(text, next(a for a in args if a is not type(None)), key)
    if origin is tuple:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    if hint is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"{key} must be a bool (true/false), got {text!r}")
    if hint is int:
        try:
            return int(text, 10)
        except ValueError:
            raise ConfigError(f"{key} must be an int, got {text!r}") from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key} must be a float, got {text!r}") from None
    if hint is str:
        return text
    raise ConfigError(f"{key} cannot be set from the command line")


def _replace(obj, field_name: str, text: str, key: str):
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    if field_name not in names:
        raise ConfigError(f"unknown key {key!r}; {key.rsplit('.', 1)[0]} has {names}")
    try:
        return dataclasses.replace(obj, **{field_name: _parse(text, hints[field_name], key)})
    except ConfigError:
        raise
    except ValueError as err:  # DelayedScaling's own validation
        raise ConfigError(f"{key}: {err}") from None


def _variant(config: RunConfig, name: str, key: str) -> str:
    names = [v.name for v in config.variants]
    if name not in names:
        raise ConfigError(f"unknown variant {name!r} in {key!r}; variants are {names}")
    return name


def _set_scaling_field(config: RunConfig, field_name: str, text: str, key: str, names: set[str] | None) -> RunConfig:
    """Set one scaling field on the FP8 variants named (all when None) whose scaling has it."""
    targets = [v for v in config.variants if v.precision == "fp8" and (names is None or v.name in names)]
    having = [v for v in targets if field_name in {f.name for f in dataclasses.fields(v.scaling)}]
    if not having:
        kinds = sorted({type(v.scaling).__name__ for v in targets}) or ["(no FP8 variant)"]
        fields = sorted({f.name for v in targets for f in dataclasses.fields(v.scaling)})
        raise ConfigError(f"unknown key {key!r}: the scaling of {', '.join(kinds)} has the fields {fields}")
    updated = {v.name: dataclasses.replace(v, scaling=_replace(v.scaling, field_name, text, key)) for v in having}
    return dataclasses.replace(config, variants=tuple(updated.get(v.name, v) for v in config.variants))


def apply_overrides(config: RunConfig, assignments: list[str]) -> RunConfig:
    """``config`` with each ``section.key=value`` applied in order."""
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {assignment!r} must look like section.key=value")
        section, _, rest = key.partition(".")
        if section in ("data", "model", "train") and rest and "." not in rest:
            config = dataclasses.replace(config, **{section: _replace(getattr(config, section), rest, text, key)})
        elif section == "fp8" and rest and "." not in rest:
            config = _set_scaling_field(config, rest, text, key, names=None)
        elif section == "variants" and rest.count(".") == 2 and rest.split(".")[1] == "scaling":
            name, _, field_name = rest.split(".")
            config = _set_scaling_field(config, field_name, text, key, names={_variant(config, name, key)})
        elif section == "variants" and rest.count(".") == 1:
            name, field_name = rest.split(".")
            _variant(config, name, key)
            if field_name == "name":
                raise ConfigError(f"{key} cannot be set")
            if field_name == "scaling":
                if text not in SCALINGS:
                    raise ConfigError(f"{key} must be one of {tuple(SCALINGS)}, got {text!r}")
                variants = tuple(
                    dataclasses.replace(v, scaling=SCALINGS[text]()) if v.name == name else v for v in config.variants
                )
            else:
                variants = tuple(_replace(v, field_name, text, key) if v.name == name else v for v in config.variants)
            config = dataclasses.replace(config, variants=variants)
        else:
            raise ConfigError(
                f"unknown key {key!r}; keys are data.<field>, model.<field>, train.<field>, "
                "fp8.<scaling field>, variants.<name>.<field> or variants.<name>.scaling.<field>"
            )
    return config
