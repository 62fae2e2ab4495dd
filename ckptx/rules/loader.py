"""Load rule files into a Recipe: YAML with marks -> params -> schema -> extends -> typed steps."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from ckptx.errors import Problem, RuleError, UnreadableFile
from ckptx.files import MAX_TEXT, read_bounded
from ckptx.rules.packs import resolve_rule
from ckptx.rules.params import InferredParam, choice_problems, declare_params
from ckptx.rules.recipe import Recipe, RuleFile, TargetSpec, VerifySpec
from ckptx.rules.schema import schema_problems
from ckptx.rules.steps import Collector, Step
from ckptx.rules.yamlfile import YamlDocument, load_yaml, parse_yaml
from ckptx.text import display_path

_PARAM = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def load_rules(refs: str | Path | Sequence[str | Path], *, params: Mapping[str, Any] | None = None) -> Recipe:
    """Load one or more rule files (paths or recipe names) and compose them in order into one Recipe.

    `params` overrides parameter defaults (the CLI's `--set`). Every problem in every file is
    reported at once in a RuleError.
    """
    items = [refs] if isinstance(refs, (str, Path)) else list(refs)
    if not items:
        raise RuleError([Problem("", "no rule file given")])
    overrides = dict(params or {})
    declared: set[str] = set()
    recipe: Recipe | None = None
    problems: list[Problem] = []
    for ref in items:
        try:
            loaded = _load_file(resolve_rule(ref), overrides, (), declared)
        except RuleError as exc:
            problems.extend(exc.problems)
            continue
        recipe = loaded if recipe is None else recipe.then(loaded)
    unknown = sorted(set(overrides) - declared)
    if unknown and not problems:
        known = ", ".join(sorted(declared)) or "none"
        problems.append(Problem("--set", f"unknown parameter(s) {', '.join(unknown)}; the recipe declares: {known}"))
    if problems or recipe is None:
        raise RuleError(list(dict.fromkeys(problems)))  # a parent and its child may report one --set twice
    return _pending(recipe, partial(_load_again, tuple(items), overrides))


def _load_again(items: tuple[str | Path, ...], overrides: dict[str, Any], values: Mapping[str, Any]) -> Recipe:
    return load_rules(items, params={**overrides, **values})


def _pending(recipe: Recipe, resolver: Any) -> Recipe:
    """A recipe with parameters still to be chosen from the source knows how to load itself again."""
    return replace(recipe, resolver=resolver) if recipe.inferred else recipe


RecipeArg = Recipe | str | Path | Sequence[str | Path]


def as_recipe(recipes: RecipeArg, params: Mapping[str, Any] | None = None) -> Recipe:
    """A Recipe as is, or rule file paths/names loaded and composed in order."""
    return recipes if isinstance(recipes, Recipe) else load_rules(recipes, params=params)


def load_rules_text(
    text: str, display: str, *, base_dir: Path | None = None, params: Mapping[str, Any] | None = None
) -> Recipe:
    """Load a rule document given as text (e.g. a generated reverse recipe), shown as `display` in messages.

    Relative `extends:` are taken from `base_dir` (default: the working directory).
    """
    path = (base_dir or Path.cwd()) / "<text>.yaml"
    declared: set[str] = set()
    recipe = _load_file(path, dict(params or {}), (), declared, text=text, display=display)
    unknown = sorted(set(params or {}) - declared)
    if unknown:
        raise RuleError([Problem("--set", f"unknown parameter(s) {', '.join(unknown)}")])

    def again(values: Mapping[str, Any]) -> Recipe:
        return load_rules_text(text, display, base_dir=base_dir, params={**(params or {}), **values})

    return _pending(recipe, again)


def _load_file(
    path: Path,
    overrides: dict[str, Any],
    stack: tuple[Path, ...],
    declared: set[str],
    *,
    text: str | None = None,
    display: str | None = None,
) -> Recipe:
    resolved = path.resolve()
    if resolved in stack:
        chain = " -> ".join(display_path(p) for p in stack + (resolved,))
        raise RuleError([Problem(str(path), f"extends cycle: {chain}")])
    display = display or display_path(path)
    doc = load_yaml(path, display=display) if text is None else parse_yaml(text, display)
    data = doc.data
    if not isinstance(data, dict):
        raise RuleError([Problem(f"{display}:1:1", "a rule file must be a mapping with at least `ckptx: 1`")])
    if "ckptx" not in data:  # not a rule file at all: its keys (another file's text) are not listed
        raise RuleError([Problem(f"{display}:1:1", "missing required key 'ckptx'")])
    own_defaults = declare_params(data["params"], doc.where) if isinstance(data.get("params"), dict) else {}
    declared.update(own_defaults)

    problems: list[Problem] = []
    parents: list[Recipe] = []
    extends = data.get("extends", [])
    for i, ref in enumerate([extends] if isinstance(extends, str) else extends if isinstance(extends, list) else []):
        place = doc.where(("extends", i) if isinstance(extends, list) else ("extends",))
        try:
            parent_path = resolve_rule(str(ref), base_dir=path.parent, where=place)
            if parent_path.resolve() in stack + (resolved,):
                chain = " -> ".join(display_path(p) for p in stack + (resolved, parent_path.resolve()))
                raise RuleError([Problem(place, f"extends cycle: {chain}; remove one of these extends")])
            parents.append(_load_file(parent_path, {**own_defaults, **overrides}, stack + (resolved,), declared))
        except RuleError as exc:
            problems.extend(exc.problems)

    values: dict[str, Any] = {}
    for parent in parents:
        values.update(parent.params)
        values.update((p.name, p) for p in parent.inferred)
    values.update(own_defaults)
    problems.extend(choice_problems(values, overrides))
    values.update({k: v for k, v in overrides.items() if k in values or k in own_defaults})
    substituted = _substitute(data, values, doc, (), problems)
    doc = YamlDocument(doc.file, substituted, doc.marks, doc.key_marks)
    problems.extend(schema_problems(doc))
    if problems:
        raise RuleError(problems)
    raw = text.encode("utf-8") if text is not None else _file_bytes(path, display)
    own = _build(doc, path, values, problems, raw)
    if problems:
        raise RuleError(problems)
    if not parents:
        return own
    recipe = parents[0]
    for parent in parents[1:]:
        recipe = recipe.then(parent)
    return _inherit(recipe, own)


def _file_bytes(path: Path, shown: str) -> bytes:
    """The rule file's bytes (hashed into the recipe), read as `load_yaml` read them."""
    try:
        return read_bounded(path, shown, MAX_TEXT, "a YAML file")
    except UnreadableFile as exc:
        raise RuleError([Problem(shown, exc.detail)]) from None


def _inherit(parent: Recipe, child: Recipe) -> Recipe:
    combined = parent.then(child)
    return Recipe(
        name=child.name,
        description=child.description or parent.description,
        extract=combined.extract,
        steps=combined.steps,
        target=combined.target,
        verify=combined.verify,
        params=combined.params,
        files=combined.files,
        inferred=combined.inferred,
    )


def _build(doc: YamlDocument, path: Path, values: dict[str, Any], problems: list[Problem], content: bytes) -> Recipe:
    data = doc.data
    inferred = tuple(v for v in values.values() if isinstance(v, InferredParam))
    values = {k: v.placeholder if isinstance(v, InferredParam) else v for k, v in values.items()}
    steps = []
    for i, raw in enumerate(data.get("steps") or []):
        step = Step.from_dict(raw, where=doc.where, path=("steps", i), params=values, problems=problems)
        if step is not None:
            steps.append(step)
    target = None
    if "target" in data:
        collector = Collector(doc.where, ("target",))
        for key in ("allow_missing", "allow_unexpected"):
            if key in data["target"]:
                collector.regexes(data["target"][key], key)
        problems.extend(collector.problems)
        if not collector.problems:
            target = TargetSpec.from_dict(
                data["target"],
                base_dir=path.parent,
                where=doc.where(("target",)),
                model_where=doc.where(("target", "model")),
            )
    verify = (
        VerifySpec.from_dict(
            data["verify"],
            where=doc.where(("verify",)),
            base_dir=path.parent,
            source_where=doc.where(("verify", "source_model")),
        )
        if "verify" in data
        else None
    )
    extract = data.get("extract", ())
    digest = hashlib.sha256(content).hexdigest()
    name = data.get("name") or path.stem
    return Recipe(
        name=name,
        description=data.get("description", ""),
        extract=(extract,) if isinstance(extract, str) else tuple(extract),
        steps=tuple(steps),
        target=target,
        verify=verify,
        params=dict(values),
        files=(RuleFile(doc.file, name, digest),),
        inferred=inferred,
    )


def _substitute(
    value: Any, values: dict[str, Any], doc: YamlDocument, path: tuple[Any, ...], problems: list[Problem]
) -> Any:
    """Replace ${name} in every string except under params/extends/description."""
    if isinstance(value, dict):
        return {
            k: v
            if path == () and k in ("params", "extends", "description")
            else _substitute(v, values, doc, path + (k,), problems)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_substitute(v, values, doc, path + (i,), problems) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value
    for name in _PARAM.findall(value):
        if isinstance(values.get(name), InferredParam):
            continue  # chosen from the source later: the placeholder stays until then
        if name not in values:
            problems.append(Problem(doc.where(path), f"unknown parameter '${{{name}}}'; declare it under params:"))
            return value
        if values[name] is None:
            problems.append(Problem(doc.where(path), f"parameter '{name}' has no value; pass --set {name}=..."))
            return value
    whole = _PARAM.fullmatch(value)
    if whole:
        found = values[whole.group(1)]
        return value if isinstance(found, InferredParam) else found
    return _PARAM.sub(
        lambda m: m.group(0) if isinstance(values[m.group(1)], InferredParam) else _to_text(values[m.group(1)]), value
    )


def _to_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
