"""DeepSpeed ZeRO-2/3 folders as a source: real checkpoints written by DeepSpeed on the CPU (2 ranks, gloo),
compared tensor for tensor with the `zero_to_fp32.py` saved beside them, run in another process.

ckptx itself never imports deepspeed (one test runs the CLI where importing it raises). The malformed
folders are copies of the real ones with one thing broken.
"""

from __future__ import annotations

import importlib.util
import os
import pickletools
import shutil
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckptx.errors import ForeignGlobal, SourceError
from ckptx.io.read.open import open_source
from ckptx.io.read.zero_reader import ZeroSource
from tests.conftest import subprocess_env
from tests.helpers.deepspeed_train import launch

HELPERS = Path(__file__).resolve().parents[1] / "helpers"
FOLDERS = ("zero2-fp32", "zero3-fp32", "zero2-bf16", "zero3-bf16")
TAG = "global_step2"
IDENTITY = "ckptx: 1\nname: identity\nsteps: []\n"

if importlib.util.find_spec("deepspeed") is None:  # fail loudly: these tests never skip silently
    if os.environ.get("CKPTX_ALLOW_MISSING_REAL") != "1":
        pytest.fail("deepspeed is not installed (requirements/test.txt pins it; run `make venv`)", pytrace=False)
    pytest.skip("deepspeed is not installed (CKPTX_ALLOW_MISSING_REAL=1)", allow_module_level=True)


