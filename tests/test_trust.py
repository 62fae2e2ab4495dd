"""The trust rule: nothing runs that the user did not ask for.

Pickle globals: `--allow-global` of anything that runs code or touches the system is refused (one line,
exit 2), the payload never runs, and the refusal never recommends a name `--allow-global` would refuse;
what it does recommend is accepted. Recipes: a callable a rule or jobs file names is checked before it is
imported or called, under every command that would call it; the user's own choice (`--target`,
`--allow-factory`) runs. Every payload here would create a marker file if it ran.
"""

from __future__ import annotations

import base64
import hashlib
import marshal
import os
import pickle
import re
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ckptx._data import shipped_rules_dir
from ckptx.errors import RefusedGlobal, SourceError, UntrustedCallable
from ckptx.io.read.open import open_source
from ckptx.rules.lint import named_callables
from ckptx.rules.loader import load_rules
from ckptx.rules.recipe import Origin, TargetSpec
from ckptx.targets.instantiate import build_model
from ckptx.targets.resolve import resolve_target
from ckptx.trust.callables import allow_factories, factory_verdict
from ckptx.trust.imports import import_refusal
from ckptx.trust.pickle_globals import resolve_allow_global
from tests.conftest import TINY_TARGET, subprocess_env
from tests.helpers.models import randomized, tiny_net

RECOMMENDED = re.compile(r"pass ((?:--allow-global [\w.]+ ?)+)")
STRIP = "ckptx: 1\nname: strip\nextract: model\nsteps: [{strip_prefix: module.}]\n"


# ---- helpers ---------------------------------------------------------------------------------------


def reduce_pickle(module: str, name: str, args: tuple[Any, ...]) -> bytes:
    """Hand-built pickle opcodes: `GLOBAL module name`, the arguments, REDUCE (calls it when loaded)."""
    arguments = pickle.dumps(args, protocol=2)[2:-1]  # without PROTO and STOP
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + arguments + b"R."


