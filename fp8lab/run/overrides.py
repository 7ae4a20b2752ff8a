"""``--set section.key=value`` overrides, type-checked against the config's own fields.

Invariant: every override is applied first and the result is validated once, so any valid
configuration is reachable in any order of ``--set`` (``model.num_attention_heads=3`` with
``model.hidden_size=33``, ``train.lr`` with ``train.min_lr``, ``loss_scale_init`` with
``activations=fp16``); an override either yields a fully validated RunConfig or raises
``ConfigError`` naming the key and what is allowed; it never half-applies, and a field set
explicitly is never dropped without an error.

Keys: ``data.*``, ``model.*``, ``train.*``; ``fp8.<field>`` sets a scaling field (e.g.
DelayedScaling's ``amax_history_len``, ``margin``; ``fp8_format`` of the TE recipes) on
every FP8 variant whose scaling has it; ``variants.<name>.<field>`` sets one variant's
field (``precision``, ``backend``, ``fallback``, ``keep_bf16``, ``first_last_bf16``,
``activations``, ``master_weights``, ``loss_scale_*``, and ``scaling``: "delayed",
"current", "block", "mxfp8" or "rowwise" (torchao's), the recipe's defaults for every field not set by a ``--set``);
``variants.<name>.scaling.<field>`` sets one field of one variant's scaling.

Which scaling a key reaches is decided on the final config (after every ``scaling=``),
so order never matters: a scaling field set by ``--set`` survives a ``scaling=`` of a kind
that has it, and one the final kind lacks is an error naming both keys. Two keys that
set the same field of one variant (``fp8.margin`` and ``variants.fp8.scaling.margin``)
must agree. The same key given twice: the later one wins, so a command line can append
to a list of common settings (the one case where order matters).
"""

from __future__ import annotations

import dataclasses
import types
import typing

from fp8lab.run.config import ConfigError, RunConfig, Variant
from fp8lab.scaling import SCALINGS

SECTIONS = ("data", "model", "train")


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


def _parse_field(cls, field_name: str, text: str, key: str):
    """``text`` parsed as ``cls``'s field ``field_name``; an unknown field names what ``cls`` has."""
    names = [f.name for f in dataclasses.fields(cls)]
    if field_name not in names:
        raise ConfigError(f"unknown key {key!r}; {key.rsplit('.', 1)[0]} has {names}")
    return _parse(text, typing.get_type_hints(cls)[field_name], key)


