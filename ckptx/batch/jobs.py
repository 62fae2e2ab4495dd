"""Jobs files for `ckptx batch`: YAML with line marks -> schema -> defaults merged -> globs expanded -> checked.

Every problem in the file (and in every recipe it names) is collected and raised at once in a RuleError.
Paths are taken relative to the jobs file's folder. No torch here: jobs are plain data that can be
pickled to worker processes and Dask workers.
"""

from __future__ import annotations

import glob as globlib
import json
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptx.batch.fingerprint import sidecar_path
from ckptx.errors import Problem, RuleError, unique_problems
from ckptx.io.read.open import is_checkpoint_folder
from ckptx.io.write.destination import Identity, file_identity, resolved, walk_source
from ckptx.rules.loader import load_rules
from ckptx.rules.packs import resolve_rule
from ckptx.rules.recipe import Recipe, TargetSpec
from ckptx.rules.schema import schema_problems
from ckptx.rules.yamlfile import PathTuple, YamlDocument, load_yaml
from ckptx.text import display_path

JOBS_SCHEMA = "ckptx-jobs.schema.json"
PLACEHOLDERS = ("stem", "name", "parent")
EXTENSIONS = {"safetensors": ".safetensors", "torch": ".pth"}
FORMAT_OF_EXTENSION = {
    ".safetensors": "safetensors",
    ".pth": "torch",
    ".pt": "torch",
    ".bin": "torch",
    ".ckpt": "torch",
}
_TARGET_SOURCES = ("model", "checkpoint", "manifest")
_JOB_PATH = re.compile(r"^jobs\[(\d+)\]")
_SETTINGS = ("dst", "rules", "target", "format", "params", "force", "allow_globals")


@dataclass(frozen=True)
class JobSpec:
    """One entry of `jobs:` with the defaults applied, before its glob is expanded.

    `origin` maps each setting to the document path it came from (the job's own key or `defaults`),
    so that problems point at the line that set the value.
    """

    path: PathTuple
    src: str | None
    glob: str | None
    dst: str | None
    rules: tuple[str, ...]
    target: Mapping[str, Any] | None
    format: str | None
    params: Mapping[str, Any]
    force: bool
    allow_globals: tuple[str, ...]
    origin: Mapping[str, PathTuple] = field(default_factory=dict)

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], defaults: Mapping[str, Any], *, source: YamlDocument, path: PathTuple
    ) -> JobSpec:
        """Build from a schema-valid job mapping and the schema-valid `defaults:` mapping of `source`."""
        origin = {key: ("defaults", key) for key in _SETTINGS if key in defaults}
        origin.update({key: path + (key,) for key in _SETTINGS if key in data})
        for owner, where in ((defaults, ("defaults",)), (data, path)):
            if "model" in (owner.get("target") or {}):
                origin["target.model"] = where + ("target", "model")
        rules = data.get("rules", defaults.get("rules", ()))
        return cls(
            path=path,
            src=data.get("src"),
            glob=data.get("glob"),
            dst=data.get("dst", defaults.get("dst")),
            rules=(rules,) if isinstance(rules, str) else tuple(rules),
            target=merge_targets(defaults.get("target"), data.get("target")),
            format=data.get("format", defaults.get("format")),
            params={**(defaults.get("params") or {}), **(data.get("params") or {})},
            force=bool(data.get("force", defaults.get("force", False))),
            allow_globals=tuple(data.get("allow_globals", defaults.get("allow_globals", ()))),
            origin=origin,
        )

    def at(self, source: YamlDocument, key: str | None = None) -> str:
        """`jobs.yaml:12:5 jobs[3].src` for a setting of this job (where it was given), or the job itself."""
        return source.where(self.origin.get(key, self.path + (key,)) if key else self.path)


