"""Find rule files by path or by name: shipped recipes and rule packs from installed distributions."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ckptx._data import shipped_rules_dir
from ckptx._lazy import lazy_module
from ckptx.errors import Problem, RuleError

if TYPE_CHECKING:  # pragma: no cover
    from importlib import metadata
else:
    metadata = lazy_module("importlib.metadata")  # 40-80 ms; only rule packs need it, not a rule file given by path

ENTRY_POINT_GROUP = "ckptx.rules"
SHIPPED = "ckptx"


@dataclass(frozen=True)
class RulePack:
    """A folder of recipes published under a pack name, with the distribution that provides it."""

    name: str
    folder: Path
    distribution: str
    version: str


@dataclass(frozen=True)
class RecipeRef:
    """A named recipe in a pack."""

    name: str
    pack: RulePack
    path: Path


def rule_packs(problems: list[Problem] | None = None) -> list[RulePack]:
    """The shipped pack first, then every pack exposed by the `ckptx.rules` entry point group.

    A pack that cannot be loaded is skipped (a broken third-party pack must not break ckptx); what
    went wrong is appended to `problems` when given.
    """
    from ckptx._version import __version__

    packs = [RulePack(SHIPPED, shipped_rules_dir(), "ckptx", __version__)]
    for entry in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = entry.dist
        distribution = dist.metadata["Name"] if dist else "?"
        try:
            folder = _pack_folder(entry)
        except Exception as exc:  # noqa: BLE001 - third-party code
            if problems is not None:
                problems.append(
                    Problem(
                        f"pack {entry.name} ({distribution})",
                        f"entry point '{entry.value}' cannot be loaded: {type(exc).__name__}: {exc}",
                    )
                )
            continue
        if not folder.is_dir():
            if problems is not None:
                problems.append(Problem(f"pack {entry.name} ({distribution})", f"{folder} is not a folder"))
            continue
        packs.append(RulePack(entry.name, folder, distribution, dist.version if dist else "?"))
    return packs


def _pack_folder(entry: metadata.EntryPoint) -> Path:
    """An entry point names a package (its folder holds the recipes) or a callable returning a folder."""
    target = entry.load()
    if callable(target):
        target = target()
    if isinstance(target, (str, Path)):
        return Path(target)
    files = getattr(target, "__file__", None)
    if not files:
        raise ValueError(f"{entry.value} is neither a package nor a callable returning a folder")
    return Path(files).parent


def list_recipes(problems: list[Problem] | None = None) -> list[RecipeRef]:
    """Every recipe of every pack, sorted by pack then name (see `rule_packs` for `problems`)."""
    refs = []
    for pack in rule_packs(problems):
        if not pack.folder.is_dir():
            continue
        for path in sorted(pack.folder.rglob("*.yaml")):
            name = path.relative_to(pack.folder).with_suffix("").as_posix()
            refs.append(RecipeRef(name, pack, path))
    return refs


def clashes(refs: list[RecipeRef]) -> dict[str, list[RecipeRef]]:
    """Recipe names that several packs provide (each must then be written `pack:name`)."""
    by_name: dict[str, list[RecipeRef]] = {}
    for ref in refs:
        by_name.setdefault(ref.name, []).append(ref)
    return {name: found for name, found in by_name.items() if len(found) > 1}


def find_recipe(path: Path) -> RecipeRef | None:
    """The pack recipe stored at `path`, if it is one."""
    resolved = path.resolve()
    return next((r for r in list_recipes() if r.path.resolve() == resolved), None)


def resolve_rule(ref: str | Path, *, base_dir: Path | None = None, where: str = "") -> Path:
    """A path (relative to `base_dir`), a recipe name, or `pack:name` -> the rule file's path."""
    text = str(ref)
    candidate = Path(text) if base_dir is None or Path(text).is_absolute() else base_dir / text
    if candidate.is_file():
        return candidate
    pack_name, _, name = text.rpartition(":") if ":" in text and not Path(text).exists() else ("", "", text)
    name = name[:-5] if name.endswith(".yaml") else name
    matches = [r for r in list_recipes() if r.name == name and (not pack_name or r.pack.name == pack_name)]
    if len(matches) == 1:
        return matches[0].path
    place = where or text
    if len(matches) > 1:
        choices = ", ".join(f"{m.pack.name}:{m.name}" for m in matches)
        raise RuleError([Problem(place, f"recipe name '{name}' is provided by several packs; pick one of {choices}")])
    if candidate.suffix in (".yaml", ".yml") or "/" in text and Path(text).parent.is_dir():
        raise RuleError([Problem(place, f"no such rule file: {candidate}" if where else "no such rule file")])
    raise RuleError(
        [Problem(place, f"no rule file or shipped recipe named '{text}'; {_did_you_mean(name)}see `ckptx rules list`")]
    )


def _did_you_mean(name: str) -> str:
    """`did you mean 'common/strip-module-prefix'? ` for the closest recipe names (by the whole name or its last
    part), or nothing."""
    names = sorted({r.name for r in list_recipes()})
    close = difflib.get_close_matches(name, names, n=2, cutoff=0.6)
    tails = {n.rsplit("/", 1)[-1]: n for n in names}
    close += [
        tails[m]
        for m in difflib.get_close_matches(name.rsplit("/", 1)[-1], list(tails), n=2, cutoff=0.75)
        if tails[m] not in close
    ]
    return f"did you mean {' or '.join(repr(c) for c in close[:2])}? " if close else ""
