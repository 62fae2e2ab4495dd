"""Read pickle-based torch checkpoints (zip and legacy) safely: weights_only by default, mmap when possible."""

from __future__ import annotations

import io
import pickle
import re
import struct
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ckptx._lazy import lazy_module
from ckptx.errors import SourceError, UnsafeGlobalError
from ckptx.io.read import unpickle
from ckptx.io.read.state_dict import MappingSource, extract, top_level_of
from ckptx.io.read.torch_zip import TorchZipSource, check_archive, open_zip_without_torch, references_or_none
from ckptx.trust.pickle_globals import needed_global, resolve_allow_global

if TYPE_CHECKING:  # pragma: no cover
    import torch
else:
    torch = lazy_module("torch")


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_UNSUPPORTED = re.compile(r"(?:Unsupported (?:global|class|operand)|Can only build)[^\n]*")


def load_pickle_object(
    path: Path, *, allow_globals: Sequence[str] = (), unsafe_pickle: bool = False, display: str | None = None
) -> Any:
    """`torch.load` the whole object on the CPU: mmap for zip files; refuse unsafe globals unless allowed."""
    shown = display or str(path)
    is_zip = starts_as_zip(path)
    if is_zip:
        check_archive(path, shown)
    bound, stream = _nesting(path, is_zip)
    with allowed_globals(allow_globals, unsafe_pickle):
        try:
            return unpickle.load(
                lambda: torch.load(path, map_location="cpu", weights_only=not unsafe_pickle, mmap=is_zip),
                bound,
                shown,
                stream,
                pickles=1 if is_zip else 4,
            )
        except pickle.UnpicklingError as exc:
            raise unpickling_error(path, shown, exc, is_zip) from None
        except RecursionError:
            raise SourceError(
                f"{shown}: not a readable torch checkpoint: its pickle nests too deeply (a corrupt or hostile file)"
            ) from None
        except (
            EOFError,
            RuntimeError,
            ValueError,
            zipfile.BadZipFile,
            KeyError,
            OSError,
            TypeError,
            AttributeError,
            ImportError,
            IndexError,
            UnicodeDecodeError,
            AssertionError,
            struct.error,
            OverflowError,
            NotImplementedError,
            MemoryError,
        ) as exc:
            # torch.load's own checks are asserts (a legacy file's storage list naming an unknown storage) and
            # struct/zip errors on damaged bytes: every one of them means the file is corrupt.
            raise SourceError(
                f"{shown}: not a readable torch checkpoint: {_first_line(exc, is_zip)}; the file is "
                f"corrupt or truncated: download or save it again"
            ) from None


def _nesting(path: Path, is_zip: bool) -> tuple[int, Callable[[], BinaryIO]]:
    """`unpickle.nesting_bound` of what torch.load will unpickle, and its pickles again (to measure their depth):
    a zip file's `data.pkl`; a legacy file's leading pickles (magic number, protocol, system info, the object),
    bounded by the file's size (its storage bytes follow them)."""
    if is_zip:
        try:
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
                pickled = archive.read(name) if name is not None else b""
        except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError, struct.error, NotImplementedError):
            pickled = b""  # torch.load reports what is wrong with the archive
        return unpickle.nesting_bound(pickled), lambda: io.BytesIO(pickled)
    return path.stat().st_size, lambda: open(path, "rb")


def load_object_tree(path: str | Path, *, allow_globals: Sequence[str] = (), unsafe_pickle: bool = False) -> Any:
    """The whole object of a torch checkpoint with tensors as metadata where possible: a plain torch zip file is
    read from its pickle references alone (no tensor byte, no torch); anything else goes through the safe
    `torch.load` (memory-mapped), with the same `--allow-global` rules as a conversion."""
    references = references_or_none(str(path))
    if references is not None:
        obj, unknown, _records, little = references
        if not unknown and little:
            return obj
    return load_pickle_object(Path(path), allow_globals=allow_globals, unsafe_pickle=unsafe_pickle, display=str(path))