class Reduce:
    """Pickles as `func(*args)`: torch.save of it writes a real torch zip whose data.pkl calls `func`."""

    def __init__(self, func: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.func, self.args


@pytest.fixture
def markers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder on sys.path with `markermod` (writes `imported` when imported, `called` when `build` runs),
    a script that writes `ran` and a harmless `ownfactory` of the user's own (`ownfactory:build` writes
    `own-called` and returns a Linear)."""
    folder = tmp_path / "mods"
    folder.mkdir()
    (folder / "markermod.py").write_text(
        f"open({str(tmp_path / 'imported')!r}, 'w').close()\n\n\n"
        f"def build(**kwargs):\n    open({str(tmp_path / 'called')!r}, 'w').close()\n",
        encoding="utf-8",
    )
    (folder / "script.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n", encoding="utf-8")
    (folder / "ownfactory.py").write_text(
        "import torch\n\n\n"
        f"def build(width=3):\n    open({str(tmp_path / 'own-called')!r}, 'w').close()\n"
        "    return torch.nn.Linear(2, width)\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(folder))
    yield tmp_path
    for name in ("markermod", "ownfactory"):
        sys.modules.pop(name, None)


def no_marker(tmp_path: Path) -> bool:
    """True when no payload ran: no marker file, `markermod` never imported."""
    made = [p.name for p in tmp_path.iterdir() if p.name in ("pwned", "imported", "called", "ran")]
    return not made and "markermod" not in sys.modules


def recommended(text: str) -> list[str]:
    """The globals a message recommends (`pass --allow-global A --allow-global B`)."""
    return [name for flags in RECOMMENDED.findall(text) for name in flags.split()[1::2]]


def one_line(text: str) -> bool:
    return text.count("\n") == 1 and text.startswith("ckptx: error: ")


# ---- pickle globals --------------------------------------------------------------------------------


def dangerous(marker: Path, folder: Path) -> list[tuple[str, tuple[Any, ...]]]:
    """Each global the rule refuses, with arguments that create `marker` (or run code) if it is ever called."""
    touch = f"touch {marker}"
    nested = reduce_pickle("posix", "system", (touch,))
    code = marshal.dumps(compile(f"open({str(marker)!r}, 'w')", "<payload>", "exec"))
    return [
        ("builtins.eval", (f"__import__('os').system({touch!r})",)),
        ("builtins.exec", (f"import os; os.system({touch!r})",)),
        ("builtins.compile", (f"open({str(marker)!r}, 'w')", "<payload>", "exec")),
        ("builtins.getattr", ("text", "upper")),
        ("builtins.setattr", ("text", "x", 1)),
        ("builtins.open", (str(marker), "w")),
        ("builtins.__import__", ("markermod",)),
        ("builtins.input", ("? ",)),
        ("builtins.breakpoint", ()),
        ("os.system", (touch,)),
        ("posix.system", (touch,)),
        ("nt.system", (touch,)),
        ("subprocess.Popen", (["touch", str(marker)],)),
        ("subprocess.run", (["touch", str(marker)],)),
        ("subprocess.call", (["touch", str(marker)],)),
        ("subprocess.check_output", (["touch", str(marker)],)),
        ("sys.exit", (3,)),
        ("shutil.copy", (str(folder / "script.py"), str(marker))),
        ("socket.socket", ()),
        ("importlib.import_module", ("markermod",)),
        ("pickle.loads", (nested,)),
        ("marshal.loads", (code,)),
        ("ctypes.CDLL", (None,)),
        ("runpy.run_path", (str(folder / "script.py"),)),
        ("code.InteractiveInterpreter", ()),
        ("pty.spawn", (["touch", str(marker)],)),
        ("multiprocessing.Process", ()),
    ]


DANGEROUS_NAMES = [name for name, _ in dangerous(Path("m"), Path("."))]


@pytest.mark.parametrize("name", DANGEROUS_NAMES)
def test_allow_global_of_code_or_system_is_refused_and_the_payload_never_runs(
    markers: Path, run_cli, name: str
) -> None:
    args = dict(dangerous(markers / "pwned", markers / "mods"))[name]
    path = markers / "evil.pth"
    module, _, attr = name.rpartition(".")
    path.write_bytes(reduce_pickle(module, attr, args))
    for extra in (["--allow-global", name], []):
        result = run_cli("inspect", path, *extra)
        assert result.code == 2 and one_line(result.err), result.err
        assert not recommended(result.err), result.err  # never a refused name
        assert "--unsafe-pickle, which runs any code the file contains" in result.err
        assert no_marker(markers)
    assert f"--allow-global {name}: refused: " in run_cli("inspect", path, "--allow-global", name).err


@pytest.mark.parametrize(
    "func, args",
    [
        (os.system, ("touch {m}",)),
        (eval, ("__import__('os').system('touch {m}')",)),
        (subprocess.Popen, (["touch", "{m}"],)),
    ],
    ids=["os.system", "eval", "Popen"],
)
def test_a_torch_zip_payload_is_refused_by_the_real_command(tmp_path: Path, func: Any, args: tuple[Any, ...]) -> None:
    marker = tmp_path / "pwned"
    filled = tuple(
        [a.replace("{m}", str(marker)) for a in x] if isinstance(x, list) else x.replace("{m}", str(marker))
        for x in args
    )
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(2)}, "x": Reduce(func, filled)}, path, pickle_protocol=3)
    name = f"{func.__module__}.{func.__qualname__}"
    for extra in (["--allow-global", name], []):
        # -W: torch warns that the file uses pickle protocol 3 (the protocol that keeps `subprocess` its name)
        done = subprocess.run(
            [sys.executable, "-W", "ignore::UserWarning", "-m", "ckptx", "inspect", str(path), *extra],
            env=subprocess_env(),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2 and one_line(done.stderr), done.stderr
        assert name in done.stderr and not recommended(done.stderr)
        assert not marker.exists()


def test_the_recommendation_is_what_allow_global_accepts(run_cli, args_checkpoint: Path) -> None:
    refused = run_cli("convert", args_checkpoint, "-r", "common/strip-module-prefix", "--dry-run")
    assert refused.code == 2 and one_line(refused.err)
    assert recommended(refused.err) == ["argparse.Namespace"]
    followed = run_cli(
        "convert",
        args_checkpoint,
        "-r",
        "common/strip-module-prefix",
        "--dry-run",
        "--allow-global",
        "argparse.Namespace",
    )
    assert followed.code == 0, followed.err


def test_builtin_and_numpy_globals_are_recommended_qualified_and_load(tmp_path: Path, run_cli) -> None:
    path = tmp_path / "extras.pth"
    torch.save({"model": {"w": torch.ones(2)}, "tags": frozenset({"a"}), "best": np.float64(0.5)}, path)
    refused = run_cli("inspect", path)
    names = recommended(refused.err)
    assert refused.code == 2 and one_line(refused.err) and "builtins.frozenset" in names and len(names) >= 3, (
        refused.err
    )
    for name in names:
        resolve_allow_global(name)  # accepted, or this raises
    followed = run_cli("inspect", path, *[arg for name in names for arg in ("--allow-global", name)])
    assert followed.code == 0, followed.err


def test_a_bare_builtin_name_is_not_the_accepted_form(run_cli, tmp_path: Path) -> None:
    path = tmp_path / "set.pth"
    torch.save({"model": {"w": torch.ones(2)}, "tags": frozenset({"a"})}, path, _use_new_zipfile_serialization=False)
    refused = run_cli("inspect", path)
    assert recommended(refused.err) == ["builtins.frozenset"], refused.err  # torch's message says `frozenset`
    assert "no such importable global" in run_cli("inspect", path, "--allow-global", "frozenset").err
    assert run_cli("inspect", path, "--allow-global", "builtins.frozenset").code == 0


def test_own_data_classes_are_recommended_then_checked_when_named(
    tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "mods"
    folder.mkdir()
    (folder / "trainconf.py").write_text(
        textwrap.dedent("""\
        import dataclasses, enum, os

        @dataclasses.dataclass
        class Config:
            lr: float = 0.1

        class Phase(enum.Enum):
            TRAIN = 1

        class Hooked(dict):
            def __setstate__(self, state):
                os.system(state)

        def helper():
            return 1
        """),
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(folder))
    import trainconf

    try:
        path = tmp_path / "conf.pth"
        torch.save({"model": {"w": torch.ones(2)}, "cfg": trainconf.Config(), "phase": trainconf.Phase.TRAIN}, path)
        del sys.modules["trainconf"]  # as in a fresh process: the file names a module that is not installed
        refused = run_cli("inspect", path)
        assert sorted(recommended(refused.err)) == ["trainconf.Config", "trainconf.Phase"], refused.err
        assert "ckptx has not looked at it ('trainconf' is not an installed package" in refused.err
        assert "trainconf" not in sys.modules  # not imported to look
        followed = run_cli("inspect", path, "--allow-global", "trainconf.Config", "--allow-global", "trainconf.Phase")
        assert followed.code == 0, followed.err
        with pytest.raises(RefusedGlobal, match="defines __setstate__ in Python"):
            resolve_allow_global("trainconf.Hooked")
        with pytest.raises(RefusedGlobal, match="it is a function, not a class"):
            resolve_allow_global("trainconf.helper")
    finally:
        sys.modules.pop("trainconf", None)


@pytest.mark.parametrize(
    "name",
    [
        "argparse.Namespace",
        "collections.OrderedDict",
        "builtins.frozenset",
        "builtins.complex",
        "numpy.dtype",
        "datetime.datetime",
        "pathlib.PosixPath",
    ],
)
def test_plain_data_types_are_allowed(name: str) -> None:
    resolve_allow_global(name)


@pytest.mark.parametrize(
    "name",
    [
        "torch.nn.Linear",
        "functools.partial",
        "types.FunctionType",
        "builtins.type",
        "builtins.map",
        "io.FileIO",
        "zipfile.ZipFile",
        "numpy.memmap",
        "numpy.load",
        "collections.namedtuple",
        "copyreg._reconstructor",
        "tempfile.NamedTemporaryFile",
    ],
)
def test_code_and_file_touching_classes_are_refused(name: str) -> None:
    with pytest.raises(RefusedGlobal):
        resolve_allow_global(name)


def test_a_jobs_file_allows_no_global_of_a_module_that_came_with_it(markers: Path) -> None:
    from ckptx.trust.pickle_globals import check_file_globals

    with pytest.raises(SourceError, match="'markermod' is not an installed package"):
        check_file_globals(["markermod.build"], "jobs.yaml:3:5 jobs[0] allow_globals")
    with pytest.raises(RefusedGlobal):
        check_file_globals(["subprocess.Popen"], "jobs.yaml:3:5 jobs[0] allow_globals")
    check_file_globals(["argparse.Namespace"], "jobs.yaml:3:5 jobs[0] allow_globals")
    assert no_marker(markers)


def test_unsafe_pickle_still_loads_what_the_user_trusts(args_checkpoint: Path) -> None:
    with open_source(args_checkpoint, ["model"], unsafe_pickle=True) as source:
        assert source.extracted_from == "model"


# ---- callables named in files ----------------------------------------------------------------------


EVIL = {
    "subprocess:Popen": "{args: 'touch {marker}', shell: true}",
    "os:system": "{command: 'touch {marker}'}",
    "builtins:exec": "{source: \"open('{marker}', 'w')\"}",
    "markermod:build": "{}",
}


def evil_rules(folder: Path, model: str, *, section: str = "target") -> Path:
    kwargs = EVIL[model].replace("{marker}", str(folder / "pwned"))
    path = folder / "evil.yaml"
    if section == "target":
        body = f"target:\n  model: '{model}'\n  kwargs: {kwargs}\n"
    else:
        body = f"verify:\n  source_model: '{model}'\n  source_kwargs: {kwargs}\n  input_shape: [1, 3, 8, 8]\n"
    path.write_text(STRIP + body, encoding="utf-8")
    return path


@pytest.fixture
def ddp(markers: Path) -> Path:
    path = markers / "zoo" / "m.pt"
    path.parent.mkdir()
    torch.save({"model": {f"module.{k}": v for k, v in randomized(tiny_net()).state_dict().items()}}, path)
    return path


@pytest.mark.parametrize("model", list(EVIL))
def test_convert_dry_run_refuses_a_file_named_callable(markers: Path, ddp: Path, run_cli, model: str) -> None:
    rules = evil_rules(markers, model)
    result = run_cli("convert", ddp, "-r", rules, "--dry-run")
    assert result.code == 2 and one_line(result.err), result.err
    assert f"evil.yaml:6:10 target.model: refused to call '{model}' named in a file: " in result.err
    assert no_marker(markers)


@pytest.mark.parametrize("model", list(EVIL))
def test_verify_refuses_a_file_named_source_model(markers: Path, ddp: Path, run_cli, model: str) -> None:
    rules = evil_rules(markers, model, section="verify")
    out = markers / "out.safetensors"
    result = run_cli("convert", ddp, "-r", rules, "-o", out, "--verify", "--target", TINY_TARGET)
    assert result.code == 2 and one_line(result.err), result.err
    assert f"verify.source_model: refused to call '{model}'" in result.err
    assert not out.exists() and no_marker(markers)


@pytest.mark.parametrize("model", list(EVIL))
def test_lint_lists_the_callable_and_refuses_it_without_calling(markers: Path, run_cli, model: str) -> None:
    rules = evil_rules(markers, model)
    result = run_cli("lint", rules, "--json")
    assert result.code == 2
    entry = result.json["files"][0]
    assert [c["name"] for c in entry["callables"]] == [model] and entry["callables"][0]["allowed"] is False
    assert entry["errors"][0].startswith(f"{rules}:6:10 target.model: refused to call '{model}'")
    assert no_marker(markers)


@pytest.mark.parametrize("model", list(EVIL))
def test_invert_refuses_target_and_verify_source_models(markers: Path, run_cli, model: str) -> None:
    traced = run_cli("invert", evil_rules(markers, model), "--original", TINY_TARGET)
    assert traced.code == 2 and f"target.model: refused to call '{model}'" in traced.err, traced.err
    rules = markers / "cast.yaml"
    kwargs = EVIL[model].replace("{marker}", str(markers / "pwned"))
    rules.write_text(
        f"ckptx: 1\nsteps: [{{cast: {{dtype: float16}}}}]\nverify:\n  source_model: '{model}'\n"
        f"  source_kwargs: {kwargs}\n  input_shape: [1, 3, 8, 8]\n",
        encoding="utf-8",
    )
    fallback = run_cli("invert", rules)  # a cast needs the source layout: from verify.source_model
    assert fallback.code == 2 and f"verify.source_model: refused to call '{model}'" in fallback.err, fallback.err
    assert no_marker(markers)


@pytest.mark.parametrize("model", list(EVIL))
def test_batch_dry_run_refuses_callables_of_jobs_and_rule_files(markers: Path, ddp: Path, run_cli, model: str) -> None:
    kwargs = EVIL[model].replace("{marker}", str(markers / "pwned"))
    (markers / "strip.yaml").write_text(STRIP, encoding="utf-8")
    evil_rules(markers, model)
    jobs = markers / "jobs.yaml"
    jobs.write_text(
        textwrap.dedent(f"""\
        ckptx: 1
        defaults: {{rules: strip.yaml}}
        jobs:
          - {{src: zoo/m.pt, dst: out/a, target: {{model: '{model}', kwargs: {kwargs}}}}}
          - {{src: zoo/m.pt, dst: out/b, rules: evil.yaml}}
        """),
        encoding="utf-8",
    )
    result = run_cli("batch", jobs, "--dry-run", "--json")
    assert result.code == 1, result.out
    errors = [job["error"] for job in result.json["jobs"]]
    assert errors[0].startswith(f"{jobs}:4:49 jobs[0].target.model: refused to call '{model}'"), errors[0]
    assert errors[1].startswith(f"{markers / 'evil.yaml'}:6:10 target.model: refused to call '{model}'"), errors[1]
    assert all(job["error_type"] == "UntrustedCallable" for job in result.json["jobs"])
    assert no_marker(markers)


def test_a_callable_the_user_names_runs(markers: Path, ddp: Path, run_cli) -> None:
    rules = markers / "own.yaml"
    rules.write_text(STRIP + "target: {model: 'ownfactory:build', kwargs: {width: 4}}\n", encoding="utf-8")
    refused = run_cli("convert", ddp, "-r", rules, "--dry-run")
    assert refused.code == 2 and "--allow-factory ownfactory:build (or --target ownfactory:build" in refused.err
    assert not (markers / "own-called").exists() and "ownfactory" not in sys.modules
    by_target = run_cli("convert", ddp, "-r", rules, "--dry-run", "--target", "ownfactory:build")
    assert by_target.code == 1 and "validation against ownfactory:build(width=4): FAILED" in by_target.out
    assert (markers / "own-called").exists()
    allowed = run_cli("convert", ddp, "-r", rules, "--dry-run", "--allow-factory", "ownfactory:build")
    assert allowed.code == 1 and "validation against ownfactory:build(width=4)" in allowed.out
    lint = run_cli("lint", rules, "--allow-factory", "ownfactory:build")
    assert lint.code == 0 and "runs: " in lint.out and "you allowed it (--allow-factory)" in lint.out


def test_batch_runs_what_the_user_allows(markers: Path, ddp: Path, run_cli) -> None:
    (markers / "strip.yaml").write_text(STRIP, encoding="utf-8")
    jobs = markers / "jobs.yaml"
    jobs.write_text(
        f"ckptx: 1\njobs:\n  - {{src: zoo/m.pt, dst: out/a, rules: strip.yaml, target: {{model: '{TINY_TARGET}'}}}}\n",
        encoding="utf-8",
    )
    assert run_cli("batch", jobs, "--dry-run").code == 1
    result = run_cli("batch", jobs, "--dry-run", "--allow-factory", TINY_TARGET, "--json")
    assert result.code == 0 and result.json["counts"]["planned"] == 1, result.out


def test_python_api_strings_are_the_callers_choice_and_specs_are_checked(markers: Path) -> None:
    assert set(resolve_target("ownfactory:build").tensors) == {"weight", "bias"}
    with pytest.raises(UntrustedCallable):
        resolve_target(TargetSpec(model="markermod:build"))  # not marked as the user's: a file's
    with pytest.raises(UntrustedCallable):
        build_model("markermod:build", {}, "here")
    assert no_marker(markers)
    model = build_model("ownfactory:build", {}, "here", origin=Origin.user("here"))
    assert isinstance(model, torch.nn.Linear)
    with allow_factories(["ownfactory:build"]):
        assert resolve_target(TargetSpec(model="ownfactory:build")).tensors


def test_what_may_be_imported_to_look(markers: Path) -> None:
    assert import_refusal("torch.nn") is None and import_refusal("argparse") is None
    assert "not an installed package" in import_refusal("markermod")
    assert "is a program" in import_refusal("pip.__main__")
    assert "does things" in import_refusal("antigravity")
    assert import_refusal("safetensors.torch") is None  # an installed distribution


@pytest.mark.parametrize(
    "name, allowed",
    [
        ("torch.nn:Linear", True),
        ("ckptx.factories:convnextv2_hf", True),
        ("ckptx.reference.convnextv2:build", True),
        ("ckptx.reference.convnextv2:ConvNeXtV2", True),
        ("torch:load", False),
        ("torch.hub:load", False),
        ("torch.nn:Module.register_forward_hook", False),
        ("ckptx.factories:_size", False),
        ("torch:Tensor", False),
        ("safetensors.torch:load_file", False),
        ("os:system", False),
        ("builtins:exec", False),
    ],
)
def test_verdicts_are_decided_on_what_the_object_is(name: str, allowed: bool) -> None:
    verdict = factory_verdict(name)
    assert verdict.allowed is allowed, verdict
    if name.startswith(("torch:", "torch.hub", "os:", "builtins:")):
        assert not verdict.may_allow  # a known library's non-factory, or the standard library: never recommended


def test_trust_remote_code_from_a_file_is_refused() -> None:
    spec = TargetSpec(model="torch.nn:Linear", kwargs={"in_features": 1, "out_features": 1, "trust_remote_code": True})
    with pytest.raises(UntrustedCallable, match="trust_remote_code runs code downloaded from the hub"):
        resolve_target(spec)


def test_every_shipped_recipe_names_only_callables_the_rule_allows() -> None:
    names = set()
    for path in sorted(shipped_rules_dir().rglob("*.yaml")):
        for named in named_callables(load_rules(path)):
            verdict = factory_verdict(named.name, named.kwargs)
            assert verdict.allowed, (path, verdict)
            names.add(named.name)
    assert "ckptx.reference.convnextv2:build" in names and len(names) >= 5


# ---- a rule pack declares its factories ------------------------------------------------------------


MODELS_PY = """\
import torch
from os import system


