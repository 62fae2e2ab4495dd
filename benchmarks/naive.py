"""The scripts people write without ckptx: load everything, rename (and cast) in a dict, save everything.

    naive.py safetensors SRC DST [--cast REGEX]   safetensors.torch.load_file + renames + save_file
    naive.py torch SRC DST [--cast REGEX]         torch.load + renames + torch.save

The output is fsynced, as ckptx does (and as `cp` + `sync` does in the baseline), so all rows are durable.
"""

from __future__ import annotations

import argparse
import os
import re

import torch

RENAMES = [
    (re.compile(r"^model\.layers\."), "blocks."),
    (re.compile(r"^model\."), ""),
    (re.compile(r"\.self_attn\."), ".attn."),
    (re.compile(r"\.(q|k|v|o|gate|up|down)_proj\."), r".\1."),
]


def rename(key: str) -> str:
    """The same renames as benchmarks/rules/rename.yaml."""
    for pattern, replacement in RENAMES:
        key = pattern.sub(replacement, key)
    return key


def main() -> None:
    """Run one naive conversion."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("library", choices=["safetensors", "torch"])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--cast", metavar="REGEX", help="cast keys matching REGEX (after renaming) to bfloat16")
    args = parser.parse_args()
    if args.library == "safetensors":
        from safetensors.torch import load_file, save_file

        state = load_file(args.src)
    else:
        state = torch.load(args.src, map_location="cpu", weights_only=True)
    state = {rename(k): v for k, v in state.items()}
    if args.cast:
        pattern = re.compile(args.cast)
        state = {k: v.to(torch.bfloat16) if pattern.search(k) else v for k, v in state.items()}
    if args.library == "safetensors":
        save_file(state, args.dst)
    else:
        torch.save(state, args.dst)
    fd = os.open(args.dst, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


if __name__ == "__main__":
    main()
