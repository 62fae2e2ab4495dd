"""Pickle-based checkpoints load with weights_only: payloads never run, needed globals are named."""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import pytest
import torch

from ckptx.errors import SourceError, UnsafeGlobalError
from ckptx.io.read.open import open_source


class _Payload:
    """Unpickling this runs a shell command that creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["zip", "legacy", "plain-pickle"])
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_payload_is_never_executed(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    obj = {"model": {"w": torch.ones(2)}, "evil": _Payload(marker)}
    if writer == "plain-pickle":
        path.write_bytes(pickle.dumps(obj))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=writer == "zip")
    with pytest.raises(SourceError) as caught:
        open_source(path, ["model"])
    assert not marker.exists()
    assert "refuse" in str(caught.value)


def test_refused_global_names_both_ways_out(args_checkpoint: Path) -> None:
    with pytest.raises(UnsafeGlobalError) as caught:
        open_source(args_checkpoint, ["model"])
    assert str(caught.value) == (
        f"{args_checkpoint}: the checkpoint needs the Python global 'argparse.Namespace', which the safe loader "
        "refuses: it may be allowed (an argparse.Namespace); if you trust this file, pass --allow-global "
        "argparse.Namespace (just that one), or --unsafe-pickle, which runs any code the file contains"
    )


def test_allow_global_loads_just_that_global(args_checkpoint: Path) -> None:
    with open_source(args_checkpoint, ["model"], allow_globals=["argparse.Namespace"]) as source:
        assert source.top_level["args"] == "Namespace"
        assert len(source.tensors) == 9


def test_allow_global_does_not_allow_others(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(1)}, "a": argparse.Namespace(x=1), "e": _Payload(marker)}, path)
    with pytest.raises(UnsafeGlobalError):
        open_source(path, ["model"], allow_globals=["argparse.Namespace"])
    assert not marker.exists()


def test_unknown_allow_global_is_a_clear_error(args_checkpoint: Path) -> None:
    with pytest.raises(SourceError, match="--allow-global argparse.Nope: no such importable global"):
        open_source(args_checkpoint, ["model"], allow_globals=["argparse.Nope"])


def test_unsafe_pickle_loads_everything(args_checkpoint: Path) -> None:
    with open_source(args_checkpoint, ["model"], unsafe_pickle=True) as source:
        assert source.extracted_from == "model"


def test_legacy_format_loads(tmp_path: Path, tiny_state: dict) -> None:
    path = tmp_path / "legacy.pth"
    torch.save({"state_dict": tiny_state}, path, _use_new_zipfile_serialization=False)
    with open_source(path, ["state_dict"]) as source:
        assert source.format == "torch-legacy"
        assert torch.equal(source.load("conv.weight"), tiny_state["conv.weight"])