@dataclass
class ZeroRun:
    """The checkpoints one DeepSpeed run wrote, and zero_to_fp32.py's output for each."""

    root: Path
    _references: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def folder(self, name: str) -> Path:
        return self.root / "ckpt" / name

    def reference(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._references:
            path = self.root / "ref" / name / "pytorch_model.bin"
            self._references[name] = torch.load(path, map_location="cpu", weights_only=True)
        return self._references[name]

    def copy(self, name: str, where: Path) -> Path:
        """A copy of checkpoint `name` to break."""
        return Path(shutil.copytree(self.folder(name), where / name))


@pytest.fixture(scope="session")
def zero_run(tmp_path_factory: pytest.TempPathFactory) -> ZeroRun:
    """ZeRO-2 and ZeRO-3 checkpoints in fp32 and bf16 from one 2-rank DeepSpeed run, and their references.

    Set CKPTX_ZERO_REUSE=DIR to write them to DIR once and reuse them in later runs (when iterating locally).
    """
    reuse = os.environ.get("CKPTX_ZERO_REUSE")
    if reuse and (Path(reuse) / "ref" / FOLDERS[-1] / "pytorch_model.bin").is_file():
        return ZeroRun(Path(reuse))
    root = Path(reuse) if reuse else tmp_path_factory.mktemp("zero")
    launch(root / "ckpt", stages=(2, 3), dtypes=("fp32", "bf16"), width=256)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [
            sys.executable,
            str(HELPERS / "zero_reference.py"),
            str(root / "ref"),
            *(str(root / "ckpt" / n) for n in FOLDERS),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return ZeroRun(root)


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape, key
        assert torch.equal(got[key], tensor), key


def rchar() -> int:
    """Bytes this process has read so far (read/pread calls), from /proc/self/io."""
    with open("/proc/self/io", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def bytes_read_by(action: Callable[[], object]) -> int:
    overhead = -(rchar() - rchar())
    before = rchar()
    action()
    return rchar() - before - overhead


def rewrite_zip(path: Path, change: Callable[[str, bytes], bytes]) -> None:
    """Rewrite the torch zip `path` with each record's bytes passed through `change(name, data)`."""
    with zipfile.ZipFile(path) as src:
        items = [(info.filename, src.read(info)) for info in src.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for name, data in items:
            dst.writestr(name, change(name, data))


def patch_int_after(data: bytes, section: str, name: str, new: int) -> bytes:
    """The pickle with the first integer after string `name` (itself after string `section`) set to `new`."""
    memo: dict[int, object] = {}
    top: object = None
    state = 0
    for op, arg, pos in pickletools.genops(data):
        if op.name in ("BINPUT", "LONG_BINPUT"):
            memo[arg] = top
            continue
        top = (
            arg
            if op.name in ("BINUNICODE", "SHORT_BINUNICODE")
            else memo.get(arg)
            if op.name in ("BINGET", "LONG_BINGET")
            else None
        )
        if state == 0 and top == section or state == 1 and top == name:
            state += 1
        elif state == 2 and op.name in ("BININT1", "BININT2", "BININT"):
            width = {"BININT1": "<B", "BININT2": "<H", "BININT": "<i"}[op.name]
            return data[: pos + 1] + struct.pack(width, new) + data[pos + 1 + struct.calcsize(width) :]
    raise AssertionError(f"no integer after {section}/{name}")


def one_line_error(result: object) -> str:
    err = result.err.strip()  # type: ignore[attr-defined]
    assert result.code == 2 and "\n" not in err, (result.code, err)  # type: ignore[attr-defined]
    return err


@pytest.mark.parametrize("name", FOLDERS)
def test_state_dict_equals_zero_to_fp32(zero_run: ZeroRun, name: str) -> None:
    with open_source(zero_run.folder(name)) as source:
        got = {key: source.load(key) for key in source.tensors}
    assert_same_state(got, zero_run.reference(name))


def test_tag_folder_opens_as_its_checkpoint(zero_run: ZeroRun) -> None:
    with open_source(zero_run.folder("zero3-fp32")) as top, open_source(zero_run.folder("zero3-fp32") / TAG) as tag:
        assert tag.tensors == top.tensors
        assert tag.layout.tag == TAG and tag.layout.tag_dir == top.layout.tag_dir


def test_planning_reads_no_partition_bytes(zero_run: ZeroRun) -> None:
    folder = zero_run.folder("zero3-fp32")
    open_source(folder).close()  # imports done
    opened: list[ZeroSource] = []
    read = bytes_read_by(lambda: opened.append(open_source(folder)))
    with opened[0] as source:
        partition_bytes = source.layout.partition_numel * 4
        assert len(source.tensors) == 18
    assert read < partition_bytes / 10, (read, partition_bytes)


@pytest.mark.parametrize("name", ["zero2-fp32", "zero3-fp32"])
def test_load_reads_only_that_parameters_bytes(zero_run: ZeroRun, name: str) -> None:
    with open_source(zero_run.folder(name)) as source:
        source.load("scale")  # file handles opened
        tensors: list[torch.Tensor] = []
        read = bytes_read_by(lambda: tensors.append(source.load("blocks.0.2.weight")))
    assert 0 <= read - tensors[0].numel() * 4 < 16, read


def test_raw_span_is_the_parameters_bytes_in_one_rank_file(zero_run: ZeroRun) -> None:
    want = zero_run.reference("zero2-fp32")["embed.weight"]
    with open_source(zero_run.folder("zero2-fp32")) as source:
        span = source.raw_span("embed.weight")
    assert span is not None and "_optim_states.pt" in span.file
    with open(span.file, "rb") as f:
        f.seek(span.offset)
        assert f.read(span.nbytes) == want.contiguous().view(torch.uint8).numpy().tobytes()


def test_parameter_split_across_ranks_has_no_raw_span(zero_run: ZeroRun) -> None:
    with open_source(zero_run.folder("zero2-fp32")) as zero2, open_source(zero_run.folder("zero3-fp32")) as zero3:
        assert zero2.raw_span("blocks.0.2.weight") is None
        assert zero3.raw_span("blocks.0.2.weight") is None


@pytest.mark.parametrize("name", ["zero2-fp32", "zero3-fp32"])
def test_parameter_split_across_ranks_is_one_run_in_each_rank_file(zero_run: ZeroRun, name: str) -> None:
    want = zero_run.reference(name)["blocks.0.2.weight"].contiguous().view(torch.uint8).numpy().tobytes()
    with open_source(zero_run.folder(name)) as source:
        spans = source.raw_spans("blocks.0.2.weight")
    assert spans is not None and len({span.file for span in spans}) == 2
    got = b""
    for span in spans:
        with open(span.file, "rb") as f:
            f.seek(span.offset)
            got += f.read(span.nbytes)
    assert got == want


@pytest.mark.parametrize("name", ["zero2-fp32", "zero3-fp32"])
def test_convert_to_pth_copies_every_parameter_and_equals_zero_to_fp32(
    zero_run: ZeroRun, tmp_path: Path, name: str, write_rules: Callable
) -> None:
    out = tmp_path / "out.pth"
    code = (
        f"import sys, ckptx; ckptx.convert({str(zero_run.folder(name))!r}, {str(out)!r}, "
        f"{str(write_rules(IDENTITY))!r}); print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], env=blocked_env(tmp_path), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "False"  # every tensor copied as bytes: nothing computed
    assert zipfile.ZipFile(out).testzip() is None
    got, want = torch.load(out, weights_only=True, mmap=True), zero_run.reference(name)
    assert set(got) == set(want)
    assert_same_state({k: got[k] for k in want}, want)


def test_bf16_buffers_load_as_float32_without_raw_span(zero_run: ZeroRun) -> None:
    with open_source(zero_run.folder("zero2-bf16")) as source:
        assert source.tensors["bn.running_mean"].dtype == "float32"
        assert source.raw_span("bn.running_mean") is None
        assert source.load("bn.running_mean").dtype == torch.float32


def test_inspect_shows_stage_world_size_tag_dtype_and_counts(zero_run: ZeroRun, run_cli: Callable) -> None:
    result = run_cli("inspect", zero_run.folder("zero3-bf16"))
    assert result.code == 0, result.err
    assert "DeepSpeed ZeRO-3 checkpoint, tag global_step2, world size 2" in result.out
    assert "fp32 partitions: float32, 2 ranks" in result.out
    assert "12 trainable + 2 frozen parameters, 3 buffers, 1 shared name(s)" in result.out


BLOCKER = '''
import os, sys

class BlockDeepspeed:
    """Importing deepspeed raises (not ImportError, which code could swallow) and leaves a marker."""

    def find_spec(self, name, path=None, target=None):
        if name == "deepspeed" or name.startswith("deepspeed."):
            with open(os.environ["DEEPSPEED_MARKER"], "a") as f:
                f.write(name + "\\n")
            raise RuntimeError("deepspeed was imported: " + name)
        return None

sys.meta_path.insert(0, BlockDeepspeed())
'''


def blocked_env(tmp_path: Path) -> dict[str, str]:
    """A child environment where any import of deepspeed raises and writes `tmp_path/imported`."""
    (tmp_path / "blocker").mkdir()
    (tmp_path / "blocker" / "sitecustomize.py").write_text(BLOCKER, encoding="utf-8")
    env = subprocess_env()
    return {
        **env,
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "blocker"), env["PYTHONPATH"]]),
        "DEEPSPEED_MARKER": str(tmp_path / "imported"),
    }


def test_blocker_makes_deepspeed_unimportable(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import deepspeed"], env=blocked_env(tmp_path), capture_output=True, text=True
    )
    assert done.returncode != 0 and "deepspeed was imported" in done.stderr
    assert (tmp_path / "imported").is_file()


@pytest.mark.parametrize("name", ["zero2-fp32", "zero3-bf16"])
def test_cli_convert_without_deepspeed_equals_zero_to_fp32(
    zero_run: ZeroRun, tmp_path: Path, name: str, write_rules: Callable
) -> None:
    out = tmp_path / "out.safetensors"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ckptx",
            "convert",
            str(zero_run.folder(name)),
            "-r",
            str(write_rules(IDENTITY)),
            "-o",
            str(out),
        ],
        env=blocked_env(tmp_path),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "imported").exists()
    got, want = load_file(out), zero_run.reference(name)
    assert_same_state({k: got[k] for k in want}, want)
    assert set(got) == set(want)