@dataclass(frozen=True)
class Job:
    """One concrete conversion: absolute paths, every default applied; plain data, picklable."""

    entry: str
    src: Path
    dst: Path
    base_dir: Path
    rules: tuple[str, ...]
    target: Mapping[str, Any] | None
    format: str
    params: Mapping[str, Any]
    force: bool
    allow_globals: tuple[str, ...]
    match: str = ""
    model_where: str = ""

    @property
    def where(self) -> str:
        """`jobs.yaml:12:5 jobs[3]`, plus `(match 2 of 7: sweep/b/best.pth)` for a glob's job."""
        return f"{self.entry} ({self.match})" if self.match else self.entry

    @property
    def label(self) -> str:
        """The output path relative to the jobs file's folder (unique within a jobs file)."""
        return _relative(self.dst, self.base_dir)

    @property
    def src_label(self) -> str:
        """The source path relative to the jobs file's folder."""
        return _relative(self.src, self.base_dir)

    def target_spec(self) -> TargetSpec | None:
        """The job's target as a TargetSpec (relative checkpoint/manifest paths from the jobs folder)."""
        if not self.target:
            return None
        return TargetSpec.from_dict(
            self.target, base_dir=self.base_dir, where=f"{self.entry}.target", model_where=self.model_where
        )

    def recipe(self) -> Recipe:
        """Load the job's rule files (paths from the jobs folder, or recipe names) with its params."""
        paths = [resolve_rule(ref, base_dir=self.base_dir, where=f"{self.entry}.rules") for ref in self.rules]
        return load_rules(paths, params=self.params)


@dataclass(frozen=True)
class JobsFile:
    """A loaded, checked jobs file: every job expanded, in file order (glob matches sorted)."""

    path: Path
    jobs: tuple[Job, ...]

    @property
    def base_dir(self) -> Path:
        """The folder relative paths are taken from."""
        return self.path.parent