def build(width=3):
    return torch.nn.Linear(2, width)


def undeclared():
    return torch.nn.Linear(2, 2)
"""


def _wheel(folder: Path) -> Path:
    """The `zoo-rules` wheel: pack `zoo` with one recipe, and `[ckptx.factories]` declaring `zoo_pack.models:build`
    and the whole `zoo_pack.more` module."""
    info = "zoo_rules-1.0.dist-info"
    recipe = "ckptx: 1\nsteps: [{strip_prefix: module.}]\ntarget: {model: 'zoo_pack.models:build'}\n"
    contents = {
        "zoo_pack/__init__.py": "",
        "zoo_pack/models.py": MODELS_PY,
        "zoo_pack/more.py": MODELS_PY,
        "zoo_pack/linear.yaml": recipe,
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: zoo-rules\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/entry_points.txt": "[ckptx.rules]\nzoo = zoo_pack\n\n[ckptx.factories]\n"
        "linear = zoo_pack.models:build\nmore = zoo_pack.more\n",
    }
    record = []
    for name, text in contents.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    contents[f"{info}/RECORD"] = "\n".join(record + [f"{info}/RECORD,,"]) + "\n"
    path = folder / "zoo_rules-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in contents.items():
            wheel.writestr(name, text)
    return path


def test_a_rule_pack_declares_the_factories_its_recipes_may_name(tmp_path: Path) -> None:
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--disable-pip-version-check",
            "--target",
            str(site),
            str(_wheel(tmp_path)),
        ],
        check=True,
    )
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    ckpt = tmp_path / "m.pt"
    torch.save({"module.weight": torch.zeros(3, 2), "module.bias": torch.zeros(3)}, ckpt)
    rules = {name: tmp_path / f"{name}.yaml" for name in ("undeclared", "more")}
    rules["undeclared"].write_text("ckptx: 1\ntarget: {model: 'zoo_pack.models:undeclared'}\n", encoding="utf-8")
    rules["more"].write_text(
        "ckptx: 1\nsteps: [{strip_prefix: module.}]\ntarget: {model: 'zoo_pack.more:undeclared', kwargs: {}}\n",
        encoding="utf-8",
    )

    def ckptx(*args: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ckptx", *map(str, args)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )

    declared = ckptx("convert", ckpt, "-r", "zoo:linear", "--dry-run")
    assert declared.returncode == 0 and "validation against zoo_pack.models:build(): OK" in declared.stdout, (
        declared.stderr
    )
    lint = ckptx("lint", "zoo:linear")
    assert "(declared by the rule pack zoo-rules)" in lint.stdout, lint.stdout
    whole_module = ckptx("convert", ckpt, "-r", rules["more"], "--dry-run")
    assert whole_module.returncode == 1 and "validation against zoo_pack.more:undeclared()" in whole_module.stdout
    refused = ckptx("convert", ckpt, "-r", rules["undeclared"], "--dry-run")
    assert (
        refused.returncode == 2
        and "refused to call 'zoo_pack.models:undeclared' named in a file: a function" in refused.stderr
    ), refused.stderr
    rules["undeclared"].write_text(
        f"ckptx: 1\ntarget: {{model: 'zoo_pack.more:system', kwargs: {{command: 'touch {tmp_path / 'pwned'}'}}}}\n",
        encoding="utf-8",
    )
    imported = ckptx("convert", ckpt, "-r", rules["undeclared"], "--dry-run")  # declared module, imported callable
    assert imported.returncode == 2 and "it is a builtin function of the standard library (posix)" in imported.stderr
    assert not (tmp_path / "pwned").exists()
