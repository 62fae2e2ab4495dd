"""Rule packs from other distributions: a real wheel, installed by pip, found through `ckptx.rules` entry points."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tests.conftest import subprocess_env
from tests.helpers.models import randomized, tiny_net

TO_BACKBONE = """\
# Demo pack recipe: a DDP TinyNet checkpoint -> the same weights under backbone.
ckptx: 1
name: tiny/to-backbone
description: TinyNet (DDP) -> backbone-prefixed weights
extends: common/strip-module-prefix
params: {prefix: backbone.}
steps:
  - add_prefix: '${prefix}'
"""

SHARED = """\
ckptx: 1
description: {pack}'s shared recipe
steps:
  - add_prefix: {pack}.
"""


def _wheel(folder: Path, dist: str, version: str, pack: str, files: dict[str, str]) -> Path:
    """Write a pure-Python wheel whose package `<dist>_pack` holds `files` and is the `ckptx.rules` entry `pack`."""
    package = f"{dist.replace('-', '_')}_pack"
    info = f"{dist.replace('-', '_')}-{version}.dist-info"
    contents = {
        f"{package}/__init__.py": "",
        **{f"{package}/{name}": text for name, text in files.items()},
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/entry_points.txt": f"[ckptx.rules]\n{pack} = {package}\n",
    }
    record = []
    for name, text in contents.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    contents[f"{info}/RECORD"] = "\n".join(record + [f"{info}/RECORD,,"]) + "\n"
    path = folder / f"{dist.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in contents.items():
            wheel.writestr(name, text)
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two packs (acme-rules 1.2.3 as `acme`, other-rules 0.4 as `other`), pip-installed into one folder."""
    build = tmp_path_factory.mktemp("wheels")
    target = tmp_path_factory.mktemp("site")
    wheels = [
        _wheel(
            build,
            "acme-rules",
            "1.2.3",
            "acme",
            {"tiny/to-backbone.yaml": TO_BACKBONE, "tiny/shared.yaml": SHARED.format(pack="acme")},
        ),
        _wheel(build, "other-rules", "0.4", "other", {"tiny/shared.yaml": SHARED.format(pack="other")}),
    ]
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
            str(target),
            *map(str, wheels),
        ],
        check=True,
    )
    assert (target / "acme_rules-1.2.3.dist-info" / "RECORD").is_file()
    return target


def _ckptx(site: Path, *args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    return subprocess.run(
        [sys.executable, "-m", "ckptx", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def ddp_ckpt(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    state = dict(randomized(tiny_net()).state_dict())
    path = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    return path, state


def test_rules_list_shows_pack_recipes_with_package_version_and_clashes(site: Path, tmp_path: Path) -> None:
    result = _ckptx(site, "rules", "list", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    row = next(r for r in doc["recipes"] if r["pack"] == "acme" and r["name"] == "tiny/to-backbone")
    assert (row["distribution"], row["version"]) == ("acme-rules", "1.2.3")
    assert row["description"] == "TinyNet (DDP) -> backbone-prefixed weights"
    assert doc["clashes"] == {"tiny/shared": ["acme", "other"]}
    text = _ckptx(site, "rules", "list", cwd=tmp_path).stdout
    assert re.search(
        r"\nacme:tiny/to-backbone +TinyNet \(DDP\) -> backbone-prefixed weights +acme-rules 1\.2\.3\n", text
    )
    assert (
        "note: 'tiny/shared' is provided by several packs; write acme:tiny/shared (acme-rules 1.2.3) or "
        "other:tiny/shared (other-rules 0.4)"
    ) in text


def test_convert_with_a_pack_recipe_by_name(site: Path, tmp_path: Path, ddp_ckpt) -> None:
    src, state = ddp_ckpt
    for name, dst in (("acme:tiny/to-backbone", "a.safetensors"), ("tiny/to-backbone", "b.safetensors")):
        result = _ckptx(site, "convert", src, "-r", name, "-o", tmp_path / dst, "--set", "prefix=neck.", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        from safetensors.torch import load_file

        out = load_file(str(tmp_path / dst))
        assert sorted(out) == sorted(f"neck.{k}" for k in state)
        assert all(torch.equal(out[f"neck.{k}"], v) for k, v in state.items())


def test_a_clashing_name_must_be_qualified(site: Path, tmp_path: Path, ddp_ckpt) -> None:
    src, _ = ddp_ckpt
    result = _ckptx(site, "convert", src, "-r", "tiny/shared", "--dry-run", cwd=tmp_path)
    assert result.returncode == 2
    assert (
        "recipe name 'tiny/shared' is provided by several packs; pick one of acme:tiny/shared, other:tiny/shared"
    ) in result.stderr
    result = _ckptx(site, "convert", src, "-r", "other:tiny/shared", "--dry-run", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["plan"]["entries"][0]["key"].startswith("other.module.")


def test_rules_show_names_the_pack_and_its_distribution(site: Path, tmp_path: Path) -> None:
    result = _ckptx(site, "rules", "show", "acme:tiny/to-backbone", cwd=tmp_path)
    first, rest = result.stdout.split("\n", 1)
    assert first.startswith("# acme:tiny/to-backbone: pack acme from acme-rules 1.2.3, ")
    assert first.endswith("acme_rules_pack/tiny/to-backbone.yaml") and rest.rstrip() == TO_BACKBONE.rstrip()
    resolved = _ckptx(site, "rules", "show", "acme:tiny/to-backbone", "--resolved", "--set", "prefix=x.", cwd=tmp_path)
    assert "- strip_prefix: [module., _orig_mod.]" in resolved.stdout and "- add_prefix: x." in resolved.stdout