def merge_targets(defaults: Mapping[str, Any] | None, own: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A job's `target:` over the defaults' one, key by key; `kwargs` merged key by key.

    A job naming another model, checkpoint or manifest replaces the defaults' target source (and, for
    another model, its kwargs), so a merged target never names two sources.
    """
    if not defaults and not own:
        return None
    merged = dict(defaults or {})
    own = dict(own or {})
    if any(key in own for key in _TARGET_SOURCES):
        if own.get("model") != merged.get("model"):
            merged.pop("kwargs", None)
        for key in _TARGET_SOURCES:
            merged.pop(key, None)
    for key, value in own.items():
        merged[key] = {**(merged.get("kwargs") or {}), **value} if key == "kwargs" else value
    return merged


def load_jobs(path: str | Path) -> JobsFile:
    """Load and check a jobs file: schema, every job, every recipe named, globs, output collisions.

    Raises RuleError listing every problem (file:line:col and path, then what to do).
    """
    file = Path(path)
    doc = load_yaml(file, display=display_path(file))
    if not isinstance(doc.data, dict):
        raise RuleError([Problem(f"{doc.file}:1:1", "a jobs file must be a mapping with `ckptx: 1` and `jobs:`")])
    if "ckptx" not in doc.data:  # not a jobs file at all: its keys (another file's text) are not listed
        raise RuleError([Problem(f"{doc.file}:1:1", "not a jobs file: missing required key 'ckptx'")])
    problems = schema_problems(doc, JOBS_SCHEMA)
    by_entry = _problems_by_entry(problems)
    if by_entry is None:
        raise RuleError(problems)
    defaults = doc.data.get("defaults") or {}
    checker = _Checker(doc, file.resolve().parent, file.parent)
    jobs: list[Job] = []
    for i, raw in enumerate(doc.data["jobs"]):
        if i in by_entry:
            checker.problems.extend(by_entry[i])
        else:
            jobs += checker.expand(JobSpec.from_dict(raw, defaults, source=doc, path=("jobs", i)))
    checker.check_outputs(jobs)
    if checker.problems:
        raise RuleError(unique_problems(checker.problems))
    return JobsFile(file.resolve(), tuple(jobs))


def _problems_by_entry(problems: list[Problem]) -> dict[int, list[Problem]] | None:
    """Schema problems by `jobs:` entry; None when one lies outside the entries and nothing more can be checked.

    The entries without schema problems are still checked (sources, globs, recipes, outputs), so every
    problem is reported at once, in file order.
    """
    by_entry: dict[int, list[Problem]] = {}
    for problem in problems:
        place = problem.where.split(" ", 1)[1] if " " in problem.where else ""
        match = _JOB_PATH.match(place)
        if match is None:
            return None
        by_entry.setdefault(int(match.group(1)), []).append(problem)
    return by_entry


class _Checker:
    """Expands job specs into jobs while collecting every problem."""

    def __init__(self, doc: YamlDocument, base: Path, shown_base: Path) -> None:
        self.doc = doc
        self.base = base
        self.shown_base = shown_base  # the jobs file's folder as given: messages stay short and stable
        self.problems: list[Problem] = []
        self._recipes_seen: set[str] = set()

    def expand(self, spec: JobSpec) -> list[Job]:
        """The jobs of one spec (one per glob match); problems are recorded, not raised."""
        before = len(self.problems)
        self._check_spec(spec)
        sources = self._sources(spec)
        if len(self.problems) > before:
            return []
        jobs = []
        for k, src in enumerate(sources):
            match = f"match {k + 1} of {len(sources)}: {_relative(src, self.base)}" if spec.glob is not None else ""
            dst = self._output(spec, src)
            if dst is None:
                return []
            jobs.append(
                Job(
                    entry=spec.at(self.doc),
                    match=match,
                    src=src,
                    dst=dst,
                    base_dir=self.base,
                    rules=spec.rules,
                    target=spec.target,
                    format=_format_of(dst),
                    params=dict(spec.params),
                    force=spec.force,
                    allow_globals=spec.allow_globals,
                    model_where=spec.at(self.doc, "target.model") if "target.model" in spec.origin else "",
                )
            )
        return jobs

    def _check_spec(self, spec: JobSpec) -> None:
        if (spec.src is None) == (spec.glob is None):
            what = "both src and glob" if spec.src is not None else "neither src nor glob"
            self.problems.append(Problem(spec.at(self.doc), f"{what} given; give exactly one of them"))
        if spec.dst is None:
            self.problems.append(Problem(spec.at(self.doc), "no dst; give `dst:` here or under defaults"))
        else:
            self._check_template(spec)
        if not spec.rules:
            self.problems.append(Problem(spec.at(self.doc), "no rules; give `rules:` here or under defaults"))
        else:
            self._check_recipe(spec)

    def _check_template(self, spec: JobSpec) -> None:
        where = spec.at(self.doc, "dst")
        try:
            fields = list(string.Formatter().parse(spec.dst or ""))
        except ValueError as exc:
            self.problems.append(Problem(where, f"bad placeholder in {spec.dst!r}: {exc}; write {{{{ for a literal {{"))
            return
        for _, name, fmt, conversion in fields:
            if name is None:
                continue
            if name not in PLACEHOLDERS or fmt or conversion:
                shown = ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
                self.problems.append(
                    Problem(
                        where,
                        f"unknown placeholder {{{name}{'!' + conversion if conversion else ''}"
                        f"{':' + fmt if fmt else ''}}} in {spec.dst!r}; use {shown}",
                    )
                )
        if spec.format is not None and "format" in spec.origin and spec.origin["format"][0] == "jobs":
            suffix = Path(spec.dst or "").suffix.lower()
            implied = FORMAT_OF_EXTENSION.get(suffix)
            if implied is not None and implied != spec.format:
                self.problems.append(
                    Problem(
                        where,
                        f"{spec.dst!r} is a {implied} file but this job says "
                        f"format: {spec.format}; drop the extension or the format",
                    )
                )

    def _check_recipe(self, spec: JobSpec) -> None:
        key = json.dumps([spec.rules, spec.params], sort_keys=True, default=str)
        if key in self._recipes_seen:
            return
        self._recipes_seen.add(key)
        paths = []
        for k, ref in enumerate(spec.rules):
            try:
                paths.append(resolve_rule(ref, base_dir=self.shown_base, where=self._rules_where(spec, k)))
            except RuleError as exc:
                self.problems.extend(exc.problems)
        if len(paths) != len(spec.rules):
            return
        try:
            load_rules(paths, params=spec.params)
        except RuleError as exc:
            params_where = spec.at(self.doc, "params") if spec.params else spec.at(self.doc)
            self.problems.extend(Problem(params_where, p.message) if p.where == "--set" else p for p in exc.problems)

    def _rules_where(self, spec: JobSpec, index: int) -> str:
        origin = spec.origin["rules"]
        node: Any = self.doc.data
        for part in origin:
            node = node[part]
        return self.doc.where(origin + (index,) if isinstance(node, list) else origin)

    def _sources(self, spec: JobSpec) -> list[Path]:
        if spec.src is not None and spec.glob is None:
            src = self.base / spec.src
            if not src.exists():
                self.problems.append(
                    Problem(
                        spec.at(self.doc, "src"),
                        f"no such file: {spec.src} (paths are relative to the jobs file's folder)",
                    )
                )
            elif src.is_dir() and not is_checkpoint_folder(src):
                self.problems.append(
                    Problem(
                        spec.at(self.doc, "src"),
                        f"{spec.src} is a folder but not a model folder (config.json or params.json beside the "
                        f"weights), DCP or DeepSpeed checkpoint; give the checkpoint file",
                    )
                )
            return [src]
        if spec.glob is None:
            return []
        matches = sorted(Path(p) for p in globlib.glob(str(self.base / spec.glob), recursive=True))
        files = [p for p in matches if p.is_file()]
        if not files:
            self.problems.append(
                Problem(
                    spec.at(self.doc, "glob"),
                    f"{spec.glob!r} matches no file (patterns are relative to the jobs file's folder)",
                )
            )
        return files

    def _output(self, spec: JobSpec, src: Path) -> Path | None:
        rendered = (spec.dst or "").format(stem=src.stem, name=src.name, parent=src.parent.name)
        dst = self.base / rendered
        if dst.suffix.lower() not in FORMAT_OF_EXTENSION:
            dst = dst.with_name(dst.name + EXTENSIONS[spec.format or "safetensors"])
        return dst

    def check_outputs(self, jobs: list[Job]) -> None:
        """Two jobs writing one file, a job writing a file of any job's source, or a job writing into another
        job's checkpoint folder, are problems (one per entry). A source is what it IS (every file of a folder,
        every shard of an index), and paths are compared by what they name (symlinks, hard links, aliased folders),
        so no second name for a file gets past the rule. A torch output's sidecar is held to it too."""
        sources = _SourceOwners(jobs)
        writers: dict[tuple[object, ...], Job] = {}
        clashes: dict[str, list[str]] = {}
        for job in jobs:
            outputs = [(job.dst, "output")]
            if job.format != "safetensors":
                outputs.append((sidecar_path(job.dst), "output's sidecar"))
            for path, what in outputs:
                problem = self._clash(job, path, what, writers, sources)
                if problem:
                    clashes.setdefault(job.entry, []).append(problem)
            for key in _names_of(job.dst):
                writers.setdefault(key, job)
        for entry, messages in clashes.items():
            more = f" (and {len(messages) - 1} more like it)" if len(messages) > 1 else ""
            self.problems.append(
                Problem(
                    entry,
                    f"{messages[0]}{more}; give each job its own dst that is no job's "
                    f"src (e.g. with {{stem}} or {{parent}})",
                )
            )

    @staticmethod
    def _clash(job: Job, path: Path, what: str, writers: dict[tuple[object, ...], Job], sources: _SourceOwners) -> str:
        label = _relative(path, job.base_dir)
        writer = next((writers[key] for key in _names_of(path) if key in writers), None)
        if writer is not None and what == "output":
            return f"{what} {label} is also the output of {writer.where}"
        reader = sources.reader_of(path)
        if reader is not None:
            whole = resolved(reader.src) == resolved(path)
            return (
                f"{what} {label} is {'the source' if whole else 'a file of the source'} of "
                f"{'this job' if reader is job else reader.where}"
            )
        folder, owner = sources.folder_of(path, job)
        if owner is not None:
            return (
                f"{what} {label} is inside {_relative(folder, job.base_dir)}, the checkpoint folder {owner.where} reads"
            )
        return ""


