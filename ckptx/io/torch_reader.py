"""Read pickle-based torch checkpoints (zip and legacy) safely: weights_only by default, mmap when possible."""

from __future__ import annotations

import importlib
import pickle
import re
import struct
import zipfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Sequence

from ckptx._lazy import lazy_module
from ckptx.errors import SourceError, UnsafeGlobalError
from ckptx.io.source import MappingSource, extract, top_level_of
from ckptx.io.torch_zip import TorchZipSource, check_archive, open_zip_without_torch

torch = lazy_module("torch")


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_UNSUPPORTED = re.compile(r"Unsupported (?:global|class|operand)[^\n]*")


def load_pickle_object(path: Path, *, allow_globals: Sequence[str] = (), unsafe_pickle: bool = False,
                       display: str | None = None) -> Any:
    """`torch.load` the whole object on the CPU: mmap for zip files; refuse unsafe globals unless allowed."""
    shown = display or str(path)
    is_zip = starts_as_zip(path)
    if is_zip:
        check_archive(path, shown)
    with ExitStack() as stack:
        if allow_globals and not unsafe_pickle:
            stack.enter_context(torch.serialization.safe_globals([_import_global(g) for g in allow_globals]))
        try:
            return torch.load(path, map_location="cpu", weights_only=not unsafe_pickle, mmap=is_zip)
        except pickle.UnpicklingError as exc:
            raise _unpickling_error(shown, exc) from None
        except RecursionError:
            raise SourceError(f"{shown}: not a readable torch checkpoint: its pickle nests too deeply (a corrupt "
                              f"or hostile file)") from None
        except (EOFError, RuntimeError, ValueError, zipfile.BadZipFile, KeyError, OSError, TypeError,
                AttributeError, ImportError, IndexError, UnicodeDecodeError, AssertionError, struct.error,
                OverflowError, NotImplementedError, MemoryError) as exc:
            # torch.load's own checks are asserts (a legacy file's storage list naming an unknown storage) and
            # struct/zip errors on damaged bytes: every one of them means the file is corrupt.
            raise SourceError(f"{shown}: not a readable torch checkpoint: {_first_line(exc, is_zip)}; the file is "
                              f"corrupt or truncated: download or save it again") from None


def read_torch(path: Path, extract_paths: Sequence[str], *, allow_globals: Sequence[str] = (),
               unsafe_pickle: bool = False, display: str | None = None, where: str = "") -> MappingSource:
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


def _import_global(name: str) -> Any:
    module_name, _, attr = name.rpartition(".")
    try:
        obj: Any = importlib.import_module(module_name)
        return getattr(obj, attr)
    except (ImportError, AttributeError, ValueError):
        raise SourceError(f"--allow-global {name}: no such importable global; give it as module.Name") from None


def _unpickling_error(shown: str, exc: Exception) -> SourceError:
    text = str(exc)
    match = _GLOBAL.search(text)
    if match:
        return UnsafeGlobalError(shown, match.group(1))
    if "Weights only load failed" in text:
        detail = _UNSUPPORTED.search(text)
        reason = detail.group(0) if detail else "it uses pickle features the safe loader refuses"
        return SourceError(f"{shown}: the safe loader refused the file ({reason}); pass --unsafe-pickle "
                           f"only if you trust where it came from")
    return SourceError(f"{shown}: not a readable torch checkpoint: corrupt pickle ({text.splitlines()[0] if text else 'truncated'})")


def _first_line(exc: BaseException, is_zip: bool) -> str:
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, EOFError) or "Ran out of input" in text:
        return "the file is truncated (pickle data ends early)"
    if "central directory" in text or "zip archive" in text:
        return f"the zip archive is truncated or corrupt ({text.split(': ', 1)[-1]})"
    if "invalid load key" in text:
        return f"not a pickle or zip file ({text})"
    return text