def test_refused_global_in_optim_states_runs_nothing(
    zero_run: ZeroRun, tmp_path: Path, run_cli: Callable, write_rules: Callable
) -> None:
    folder = zero_run.copy("zero3-fp32", tmp_path)
    victim = folder / TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    marker = tmp_path / "payload-ran"

    def text(s: str) -> bytes:
        return b"X" + struct.pack("<I", len(s)) + s.encode()

    payload = text("payload") + b"cposix\nsystem\n(" + text(f"touch {marker}") + b"tR"

    def inject(name: str, data: bytes) -> bytes:
        if not name.endswith("/data.pkl"):
            return data
        assert data.startswith(b"\x80\x02}q\x00(")  # PROTO 2, {}, memo 0, MARK: the top dict's items follow
        return data[:6] + payload + data[6:]

    rewrite_zip(victim, inject)
    result = run_cli("convert", folder, "-r", write_rules(IDENTITY), "-o", tmp_path / "out.safetensors")
    err = one_line_error(result)
    assert str(victim) in err and "'posix.system'" in err
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()
    with pytest.raises(ForeignGlobal) as caught:
        open_source(folder)
    assert caught.value.global_name == "posix.system"


def test_truncated_rank_file_is_a_one_line_error(zero_run: ZeroRun, tmp_path: Path, run_cli: Callable) -> None:
    folder = zero_run.copy("zero2-fp32", tmp_path)
    victim = folder / TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    os.truncate(victim, victim.stat().st_size // 2)
    err = one_line_error(run_cli("inspect", folder))
    assert str(victim) in err and "truncated" in err


def test_truncated_partition_record_is_a_one_line_error(zero_run: ZeroRun, tmp_path: Path, run_cli: Callable) -> None:
    folder = zero_run.copy("zero2-fp32", tmp_path)
    victim = folder / TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    rewrite_zip(victim, lambda name, data: data[: len(data) // 2] if "/data/" in name else data)
    err = one_line_error(run_cli("inspect", folder))
    assert str(victim) in err and "single_partition_of_fp32_groups[0]" in err and "truncated" in err


def test_latest_naming_a_missing_tag_is_a_one_line_error(zero_run: ZeroRun, tmp_path: Path, run_cli: Callable) -> None:
    folder = zero_run.copy("zero3-fp32", tmp_path)
    (folder / "latest").write_text("global_step99", encoding="utf-8")
    err = one_line_error(run_cli("inspect", folder))
    assert str(folder / "latest") in err and "global_step99" in err


def test_missing_rank_file_is_a_one_line_error(zero_run: ZeroRun, tmp_path: Path, run_cli: Callable) -> None:
    folder = zero_run.copy("zero3-fp32", tmp_path)
    (folder / TAG / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    err = one_line_error(run_cli("inspect", folder))
    assert str(folder / TAG) in err and "rank 1" in err and "model_states" in err


def test_world_size_mismatch_is_a_one_line_error(zero_run: ZeroRun, tmp_path: Path, run_cli: Callable) -> None:
    folder = zero_run.copy("zero2-fp32", tmp_path)
    shutil.copy(
        folder / TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        folder / TAG / "zero_pp_rank_2_mp_rank_00_optim_states.pt",
    )
    err = one_line_error(run_cli("inspect", folder))
    assert str(folder / TAG) in err and "3 *_optim_states.pt files for world size 2" in err


@pytest.mark.parametrize(
    ("name", "model_states", "numel"),
    [
        ("zero3-fp32", "zero_pp_rank_0_mp_rank_00_model_states.pt", 261),
        ("zero3-fp32", "zero_pp_rank_0_mp_rank_00_model_states.pt", 255),
        # 1545 vector elements in group 1, 1547 after: both 1548 when aligned to 4, so only the end is past
        ("zero2-fp32", "mp_rank_00_model_states.pt", 261),
        ("zero2-fp32", "mp_rank_00_model_states.pt", 200),
    ],
    ids=["zero3-more-than-held", "zero3-less", "zero2-past-the-end-within-alignment", "zero2-less"],
)
def test_sizes_that_do_not_add_up_are_a_one_line_error(
    zero_run: ZeroRun, tmp_path: Path, run_cli: Callable, name: str, model_states: str, numel: int
) -> None:
    folder = zero_run.copy(name, tmp_path)
    victim = folder / TAG / model_states  # blocks.0.0.bias has 259 elements
    rewrite_zip(
        victim,
        lambda name, data: (
            patch_int_after(data, "param_shapes", "blocks.0.0.bias", numel) if name.endswith("/data.pkl") else data
        ),
    )
    err = one_line_error(run_cli("inspect", folder))
    assert str(victim) in err and "do not add up" in err


def test_plain_folder_is_still_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="is a folder"):
        open_source(tmp_path)


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_a_zero_source_on_two_workers_writes_one_processs_bytes(zero_run: ZeroRun, tmp_path: Path, fmt: str) -> None:
    """Worker processes reopen the ZeRO folder themselves and copy or gather each parameter's rank-file spans."""
    import ckptx

    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}.{fmt}"
        ckptx.convert(zero_run.folder("zero3-fp32"), out, ckptx.Recipe(name="as is"), workers=workers)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert_same_state(
        load_file(str(tmp_path / "w2.safetensors"))
        if fmt == "safetensors"
        else torch.load(tmp_path / "w2.pth", weights_only=True),
        zero_run.reference("zero3-fp32"),
    )
