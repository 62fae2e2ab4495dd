"""Multi-file inputs held to the single-file standard: real checkpoints of every multi-file kind (a `dcp.save` folder
from 2 gloo ranks, DeepSpeed ZeRO-2/3 folders from a 2-rank CPU run, a sharded safetensors index), each changed in one
hostile way, run through the command line in their own process. Every run must keep the six properties checked by
`tests/helpers/hostile.Guard` (no payload run, no outside read, no internal error, no source modified, no hang, no
wrong output); most cases must also end in one error line (exit 2).

The real checkpoints are written once per session; each case works on its own copy.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import subprocess_env
from tests.helpers.hostile import (
    GIB,
    Case,
    copy_seed,
    deep_list,
    deep_tuple_key,
    jobs_file,
    new_case,
    payload_pickle,
    rewrite_zip,
    splice_string,
    tensor_equal,
)

HELPERS = Path(__file__).resolve().parents[1] / "helpers"
TAG = "global_step2"
DEEP = 200_000


# ---- the real checkpoints ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def dcp_seed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `default` layout of tests/helpers/dcp_checkpoints.py (model, optimizer, epoch, step), saved by
    `dcp.save` from 2 gloo processes."""
    root = tmp_path_factory.mktemp("hostile-dcp")
    done = subprocess.run(
        [sys.executable, "-m", "tests.helpers.dcp_checkpoints", str(root)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "default"


@pytest.fixture
def case(tmp_path: Path) -> Case:
    return new_case(tmp_path)


# ---- torch.distributed.checkpoint ---------------------------------------------------------------------------------


def _metadata(folder: Path):
    """The folder's `.metadata` as torch reads it (our own real save: unpickled with pickle, as torch does)."""
    with open(folder / ".metadata", "rb") as f:
        return pickle.load(f)


def _write_metadata(folder: Path, metadata, splice: dict[str, bytes] | None = None) -> None:
    data = pickle.dumps(metadata, protocol=2)
    for placeholder, opcodes in (splice or {}).items():
        data = splice_string(data, placeholder, opcodes)
    (folder / ".metadata").write_bytes(data)


def _one_tensor_of_chunks(folder: Path, chunks: list[tuple[tuple[int, ...], tuple[int, ...]]], shape) -> None:
    """`.metadata` describing `model.embed.weight` as a float32 tensor of `shape` saved in `chunks` (offsets,
    sizes), each chunk's item the real item of the tensor's first chunk."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    metadata = _metadata(folder)
    key = "model.embed.weight"
    entry = metadata.state_dict_metadata[key]
    item = next(v for k, v in metadata.storage_data.items() if k.fqn == key)
    metadata.storage_data = {k: v for k, v in metadata.storage_data.items() if k.fqn != key}
    entry.size = torch.Size(shape)
    entry.chunks = [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in chunks]
    for offsets, _ in chunks:
        metadata.storage_data[MetadataIndex(key, torch.Size(offsets))] = item
    _write_metadata(folder, metadata)


def _chunk_item(folder: Path, key: str, index: int = 0):
    metadata = _metadata(folder)
    chunk = metadata.state_dict_metadata[key].chunks[index]
    info = next(v for k, v in metadata.storage_data.items() if k.fqn == key and k.offset == chunk.offsets)
    return metadata, chunk, info


def _replace_chunk_archive(folder: Path, key: str, archive: bytes) -> None:
    """Point the first chunk of `key` at `archive` (a torch.save zip) in a new rank file of the folder."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    metadata, chunk, _ = _chunk_item(folder, key)
    (folder / "__9_0.distcp").write_bytes(archive)
    for index in list(metadata.storage_data):
        if index.fqn == key and index.offset == chunk.offsets:
            metadata.storage_data[index] = _StorageInfo("__9_0.distcp", 0, len(archive))
    _write_metadata(folder, metadata)


def _saved(tensor: torch.Tensor, tmp: Path) -> Path:
    path = tmp / "item.pt"
    torch.save(tensor, path)
    return path


def dcp_payload_metadata(folder: Path, case: Case) -> list[object]:
    (folder / ".metadata").write_bytes(payload_pickle(case.marker))
    return ["inspect", folder]


def dcp_payload_inside_metadata(folder: Path, case: Case) -> list[object]:
    metadata = _metadata(folder)
    metadata.planner_data["model.embed.weight"] = "@@PAYLOAD@@"
    _write_metadata(folder, metadata, {"@@PAYLOAD@@": payload_pickle(case.marker)[2:-1]})
    return ["inspect", folder]


def dcp_metadata_links_to_secret(folder: Path, case: Case) -> list[object]:
    (folder / ".metadata").unlink()
    (folder / ".metadata").symlink_to(case.secret)
    return ["inspect", folder]


def dcp_metadata_fifo(folder: Path, case: Case) -> list[object]:
    (folder / ".metadata").unlink()
    os.mkfifo(folder / ".metadata")
    return ["inspect", folder]


def dcp_metadata_urandom(folder: Path, case: Case) -> list[object]:
    (folder / ".metadata").unlink()
    (folder / ".metadata").symlink_to("/dev/urandom")
    return ["convert", folder, "-o", case.root / "out.safetensors"]


def dcp_metadata_sparse_7gib(folder: Path, case: Case) -> list[object]:
    os.truncate(folder / ".metadata", 7 * GIB)  # the real pickle, then 7 GiB of holes
    return ["inspect", folder]


def _planner_index(value: int) -> Callable[[Path, Case], list[object]]:
    def mutate(folder: Path, case: Case) -> list[object]:
        metadata = _metadata(folder)
        key = next(k for k, path in metadata.planner_data.items() if any(type(p) is int for p in path))
        metadata.planner_data[key] = tuple(value if type(p) is int else p for p in metadata.planner_data[key])
        _write_metadata(folder, metadata)
        return ["inspect", folder]

    return mutate


def dcp_deep_relative_path(folder: Path, case: Case) -> list[object]:
    metadata = _metadata(folder)
    first = next(iter(metadata.storage_data))
    metadata.storage_data[first].relative_path = "@@DEEP@@"
    _write_metadata(folder, metadata, {"@@DEEP@@": deep_list(DEEP)})
    return ["inspect", folder]


def dcp_deep_planner_path(folder: Path, case: Case) -> list[object]:
    metadata = _metadata(folder)
    metadata.planner_data["model.embed.weight"] = "@@DEEP@@"
    _write_metadata(folder, metadata, {"@@DEEP@@": deep_list(DEEP)})
    return ["inspect", folder]


def dcp_deep_tuple_key(folder: Path, case: Case) -> list[object]:
    metadata = _metadata(folder)
    metadata.planner_data["model.embed.weight"] = "@@DEEP@@"
    _write_metadata(folder, metadata, {"@@DEEP@@": deep_tuple_key(DEEP)})
    return ["inspect", folder]


def dcp_200k_one_element_chunks(folder: Path, case: Case) -> list[object]:
    _one_tensor_of_chunks(folder, [((i,), (1,)) for i in range(200_000)], (200_000,))
    return ["inspect", folder]


def dcp_grid_of_400_by_400_chunks(folder: Path, case: Case) -> list[object]:
    _one_tensor_of_chunks(folder, [((i, j), (1, 1)) for i in range(400) for j in range(400)], (400, 400))
    return ["inspect", folder]


def dcp_200k_chunks_last_overlapping(folder: Path, case: Case) -> list[object]:
    chunks = [((i,), (1,)) for i in range(199_999)] + [((199_990,), (10,))]
    _one_tensor_of_chunks(folder, chunks, (200_000,))
    return ["inspect", folder]


def dcp_distcp_fifo(folder: Path, case: Case) -> list[object]:
    (folder / "__1_0.distcp").unlink()
    os.mkfifo(folder / "__1_0.distcp")
    return ["convert", folder, "-o", case.root / "out.safetensors"]


def dcp_distcp_links_to_secret(folder: Path, case: Case) -> list[object]:
    (folder / "__1_0.distcp").unlink()
    (folder / "__1_0.distcp").symlink_to(case.secret)
    return ["convert", folder, "-o", case.root / "out.safetensors", "-r", "common/extract-state-dict"]


def dcp_chunk_is_an_expanded_view(folder: Path, case: Case) -> list[object]:
    _, chunk, _ = _chunk_item(folder, "model.embed.weight")
    view = torch.zeros(1).expand(*chunk.sizes)  # stride 0: 4 bytes stored, the whole chunk once converted
    _replace_chunk_archive(folder, "model.embed.weight", _saved(view, case.root).read_bytes())
    return ["convert", folder, "-o", case.root / "out.safetensors", "-r", "common/extract-state-dict"]


def dcp_chunk_archive_inflates(folder: Path, case: Case) -> list[object]:
    _, chunk, _ = _chunk_item(folder, "model.embed.weight")
    item = _saved(torch.zeros(*chunk.sizes), case.root)
    rewrite_zip(item, bomb=200 << 20)  # data.pkl deflated, with 200 MiB after its STOP
    _replace_chunk_archive(folder, "model.embed.weight", item.read_bytes())
    return ["convert", folder, "-o", case.root / "out.safetensors", "-r", "common/extract-state-dict"]


DCP_CASES = {
    "payload-metadata": dcp_payload_metadata,
    "payload-inside-metadata": dcp_payload_inside_metadata,
    "metadata-links-to-secret": dcp_metadata_links_to_secret,
    "metadata-fifo": dcp_metadata_fifo,
    "metadata-urandom": dcp_metadata_urandom,
    "metadata-sparse-7gib": dcp_metadata_sparse_7gib,
    "planner-index-1e9": _planner_index(10**9),
    "planner-index-1e12": _planner_index(10**12),
    "planner-index-2pow70": _planner_index(2**70),
    "deep-relative-path": dcp_deep_relative_path,
    "deep-planner-path": dcp_deep_planner_path,
    "deep-tuple-key": dcp_deep_tuple_key,
    "distcp-fifo": dcp_distcp_fifo,
    "distcp-links-to-secret": dcp_distcp_links_to_secret,
    "chunk-expanded-view": dcp_chunk_is_an_expanded_view,
    "chunk-archive-inflates": dcp_chunk_archive_inflates,
}


@pytest.mark.parametrize("mutation", DCP_CASES.values(), ids=DCP_CASES.keys())
def test_hostile_dcp_folder_is_one_error_line(dcp_seed: Path, case: Case, mutation) -> None:
    folder = copy_seed(dcp_seed, case)
    args = mutation(folder, case)
    guard = case.guard(folder)
    guard.check(case.run(*args), codes=(2,))


@pytest.mark.parametrize(
    "mutation", [dcp_200k_one_element_chunks, dcp_grid_of_400_by_400_chunks], ids=["200k-chunks", "400x400-grid"]
)
def test_many_chunks_are_checked_in_seconds(dcp_seed: Path, case: Case, mutation) -> None:
    folder = copy_seed(dcp_seed, case)
    args = mutation(folder, case)
    guard = case.guard(folder)
    outcome = case.run(*args)
    guard.check(outcome, codes=(0,))
    assert outcome.cpu < 15, outcome  # minutes before the cover check was linear


def test_an_overlap_among_many_chunks_is_named(dcp_seed: Path, case: Case) -> None:
    folder = copy_seed(dcp_seed, case)
    args = dcp_200k_chunks_last_overlapping(folder, case)
    guard = case.guard(folder)
    outcome = case.run(*args)
    guard.check(outcome, codes=(2,))
    assert "chunks [199990:199991] and [199990:200000] overlap" in outcome.err, outcome


def test_an_untouched_dcp_folder_converts_to_torchs_own_reading(dcp_seed: Path, case: Case) -> None:
    """The control: the same harness on the real folder, and the output equal to `dcp_to_torch_save`'s."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder = copy_seed(dcp_seed, case)
    guard = case.guard(folder)
    out = case.root / "out.safetensors"
    guard.check(case.run("convert", folder, "-o", out, "-r", "common/extract-state-dict"), codes=(0,))
    dcp_to_torch_save(folder, case.root / "ref.pt")
    want = torch.load(case.root / "ref.pt", weights_only=False)["model"]
    got = load_file(str(out))
    # the same tensors; their order follows the .metadata file, which torch 2.13 writes in another order
    assert sorted(got) == sorted(want) and all(tensor_equal(got[k], want[k].contiguous()) for k in want)


# ---- sharded indexes and model folders ---------------------------------------------------------------------------


@pytest.fixture
def sharded(case: Case) -> Path:
    """A real two-shard safetensors checkpoint and its index."""
    folder = case.root / "model"
    folder.mkdir()
    save_file({"a.weight": torch.randn(4, 3)}, str(folder / "m-00001-of-00002.safetensors"))
    save_file({"b.weight": torch.randn(5)}, str(folder / "m-00002-of-00002.safetensors"))
    names = {"a.weight": "m-00001-of-00002.safetensors", "b.weight": "m-00002-of-00002.safetensors"}
    (folder / "m.safetensors.index.json").write_text(f'{{"metadata": {{}}, "weight_map": {names!r}}}'.replace("'", '"'))
    return folder


def index_fifo(folder: Path, case: Case) -> list[object]:
    index = folder / "m.safetensors.index.json"
    index.unlink()
    os.mkfifo(index)
    return ["convert", index, "-o", case.root / "out.safetensors"]


def index_urandom(folder: Path, case: Case) -> list[object]:
    index = folder / "m.safetensors.index.json"
    index.unlink()
    index.symlink_to("/dev/urandom")
    return ["convert", index, "-o", case.root / "out.safetensors"]


def index_links_to_secret(folder: Path, case: Case) -> list[object]:
    index = folder / "m.safetensors.index.json"
    index.unlink()
    index.symlink_to(case.secret)
    return ["convert", index, "-o", case.root / "out.safetensors"]


def index_nests_200k_deep(folder: Path, case: Case) -> list[object]:
    index = folder / "m.safetensors.index.json"
    index.write_text(
        '{"weight_map": {"a.weight": "m-00001-of-00002.safetensors"}, "metadata": ' + "[" * DEEP + "]" * DEEP + "}"
    )
    return ["convert", index, "-o", case.root / "out.safetensors"]


def index_sparse_7gib(folder: Path, case: Case) -> list[object]:
    index = folder / "m.safetensors.index.json"
    os.truncate(index, 7 * GIB)
    return ["convert", index, "-o", case.root / "out.safetensors"]


def shard_links_to_secret(folder: Path, case: Case) -> list[object]:
    shard = folder / "m-00002-of-00002.safetensors"
    shard.unlink()
    shard.symlink_to(case.secret)
    return ["convert", folder / "m.safetensors.index.json", "-o", case.root / "out.safetensors"]


def shard_urandom(folder: Path, case: Case) -> list[object]:
    shard = folder / "m-00002-of-00002.safetensors"
    shard.unlink()
    shard.symlink_to("/dev/urandom")
    return ["convert", folder / "m.safetensors.index.json", "-o", case.root / "out.safetensors"]


def output_over_a_shard(folder: Path, case: Case) -> list[object]:
    return ["convert", folder / "m.safetensors.index.json", "-o", folder / "m-00002-of-00002.safetensors", "--force"]


def output_over_a_shard_through_an_alias(folder: Path, case: Case) -> list[object]:
    (case.root / "alias").symlink_to(folder, target_is_directory=True)
    out = case.root / "alias" / "m-00001-of-00002.safetensors"
    return ["convert", folder / "m.safetensors.index.json", "-o", out, "--force"]


INDEX_CASES = {
    "index-fifo": index_fifo,
    "index-urandom": index_urandom,
    "index-links-to-secret": index_links_to_secret,
    "index-nests-200k-deep": index_nests_200k_deep,
    "index-sparse-7gib": index_sparse_7gib,
    "shard-links-to-secret": shard_links_to_secret,
    "shard-urandom": shard_urandom,
    "output-over-a-shard": output_over_a_shard,
    "output-over-a-shard-through-an-alias": output_over_a_shard_through_an_alias,
}


@pytest.mark.parametrize("mutation", INDEX_CASES.values(), ids=INDEX_CASES.keys())
def test_hostile_sharded_checkpoint_is_one_error_line(sharded: Path, case: Case, mutation) -> None:
    args = mutation(sharded, case)
    guard = case.guard(sharded)
    guard.check(case.run(*args), codes=(2,))


# ---- jobs files: one job writing over another job's source -----------------------------------------------------


def test_a_job_writing_a_shard_of_another_jobs_index_is_refused(sharded: Path, case: Case) -> None:
    shutil.copy(sharded / "m-00001-of-00002.safetensors", case.root / "single.safetensors")
    jobs = jobs_file(
        case,
        "  - {src: model/m.safetensors.index.json, dst: out/a.safetensors}\n"
        "  - {src: single.safetensors, dst: model/m-00002-of-00002.safetensors, force: true}\n",
    )
    guard = case.guard(sharded, case.root / "single.safetensors", jobs)
    outcome = case.run("batch", jobs)
    guard.check(outcome, codes=(2,))
    assert "is a file of the source of jobs.yaml:4:5 jobs[0]" in outcome.err, outcome


def test_a_job_writing_into_another_jobs_folder_through_an_alias_is_refused(dcp_seed: Path, case: Case) -> None:
    folder = copy_seed(dcp_seed, case, "ckpt")
    (case.root / "alias").symlink_to(folder, target_is_directory=True)
    other = case.root / "other.safetensors"
    save_file({"w": torch.ones(3)}, str(other))
    jobs = jobs_file(
        case,
        "  - {src: ckpt, dst: out/a.safetensors}\n"
        "  - {src: other.safetensors, dst: alias/__0_0.distcp.safetensors, force: true}\n"
        "  - {src: other.safetensors, dst: alias/__0_0.pth, force: true}\n",
    )
    os.link(folder / "__0_0.distcp", folder / "__0_0.pth")  # the same file under a torch name
    guard = case.guard(folder, other, jobs)
    outcome = case.run("batch", jobs)
    guard.check(outcome, codes=(2,))
    assert "the checkpoint folder jobs.yaml:4:5 jobs[0] reads" in outcome.err, outcome
    assert "output alias/__0_0.pth is a file of the source of" in outcome.err, outcome


def test_a_jobs_file_naming_a_secret_as_its_rules_does_not_print_it(sharded: Path, case: Case) -> None:
    secret_yaml = case.secret.with_suffix(".yaml")
    secret_yaml.write_text("ckptx-hostile-secret-7c1e: this line must never be printed\ntoken: abc\n")
    (case.root / "rules.yaml").symlink_to(secret_yaml)
    jobs = case.root / "jobs.yaml"
    jobs.write_text(
        "ckptx: 1\njobs:\n"
        "  - {src: model/m.safetensors.index.json, dst: out/a.safetensors, rules: [rules.yaml]}\n"
        f"  - {{src: model/m.safetensors.index.json, dst: out/b.safetensors, rules: [{secret_yaml}]}}\n"
    )
    guard = case.guard(sharded, jobs, secret_yaml)
    outcome = case.run("batch", jobs)
    guard.check(outcome, codes=(2,))
    assert "token" not in outcome.err and "missing required key 'ckptx'" in outcome.err, outcome
    outcome = case.run("batch", case.root / "rules.yaml")  # the secret given as the jobs file itself
    guard.check(outcome, codes=(2,))
