"""The typed recipe: extract paths, steps, target and verify specs, and the files it came from."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from ckptx.rules.steps import Pattern, Step


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
    def user(cls, where: str) -> "Origin":
        """A name the user typed (command line, Python code)."""
        return cls(where, True)


@dataclass(frozen=True)
class TargetSpec:
    """What the converted weights must fit: a model factory, a reference checkpoint or a manifest."""

    model: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    manifest: str | None = None
    allow_missing: tuple[Pattern, ...] = ()
    allow_unexpected: tuple[Pattern, ...] = ()
    where: str = ""
    model_origin: Origin = Origin()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base_dir: Path | None, where: str,
                  model_where: str = "") -> "TargetSpec":
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

    def merged(self, other: "TargetSpec | None") -> "TargetSpec":
        """`other` overrides this spec key by key (kwargs merged, allow lists added)."""
        if other is None:
            return self
        source_given = other.model or other.checkpoint or other.manifest
        return TargetSpec(
            model=other.model if source_given else self.model,
            kwargs={**(self.kwargs if not source_given or other.model == self.model else {}), **other.kwargs},
            checkpoint=other.checkpoint if source_given else self.checkpoint,
            manifest=other.manifest if source_given else self.manifest,
            allow_missing=self.allow_missing + other.allow_missing,
            allow_unexpected=self.allow_unexpected + other.allow_unexpected,
            where=other.where or self.where,
            model_origin=other.model_origin if source_given else self.model_origin,
        )

    def describe(self) -> str:
        """A short human name for the target."""
        if self.model:
            args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
            return f"{self.model}({args})"
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
    where: str = ""
    source_origin: Origin = Origin()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str, source_where: str = "") -> "VerifySpec":
        """Build from a schema-valid `verify:` mapping of a file (`source_where`: the place of `source_model:`)."""
        return cls(
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

    def then(self, other: "Recipe") -> "Recipe":
        """This recipe followed by `other`: extract candidates and steps concatenated, target merged."""
        target = other.target if self.target is None else self.target.merged(other.target)
        verify = other.verify or self.verify
        if verify is not None and other.verify is not None and self.verify is not None:
            verify = replace(self.verify, **{k: v for k, v in vars(other.verify).items() if v is not None})
        return Recipe(
            name=f"{self.name}+{other.name}" if self.name else other.name,
            description=other.description or self.description,
            extract=tuple(dict.fromkeys(self.extract + other.extract)),
            steps=self.steps + other.steps,
            target=target,
            verify=verify,
            params={**self.params, **other.params},
            files=tuple(dict.fromkeys(self.files + other.files)),
        )


def _patterns(value: str | list[str] | None) -> tuple[Pattern, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    return tuple(re.compile(v) for v in items)
