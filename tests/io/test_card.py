"""Provenance cards (`convert --audit`): every tensor's sha256 is that of its bytes as the output stores them, for
safetensors, sharded safetensors, `.pth` (tied and viewed storages too) and HuggingFace folders; the card follows
its JSON Schema and is written where asked, never over an input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jsonschema
import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptx._data import schema_path
from ckptx.conversion.pipeline import convert
from ckptx.errors import DestinationError
from ckptx.rules.recipe import Recipe

AS_IS = Recipe(name="as is")

HF_ARGS = {
    "architecture": "LlamaForCausalLM",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32,
}


def _sha(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _card(path: Path) -> dict:
    document = json.loads(path.read_text(encoding="utf-8"))
    schema = json.loads(schema_path("ckptx-card.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(document, schema)
    return document


@pytest.fixture
def source(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "src.safetensors"
    save_file(
        {
            "a.weight": torch.randn(64, 32),
            "a.bias": torch.randn(64),
            "b.weight": torch.randn(16, 16).to(torch.bfloat16),
            "steps": torch.tensor(7),
        },
        str(path),
    )
    return path


@pytest.fixture
def cast_rules(write_rules) -> Path:
    return write_rules(
        """
        ckptx: 1
        name: cast-and-rename
        steps:
          - cast: {match: '^a\\.weight$', dtype: bfloat16}
          - rename: [['^b\\.', 'c.']]
        """
    )


@pytest.mark.parametrize("dst", ["out.safetensors", "out.pth", "out.safetensors.index.json"])
def test_card_hashes_equal_the_bytes_of_every_output_tensor(source: Path, cast_rules: Path, tmp_path: Path, dst: str):
    out = tmp_path / dst
    shards = 3000 if dst.endswith(".index.json") else None
    result = convert(source, out, [str(cast_rules)], audit=tmp_path / "card.json", max_shard_size=shards)
    card = _card(tmp_path / "card.json")
    if dst.endswith(".pth"):
        loaded = torch.load(out, weights_only=True)
    elif dst.endswith(".index.json"):
        shards = set(json.loads(out.read_text())["weight_map"].values())
        loaded = {k: v for name in shards for k, v in load_file(str(tmp_path / name)).items()}
    else:
        loaded = load_file(str(out))
    assert result.card == str(tmp_path / "card.json")
    assert sorted(card["tensors"]) == sorted(loaded)
    for key, tensor in loaded.items():
        assert card["tensors"][key]["sha256"] == _sha(tensor), key
        assert card["tensors"][key]["dtype"] == str(tensor.dtype).removeprefix("torch.")
    assert card["tensors"]["a.weight"]["ops"] == ["cast(bfloat16)"]
    assert card["tensors"]["c.weight"]["sources"][0]["key"] == "b.weight"


def test_card_records_spans_statistics_source_identity_and_recipe(source: Path, cast_rules: Path, tmp_path: Path):
    convert(source, tmp_path / "out.safetensors", [str(cast_rules)], audit="")
    card = _card(tmp_path / "out.safetensors.card.json")
    from safetensors import safe_open

    with safe_open(str(source), "pt") as f:
        bias = f.get_tensor("a.bias").double()
    record = card["tensors"]["a.bias"]
    span = record["sources"][0]["spans"][0]
    with open(source, "rb") as f:
        f.seek(span["offset"])
        assert hashlib.sha256(f.read(span["length"])).hexdigest() == record["sha256"]
    assert record["stats"]["mean"] == pytest.approx(bias.mean().item(), rel=1e-12)
    assert record["stats"]["std"] == pytest.approx(bias.std(unbiased=False).item(), rel=1e-9)
    assert (record["stats"]["min"], record["stats"]["max"]) == (bias.min().item(), bias.max().item())
    (identity,) = card["source"]["files"]
    header = source.read_bytes()[: 8 + int.from_bytes(source.read_bytes()[:8], "little")]
    assert identity["hashed"] == "header" and identity["sha256"] == hashlib.sha256(header).hexdigest()
    assert identity["size"] == source.stat().st_size
    assert card["recipe"]["files"][0]["sha256"] == hashlib.sha256(cast_rules.read_bytes()).hexdigest()


def test_pth_card_hashes_each_view_of_a_shared_storage_as_its_own_row_major_bytes(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    src = tmp_path / "views.pth"
    torch.save({"base": base, "tied": base, "col": base[:, 1], "t": base.t()}, src)
    convert(src, tmp_path / "out.pth", AS_IS, audit=tmp_path / "card.json")
    card = _card(tmp_path / "card.json")
    loaded = torch.load(tmp_path / "out.pth", weights_only=True)
    for key in ("base", "tied", "col", "t"):
        assert card["tensors"][key]["sha256"] == _sha(loaded[key]), key


def test_model_folder_gets_its_card_inside_beside_the_weights(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the floor versions' venv has ckptx's own dependencies only; .venv (pinned transformers) always runs this
    pytest.importorskip("transformers")
    from ckptx.factories import transformers_model

    torch.manual_seed(1)
    model = transformers_model(**HF_ARGS)
    src = tmp_path / "llama.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src))
    folder = tmp_path / "folder"
    args = {k: v for k, v in HF_ARGS.items()}
    convert(src, f"{folder}/", AS_IS, target="ckptx.factories:transformers_model", target_args=args, audit="")
    card = _card(folder / "ckptx-card.json")
    loaded = load_file(str(folder / "model.safetensors"))
    assert sorted(card["tensors"]) == sorted(loaded)
    assert all(card["tensors"][k]["sha256"] == _sha(v) for k, v in loaded.items())


def test_card_never_replaces_the_source_or_an_existing_file_without_force(source: Path, tmp_path: Path) -> None:
    with pytest.raises(DestinationError, match="file of the source checkpoint"):
        convert(source, tmp_path / "out.safetensors", AS_IS, audit=source)
    (tmp_path / "card.json").write_text("{}")
    with pytest.raises(DestinationError, match="already exists"):
        convert(source, tmp_path / "out.safetensors", AS_IS, audit=tmp_path / "card.json")
    assert not (tmp_path / "out.safetensors").exists()
    convert(source, tmp_path / "out.safetensors", AS_IS, audit=tmp_path / "card.json", force=True)
    assert _card(tmp_path / "card.json")["ckptx_card"] == 1