def read_torch(
    path: Path,
    extract_paths: Sequence[str],
    *,
    allow_globals: Sequence[str] = (),
    unsafe_pickle: bool = False,
    display: str | None = None,
    where: str = "",
) -> MappingSource:
    """Open a `.pth`/`.pt`/`.bin` checkpoint and extract its state dict as a lazy source.

    A torch zip file that holds only containers, plain values and row-major tensors is read without
    torch (no torch start-up; every tensor a span of the file); anything else goes through `torch.load`.
    """
    shown = display or str(path)
    is_zip = starts_as_zip(path)
    if is_zip:
        check_archive(path, shown)
        spanned = open_zip_without_torch(path, extract_paths, display=shown, where=where)
        if spanned is not None:
            return spanned
    obj = load_pickle_object(path, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle, display=shown)
    state, found_at = extract(obj, extract_paths, file=shown, where=where)
    top = top_level_of(obj)
    if is_zip:
        return TorchZipSource(str(path), shown, state, extracted_from=found_at, top_level=top, keep_alive=obj)
    return MappingSource(shown, "torch-legacy", state, extracted_from=found_at, top_level=top, keep_alive=obj)


def starts_as_zip(path: Path) -> bool:
    """The file begins with a zip local header, which is how torch.load tells a zip checkpoint from a legacy one
    (Python's `zipfile.is_zipfile` looks at the end instead, and calls a pickle with a zip appended a zip)."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


@contextmanager
def allowed_globals(names: Sequence[str], unsafe_pickle: bool) -> Iterator[None]:
    """torch's safe loader, with the `--allow-global` names (checked by the trust rule) allowed inside the block."""
    with ExitStack() as stack:
        if names and not unsafe_pickle:
            allowed = [obj for name in names for obj in resolve_allow_global(name)]
            stack.enter_context(torch.serialization.safe_globals(allowed))
        yield


def unpickling_error(path: Path | None, shown: str, exc: Exception, is_zip: bool) -> SourceError:
    """The one-line error for a pickle torch's safe loader refused: the globals it needs (and which of them
    `--allow-global` may allow), or why it is not a readable pickle. `path` is None for bytes read from a file."""
    text = str(exc)
    needed = _refused_globals(path, text, is_zip)
    if needed:
        return UnsafeGlobalError(shown, [needed_global(name) for name in needed])
    if "Weights only load failed" in text:
        detail = _UNSUPPORTED.search(text)
        reason = detail.group(0) if detail else "it uses pickle features the safe loader refuses"
        return SourceError(
            f"{shown}: the safe loader refused the file ({reason}); pass --unsafe-pickle "
            f"only if you trust where it came from (it runs any code the file contains)"
        )
    return SourceError(
        f"{shown}: not a readable torch checkpoint: corrupt pickle ({text.splitlines()[0] if text else 'truncated'})"
    )


def _refused_globals(path: Path | None, text: str, is_zip: bool) -> list[str]:
    """The `module.Name` globals the safe loader refused.

    For a zip file torch lists them (every GLOBAL of `data.pkl` it does not allow, in the form
    `--allow-global` takes); a legacy file has only the one torch's message names, where torch writes a
    builtin bare (`eval` for `builtins.eval`).
    """
    if is_zip and path is not None:
        try:
            listed = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception:  # noqa: BLE001 - only a better message is lost; torch's own says what it refused
            listed = []
        if listed:
            return listed
    match = _GLOBAL.search(text)
    if match is None:
        return []
    name = match.group(1)
    return [name if "." in name else f"builtins.{name}"]


def _first_line(exc: BaseException, is_zip: bool) -> str:
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, EOFError) or "Ran out of input" in text:
        return "the file is truncated (pickle data ends early)"
    if "central directory" in text or "zip archive" in text:
        return f"the zip archive is truncated or corrupt ({text.split(': ', 1)[-1]})"
    if "invalid load key" in text:
        return f"not a pickle or zip file ({text})"
    return text
