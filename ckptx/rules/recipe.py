"""The typed recipe: extract paths, steps, target and verify specs, and the files it came from."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ckptx.errors import ParamsUnresolved, Problem
from ckptx.rules.params import InferredParam, merge_inferred
from ckptx.rules.steps import Pattern, Step

Resolver = Callable[[Mapping[str, Any]], "Recipe"]


@dataclass(frozen=True)
class RuleFile:
    """A rule file that contributed to a recipe, for provenance."""

    path: str
    name: str
    sha256: str


@dataclass(frozen=True)
class Origin:
    """Who named a callable (a target model, a verify source model), and where.

    A name read from a file (`by_user=False`, the default) is checked by the trust rule (ckptx.trust)
    before anything is imported or called; a name the user typed (`--target`, a string given to the
    Python API) is the user's own choice.
    """

    where: str = ""
    by_user: bool = False

    @classmethod
    def user(cls, where: str) -> Origin:
        """A name the user typed (command line, Python code)."""
        return cls(where, True)


@dataclass(frozen=True)
class TargetSpec:
    """What the converted weights must fit: a model factory, a model folder's config, a reference checkpoint or a
    manifest.

    `config` is a model folder or its config document (`config.json`; Meta's `params.json`): the transformers class
    the config names, built from it on the meta device; `kwargs` then override config fields. `saved_layout` asks
    for the tensors `save_pretrained` writes for a transformers model (its on-disk names, tied weights once) rather
    than the class's `state_dict()`: what a model folder holds.
    """

    model: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    manifest: str | None = None
    allow_missing: tuple[Pattern, ...] = ()
    allow_unexpected: tuple[Pattern, ...] = ()
    where: str = ""
    model_origin: Origin = Origin()
    config: str | None = None
    saved_layout: bool = False

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, base_dir: Path | None, where: str, model_where: str = ""
    ) -> TargetSpec:
        """Build from a schema-valid `target:` mapping of a file; relative paths are taken from `base_dir`.

        `model_where` is the place of `model:` in the file (default: `where`); the model is file-named.
        """

        def path_of(key: str) -> str | None:
            value = data.get(key)
            if value is None or base_dir is None or Path(value).is_absolute():
                return value
            return str(base_dir / value)

        return cls(
            model=data.get("model"),
            kwargs=dict(data.get("kwargs") or {}),
            checkpoint=path_of("checkpoint"),
            manifest=path_of("manifest"),
            allow_missing=_patterns(data.get("allow_missing")),
            allow_unexpected=_patterns(data.get("allow_unexpected")),
            where=where,
            model_origin=Origin(model_where or where),
        )

    def merged(self, other: TargetSpec | None) -> TargetSpec:
        """`other` overrides this spec key by key (kwargs merged, allow lists added)."""
        if other is None:
            return self
        source_given = other.model or other.checkpoint or other.manifest or other.config
        same = other.model == self.model and other.config == self.config
        return TargetSpec(
            model=other.model if source_given else self.model,
            kwargs={**(self.kwargs if not source_given or same else {}), **other.kwargs},
            checkpoint=other.checkpoint if source_given else self.checkpoint,
            manifest=other.manifest if source_given else self.manifest,
            allow_missing=self.allow_missing + other.allow_missing,
            allow_unexpected=self.allow_unexpected + other.allow_unexpected,
            where=other.where or self.where,
            model_origin=other.model_origin if source_given else self.model_origin,
            config=other.config if source_given else self.config,
            saved_layout=self.saved_layout or other.saved_layout,
        )

    def describe(self) -> str:
        """A short human name for the target."""
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        if self.model:
            return f"{self.model}({args})"
        if self.config:
            return f"the model of {self.config}" + (f" with {args}" if args else "")
        return self.checkpoint or self.manifest or "(no target)"


@dataclass(frozen=True)
class VerifySpec:
    """Numerical verification: run source and converted target models on one seeded input."""

    source_model: str
    input_shape: tuple[int, ...]
    source_kwargs: Mapping[str, Any] = field(default_factory=dict)
    input_dtype: str = "float32"
    seed: int = 0
    atol: float = 1e-4
    rtol: float = 1e-4
    output: str | None = None
    source_rules: tuple[str, ...] = ()
    where: str = ""
    given: frozenset[str] = field(default=frozenset(), compare=False)  # the keys the file wrote
    source_origin: Origin = Origin()

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, where: str, base_dir: Path | None = None, source_where: str = ""
    ) -> VerifySpec:
        """Build from a schema-valid `verify:` mapping of a file (`source_where`: the place of `source_model:`);
        `source_rules` paths are taken from `base_dir`."""
        rules = data.get("source_rules") or ()
        rules = (rules,) if isinstance(rules, str) else tuple(rules)
        if base_dir is not None:
            rules = tuple(str(base_dir / r) if (base_dir / r).is_file() else r for r in rules)
        return cls(
            source_rules=rules,
            given=frozenset(data),
            source_model=data["source_model"],
            input_shape=tuple(data["input_shape"]),
            source_kwargs=dict(data.get("source_kwargs") or {}),
            input_dtype=data.get("input_dtype", "float32"),
            seed=int(data.get("seed", 0)),
            atol=float(data.get("atol", 1e-4)),
            rtol=float(data.get("rtol", 1e-4)),
            output=data.get("output"),
            where=where,
            source_origin=Origin(source_where or where),
        )


@dataclass(frozen=True)
class Recipe:
    """A resolved recipe: what `extends`, params and several `-r` files add up to."""

    name: str
    description: str = ""
    extract: tuple[str, ...] = ()
    steps: tuple[Step, ...] = ()
    target: TargetSpec | None = None
    verify: VerifySpec | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    files: tuple[RuleFile, ...] = ()
    # Parameters still to be chosen from the source (their strings hold `${name}`), and how to load the
    # recipe again with values for them; see ckptx/rules/variants.py.
    inferred: tuple[InferredParam, ...] = ()
    resolver: Resolver | None = field(default=None, compare=False, repr=False)

    def resolve(self, values: Mapping[str, Any]) -> Recipe:
        """This recipe loaded again with values for its inferred parameters (itself when it has none)."""
        if not self.inferred:
            return self
        if self.resolver is None:
            raise ValueError(f"recipe {self.name} has inferred parameters but was not built by load_rules")
        return self.resolver(values)

    def then(self, other: Recipe) -> Recipe:
        """This recipe followed by `other`: extract candidates and steps concatenated, target merged."""
        target = other.target if self.target is None else self.target.merged(other.target)
        verify = other.verify or self.verify
        if other.verify is not None and self.verify is not None:  # a child's `verify:` overrides only what it writes
            verify = replace(
                self.verify,
                **{k: getattr(other.verify, k) for k in other.verify.given},
                where=other.verify.where,
                given=self.verify.given | other.verify.given,
            )
        return Recipe(
            name=f"{self.name}+{other.name}" if self.name else other.name,
            description=other.description or self.description,
            extract=tuple(dict.fromkeys(self.extract + other.extract)),
            steps=self.steps + other.steps,
            target=target,
            verify=verify,
            params={**self.params, **other.params},
            files=tuple(dict.fromkeys(self.files + other.files)),
            inferred=merge_inferred(self.inferred, other.inferred),
            resolver=compose_resolvers(self, other),
        )


def require_resolved(recipe: Recipe, doing: str) -> None:
    """Raise ParamsUnresolved when `recipe` still has inferred parameters that `doing` cannot choose."""
    if not recipe.inferred:
        return
    raise ParamsUnresolved(
        [
            Problem(
                p.where,
                f"parameter '{p.name}' is chosen from the source (one of "
                f"{', '.join(map(str, p.choices))}) and {doing} cannot choose it; "
                f"pass --set {p.name}=... (params={{'{p.name}': ...}} from Python)",
            )
            for p in recipe.inferred
        ]
    )


def compose_resolvers(first: Recipe, second: Recipe) -> Resolver | None:
    """The resolver of `first.then(second)`: each side resolved with its own parameters, then composed."""
    sides = (first, second)
    if not any(r.inferred for r in sides) or any(r.inferred and r.resolver is None for r in sides):
        return None

    def resolve(values: Mapping[str, Any]) -> Recipe:
        done = []
        for recipe in sides:
            names = {p.name for p in recipe.inferred}
            done.append(recipe.resolve({k: v for k, v in values.items() if k in names}) if names else recipe)
        return done[0].then(done[1])

    return resolve


def _patterns(value: str | list[str] | None) -> tuple[Pattern, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    return tuple(re.compile(v) for v in items)
