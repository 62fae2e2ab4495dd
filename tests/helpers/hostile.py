"""Running ckptx on hostile inputs and checking the six properties every run must have.

A hostile case is a real checkpoint (written by `dcp.save`, DeepSpeed, safetensors or torch) with one thing
changed. `run_ckptx` runs the command line on it in its own process, as a user would, with a time limit, and
records its exit code, output and peak memory; `Guard` then checks, for that run:

- no payload ran: the marker file a payload pickle would create does not exist;
- no outside read: the text of a secret file (which the case links to from inside the checkpoint) is not in the
  output;
- no internal error: the exit code is 0, 1 or 2, and no traceback was printed;
- no source modified: every file of the inputs has the bytes (and every link the target) it had before;
- no hang: the run ended within its time limit (and within its memory bound);
- no wrong output: what an exit-0 conversion wrote is compared by the caller with the reader of record
  (torch's `dcp_to_torch_save`, DeepSpeed's `zero_to_fp32.py`, safetensors).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SECRET = "ckptx-hostile-secret-7c1e: this line must never be printed"
GIB = 1 << 30


@dataclass(frozen=True)
class Outcome:
    """One run of the command line: exit code, stdout, stderr, wall seconds and peak resident memory."""

    code: int | None
    out: str
    err: str
    seconds: float
    max_rss: int  # bytes, peak resident memory (sampled every 20 ms)
    timed_out: bool = False
    cpu: float = 0.0  # user + system seconds: what a loaded machine does not inflate

    def __str__(self) -> str:
        head = f"exit {self.code} after {self.seconds:.1f} s ({self.cpu:.1f} s CPU), {self.max_rss >> 20} MiB"
        return f"{head}\nstdout: {self.out[-2000:]}\nstderr: {self.err[-2000:]}"


def run_ckptx(args: Sequence[object], *, cwd: Path, env: dict[str, str], timeout: float = 60) -> Outcome:
    """`python -m ckptx ARGS` in its own process; killed after `timeout` seconds (a hang)."""
    out_path, err_path = cwd / ".hostile-stdout", cwd / ".hostile-stderr"
    started = time.monotonic()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ckptx", *map(str, args)], cwd=cwd, env=env, stdout=out, stderr=err
        )
        status, usage, timed_out, peak = None, None, False, 0
        while status is None:
            peak = max(peak, _peak_rss(proc.pid))
            pid, code, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                status, usage = code, rusage
                break
            if time.monotonic() - started > timeout:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                timed_out = True
                break
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
    outcome = Outcome(
        proc.returncode,
        out_path.read_text(errors="replace"),
        err_path.read_text(errors="replace"),
        time.monotonic() - started,
        peak,
        timed_out,
        usage.ru_utime + usage.ru_stime if usage is not None else 0.0,
    )
    out_path.unlink()
    err_path.unlink()
    return outcome


def _peak_rss(pid: int) -> int:
    """The peak resident memory of the process `pid` since it started its program (VmHWM: the rusage of a child
    forked from a large test process counts the parent's pages too), in bytes; 0 once it has ended."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            return next((int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


def fingerprint_tree(paths: Iterable[Path]) -> dict[str, str]:
    """What every input is: a regular file's SHA-256, a link's target, a special file's kind; folders walked
    (links to folders not followed: what they point to is fingerprinted where it lives)."""
    found: dict[str, str] = {}
    for top in paths:
        items = [top] if not top.is_dir() or top.is_symlink() else [top, *sorted(top.rglob("*"))]
        for path in items:
            if path.is_symlink():
                found[str(path)] = "link -> " + os.readlink(path)
            elif path.is_file():
                found[str(path)] = _sha256(path)
            elif path.exists() and not path.is_dir():
                found[str(path)] = f"special {os.stat(path).st_mode:o}"
    return found


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    if size > GIB:  # a sparse bomb: its size and first bytes say whether it changed
        digest.update(str(size).encode())
        with open(path, "rb") as f:
            digest.update(f.read(1 << 20))
        return digest.hexdigest()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Guard:
    """The properties of one hostile run: `before` is taken when the guard is made, `check` after the run."""

    inputs: Sequence[Path]
    marker: Path
    max_seconds: float = 30
    max_rss: int = GIB
    before: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.before = fingerprint_tree(self.inputs)

    def check(self, outcome: Outcome, codes: Sequence[int] = (0, 1, 2)) -> None:
        """Every property; `codes` narrows the exit codes this case may end with."""
        assert not outcome.timed_out and outcome.seconds < self.max_seconds, f"hang: {outcome}"
        assert outcome.max_rss < self.max_rss, f"memory blow-up: {outcome}"
        assert outcome.code in codes, f"exit code not in {list(codes)}: {outcome}"
        assert "Traceback" not in outcome.err, f"internal error: {outcome}"
        assert not self.marker.exists(), f"a payload ran: {outcome}"
        for line in SECRET.split(":"):
            assert line.strip() not in outcome.out + outcome.err, f"outside read: {outcome}"
        after = fingerprint_tree(self.inputs)
        changed = sorted(k for k in {*after, *self.before} if after.get(k) != self.before.get(k))
        assert not changed, f"a source was modified ({', '.join(changed[:5])}): {outcome}"
        if outcome.code == 2:  # one line, or a list of problems (a jobs file) each on its line
            first, *rest = outcome.err.strip().split("\n")
            listed = re.fullmatch(r"ckptx: error: (\d+) problems", first)
            assert first.startswith("ckptx: error: "), f"not an error line: {outcome}"
            assert len(rest) == (int(listed.group(1)) if listed else 0), f"not one line per problem: {outcome}"


def write_secret(folder: Path) -> Path:
    """A file outside every checkpoint, holding SECRET (the way /etc/passwd holds lines of `name:x:...`)."""
    path = folder / "secret.txt"
    path.write_text(f"{SECRET}\nroot:x:0:0:root:/root:/bin/bash\n")
    return path


# ---- pickles -----------------------------------------------------------------------------------------------


def payload_pickle(marker: Path) -> bytes:
    """A protocol-2 pickle whose loading runs `touch marker` (GLOBAL os.system, REDUCE): loading it is the
    payload; reading it as data never runs it."""
    command = f"touch {marker}".encode()
    return b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(command)) + command + b"\x85R."