def _fields(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


class _Draft:
    """The overrides of one command line, collected by key before anything is validated."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.sections: dict[str, dict[str, tuple]] = {s: {} for s in SECTIONS}  # field -> (value, key)
        self.variant_fields: dict[str, dict[str, tuple]] = {v.name: {} for v in config.variants}
        self.kinds: dict[str, tuple[str, str]] = {}  # variant -> (scaling name, "key=value")
        self.scaling_fields: dict[str, dict[str, tuple]] = {v.name: {} for v in config.variants}  # (text, key)
        self.shorthand: dict[str, tuple[str, str]] = {}  # fp8.<field> -> (text, key)

    def add(self, assignment: str) -> None:
        key, sep, text = assignment.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {assignment!r} must look like section.key=value")
        section, _, rest = key.partition(".")
        parts = rest.split(".")
        if section in SECTIONS and rest and len(parts) == 1:
            cls = type(getattr(self.config, section))
            self.sections[section][rest] = (_parse_field(cls, rest, text, key), key)
        elif section == "fp8" and rest and len(parts) == 1:
            self.shorthand[rest] = (text, key)
        elif section == "variants" and len(parts) == 3 and parts[1] == "scaling" and parts[2]:
            self.scaling_fields[self._variant(parts[0], key)][parts[2]] = (text, key)
        elif section == "variants" and len(parts) == 2:
            name, field_name = self._variant(parts[0], key), parts[1]
            if field_name == "name":
                raise ConfigError(f"{key} cannot be set")
            if field_name == "scaling":
                if text not in SCALINGS:
                    raise ConfigError(f"{key} must be one of {tuple(SCALINGS)}, got {text!r}")
                self.kinds[name] = (text, f"{key}={text}")
            else:
                self.variant_fields[name][field_name] = (_parse_field(Variant, field_name, text, key), key)
        else:
            raise ConfigError(
                f"unknown key {key!r}; keys are data.<field>, model.<field>, train.<field>, "
                "fp8.<scaling field>, variants.<name>.<field> or variants.<name>.scaling.<field>"
            )

    def _variant(self, name: str, key: str) -> str:
        names = [v.name for v in self.config.variants]
        if name not in names:
            raise ConfigError(f"unknown variant {name!r} in {key!r}; variants are {names}")
        return name

    def build(self) -> RunConfig:
        """The config with every override applied, validated once (by its constructors)."""
        sections = {
            s: dataclasses.replace(getattr(self.config, s), **{f: v for f, (v, _) in self.sections[s].items()})
            for s in SECTIONS
            if self.sections[s]
        }
        reached: set[str] = set()  # fp8.<field> keys that reached at least one variant
        variants = tuple(self._variant_of(v, reached) for v in self.config.variants)
        for field_name, (_, key) in self.shorthand.items():
            if field_name not in reached:
                self._refuse_shorthand(field_name, key, variants)
        return dataclasses.replace(self.config, variants=variants, **sections)

    def _variant_of(self, variant, reached: set[str]):
        name = variant.name
        fields = {f: v for f, (v, _) in self.variant_fields[name].items()}
        scaling = self._scaling_of(variant, fields.get("precision", variant.precision), reached)
        if scaling is not variant.scaling:
            fields["scaling"] = scaling
        if not fields:
            return variant
        try:
            return dataclasses.replace(variant, **fields)
        except ConfigError:
            raise
        except ValueError as err:
            raise ConfigError(f"variants.{name}: {err}") from None

    def _scaling_of(self, variant, precision: str, reached: set[str]):
        """The variant's scaling after ``scaling=``, ``variants.<v>.scaling.*`` and ``fp8.*``."""
        name, (kind, kind_key) = variant.name, self.kinds.get(variant.name, (None, None))
        cls = SCALINGS[kind] if kind is not None else type(variant.scaling)
        values = {} if kind is not None else _fields(variant.scaling)  # scaling=<kind>: TE's defaults
        has = {f.name for f in dataclasses.fields(cls)}
        chosen = f" ({kind_key} chose it)" if kind_key else ""
        explicit: dict[str, tuple] = {}  # field -> (value, key, text)
        for field_name, (text, key) in self.scaling_fields[name].items():
            if precision != "fp8":
                raise ConfigError(f"unknown key {key!r}: variants.{name} has precision {precision!r}, no FP8 scaling")
            if field_name not in has:
                raise ConfigError(
                    f"unknown key {key!r}: the scaling of variants.{name} is {cls.__name__}{chosen}, "
                    f"whose fields are {sorted(has)}"
                )
            explicit[field_name] = (_parse_field(cls, field_name, text, key), key, text)
        for field_name, (text, key) in self.shorthand.items():
            if precision != "fp8" or field_name not in has:
                continue
            reached.add(field_name)
            value = _parse_field(cls, field_name, text, key)
            if field_name in explicit and explicit[field_name][0] != value:
                _, other_key, other_text = explicit[field_name]
                raise ConfigError(
                    f"{key}={text} and {other_key}={other_text} both set the {field_name} of variants.{name}; "
                    "set it once"
                )
            explicit.setdefault(field_name, (value, key, text))
        if kind is None and not explicit:
            return variant.scaling
        try:
            return cls(**{**values, **{f: v for f, (v, _, _) in explicit.items()}})
        except ValueError as err:  # the scaling names its field first: "margin must be ..."
            field_name = str(err).split(" ", 1)[0]
            key = explicit[field_name][1] if field_name in explicit else kind_key or f"variants.{name}.scaling"
            raise ConfigError(f"{key}: {err}") from None

    def _refuse_shorthand(self, field_name: str, key: str, variants) -> None:
        targets = [v for v in variants if v.precision == "fp8"]
        kinds = sorted({type(v.scaling).__name__ for v in targets}) or ["(no FP8 variant)"]
        fields = sorted({f.name for v in targets for f in dataclasses.fields(v.scaling)})
        chosen = [k for n, (_, k) in self.kinds.items() if any(v.name == n for v in targets)]
        by = f" ({', '.join(chosen)} chose it)" if chosen else ""
        raise ConfigError(f"unknown key {key!r}: the scaling of {', '.join(kinds)}{by} has the fields {fields}")


def apply_overrides(config: RunConfig, assignments: list[str]) -> RunConfig:
    """``config`` with every ``section.key=value`` applied, then validated once."""
    draft = _Draft(config)
    for assignment in assignments:
        draft.add(assignment)
    return draft.build()