class _SourceOwners:
    """Which job reads each file and each folder of the jobs' sources (walked once per distinct source)."""

    def __init__(self, jobs: list[Job]) -> None:
        self.by_name: dict[tuple[object, ...], Job] = {}
        self.folders: dict[Identity, list[Job]] = {}
        walked: dict[Path, tuple[list[Path], list[Identity]]] = {}
        for job in jobs:
            if job.src not in walked:
                walked[job.src] = walk_source(job.src)
            files, folders = walked[job.src]
            for file in [job.src, *files]:
                for key in _names_of(file):
                    self.by_name.setdefault(key, job)
            for folder in folders:
                self.folders.setdefault(folder, []).append(job)

    def reader_of(self, path: Path) -> Job | None:
        """The first job one of whose source files `path` names."""
        return next((self.by_name[key] for key in _names_of(path) if key in self.by_name), None)

    def folder_of(self, path: Path, job: Job) -> tuple[Path, Job | None]:
        """A checkpoint folder of another job that `path` lies in, and that job."""
        if not self.folders:
            return path, None
        for folder in resolved(path).parents:
            owners = self.folders.get(file_identity(folder) or (-1, -1), [])
            other = next((o for o in owners if o is not job), None)
            if other is not None:
                return folder, other
        return path, None


def _names_of(path: Path) -> list[tuple[object, ...]]:
    """What `path` names, as keys to compare by: its resolved path, and (device, inode) when it exists."""
    identity = file_identity(path)
    return [("path", resolved(path))] + ([("inode", *identity)] if identity is not None else [])


def _format_of(dst: Path) -> str:
    return FORMAT_OF_EXTENSION[dst.suffix.lower()]


def _relative(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)