def deep_list(depth: int) -> bytes:
    """Pickle opcodes that build a list nested `depth` deep ([[[...]]]), with no memo entries."""
    return b"]" * depth + b"a" * (depth - 1)


def deep_tuple_key(depth: int) -> bytes:
    """Pickle opcodes that build `{((...),): 1}`: a dict whose key is a tuple nested `depth` deep. Hashing that key
    (which unpickling the dict does) recurses in C once per level: deep enough, and the stack overflows."""
    return b"})" + b"\x85" * depth + b"K\x01s"


def splice_string(data: bytes, placeholder: str, opcodes: bytes) -> bytes:
    """A protocol-2 pickle with the string `placeholder` (BINUNICODE) replaced by `opcodes` (no frames in protocol
    2, so lengths may change)."""
    encoded = placeholder.encode()
    needle = b"X" + struct.pack("<I", len(encoded)) + encoded
    assert data.count(needle) == 1, placeholder
    return data.replace(needle, opcodes)


def int_opcodes(value: int) -> bytes:
    """One integer as pickle opcodes (BININT for int32, LONG1/LONG4 beyond)."""
    return pickle.dumps(value, protocol=2)[2:-1]


_KEY_OPS = frozenset(
    {"SETITEM", "SETITEMS", "BINUNICODE", "SHORT_BINUNICODE", "BINGET", "LONG_BINGET", "APPEND", "APPENDS", "STOP"}
)


def splice_after(data: bytes, name: str, opcodes: bytes, *, section: str | None = None) -> bytes:
    """A protocol-2 pickle (as torch.save writes) with the value of the dict entry `name` (the first one after the
    string `section`, when given) replaced by `opcodes`. The value is every opcode from the one after the key to
    where one object stands on the stack and the next opcode is the next key or the dict's end."""
    import pickletools

    ops = list(pickletools.genops(data))
    memo: dict[int, object] = {}
    wanted = [section, name] if section is not None else [name]
    for i, (op, arg, _pos) in enumerate(ops):
        if op.name in ("BINPUT", "LONG_BINPUT", "MEMOIZE"):
            memo[arg] = _string(ops[i - 1], memo)
            continue
        if _string((op, arg, _pos), memo) == wanted[0]:
            wanted.pop(0)
            if not wanted:
                start = i + 1 + (ops[i + 1][0].name in ("BINPUT", "LONG_BINPUT"))
                return data[: ops[start][2]] + opcodes + data[_value_end(ops, start) :]
    raise AssertionError(f"no entry {name} after {section}")


def _string(item: tuple[Any, Any, Any], memo: dict[int, object]) -> object:
    op, arg, _ = item
    if op.name in ("BINUNICODE", "SHORT_BINUNICODE"):
        return arg
    return memo.get(arg) if op.name in ("BINGET", "LONG_BINGET") else None


def pickletools_mark() -> Any:
    """pickletools' marker for MARK on the stack."""
    import pickletools

    return pickletools.markobject


def _value_end(ops: list[tuple[Any, Any, int]], start: int) -> int:
    """The byte offset where the value starting at op `start` ends (a BINPUT of it included)."""
    depth, marks = 0, []
    for i in range(start, len(ops)):
        op = ops[i][0]
        if op.name == "MARK":
            marks.append(depth)
        elif pickletools_mark() in op.stack_before:
            below = op.stack_before.index(pickletools_mark())  # the dict or list SETITEMS/APPENDS add to
            depth = marks.pop() - below + len(op.stack_after)
        else:
            depth += len(op.stack_after) - len(op.stack_before)
        following = i + 1 + (ops[i + 1][0].name in ("BINPUT", "LONG_BINPUT"))
        if depth == 1 and not marks and ops[following][0].name in _KEY_OPS:
            return ops[following][2]
    raise AssertionError("the value does not end")


# ---- zip archives (torch.save files) ---------------------------------------------------------------------------


def rewrite_zip(path: Path, change: Callable[[str, bytes], bytes] = lambda n, d: d, *, bomb: int = 0) -> None:
    """Rewrite the torch zip `path` with each record passed through `change(name, data)`. With `bomb`, `data.pkl`
    is deflated (torch.save never compresses) with `bomb` zero bytes after its STOP: the unpickler never reads
    them, but inflating the record costs them (written in blocks: the bomb is never held in memory here)."""
    with zipfile.ZipFile(path) as src:
        items = [(info.filename, src.read(info)) for info in src.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for name, data in items:
            if bomb and is_data_pkl(name):
                info = zipfile.ZipInfo(name)
                info.compress_type = zipfile.ZIP_DEFLATED
                with dst.open(info, "w", force_zip64=True) as record:
                    record.write(change(name, data))
                    for _ in range(bomb >> 20):
                        record.write(bytes(1 << 20))
            else:
                dst.writestr(name, change(name, data))


def is_data_pkl(name: str) -> bool:
    """The record of a torch zip that holds the pickle."""
    return name.endswith("/data.pkl")


def read_pickle_record(path: Path) -> bytes:
    """The `data.pkl` of a torch zip file."""
    with zipfile.ZipFile(path) as archive:
        return archive.read(next(n for n in archive.namelist() if is_data_pkl(n)))


def tensor_equal(a: Any, b: Any) -> bool:
    """Same dtype, shape and values (NaNs equal)."""
    import torch

    return bool(a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b))


def tensor_opcodes(storage_key: str, storage_numel: int, size: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
    """`_rebuild_tensor_v2(FloatStorage <storage_key>, 0, size, stride, False, OrderedDict())` as torch.save pickles
    a tensor, opcode by opcode (so any size and stride can be put in)."""

    def text(value: str) -> bytes:
        return b"X" + struct.pack("<I", len(value)) + value.encode()

    def numbers(values: tuple[int, ...]) -> bytes:
        return b"(" + b"".join(int_opcodes(v) for v in values) + b"t"

    storage = b"(" + text("storage") + b"ctorch\nFloatStorage\n" + text(storage_key) + text("cpu")
    storage += int_opcodes(storage_numel) + b"tQ"
    args = b"(" + storage + int_opcodes(0) + numbers(size) + numbers(stride) + b"\x89ccollections\nOrderedDict\n)Rt"
    return b"ctorch._utils\n_rebuild_tensor_v2\n" + args + b"R"


def add_record(path: Path, key: str, data: bytes) -> None:
    """Add the storage record `<prefix>/data/<key>` to the torch zip `path`."""
    with zipfile.ZipFile(path) as src:
        prefix = next(n for n in src.namelist() if is_data_pkl(n))[: -len("data.pkl")]
    with zipfile.ZipFile(path, "a", zipfile.ZIP_STORED) as dst:
        dst.writestr(f"{prefix}data/{key}", data)


@dataclass
class Case:
    """A case's folder: its copy of the checkpoint, the secret outside it, and the payload's marker."""

    root: Path
    secret: Path
    marker: Path
    env: dict[str, str]

    def run(self, *args: object, timeout: float = 60) -> Outcome:
        return run_ckptx(args, cwd=self.root, env=self.env, timeout=timeout)

    def guard(self, *inputs: Path, max_rss: int = GIB) -> Guard:
        return Guard([*inputs, self.secret], self.marker, max_rss=max_rss)


def new_case(tmp_path: Path) -> Case:
    """A case under `tmp_path`: its own folder, and a secret and a payload marker outside it."""
    from tests.conftest import subprocess_env

    root = tmp_path / "case"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    return Case(root, write_secret(outside), outside / "payload-ran", subprocess_env())


def copy_seed(seed: Path, case: Case, name: str | None = None) -> Path:
    """The case's own copy of a real checkpoint folder (links kept as links)."""
    return Path(shutil.copytree(seed, case.root / (name or seed.name), symlinks=True))


def jobs_file(case: Case, text: str) -> Path:
    """A jobs file in the case's folder whose jobs (YAML list items) are `text`."""
    path = case.root / "jobs.yaml"
    path.write_text("ckptx: 1\ndefaults: {rules: [common/extract-state-dict]}\njobs:\n" + text)
    return path
