"""`make demo`: the case that started ckptx, end to end.

1. Generate a checkpoint shaped like an official ConvNeXt-V2 atto *training* checkpoint
   (`model`, `optimizer`, `epoch`, `scaler`, and an `argparse.Namespace` under `args`), with random
   non-zero weights (GRN included).
2. `ckptx inspect` it.
3. Show what a wrong recipe gets: validation against MMPretrain fails, nothing is written (exit 1).
4. Convert it for MMPretrain with the shipped recipe, validate against the real MMPretrain classifier,
   verify by logits against the official model, and write `demo-out/convnextv2_atto_mmpretrain.pth`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from ckptx.cli import main
from ckptx.reference.convnextv2 import build

OUT = Path("demo-out")


def make_training_checkpoint(path: Path) -> None:
    """An official-format training checkpoint with non-trivial random weights."""
    torch.manual_seed(0)
    model = build("atto")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 1.0 / param[0].numel() ** 0.5)
            elif "grn" in name:
                param.normal_(0.0, 0.3)  # zero in the official init, which would hide GRN mistakes
            else:
                param.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-3)
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    optimizer.step()
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": 299,
            "scaler": {"scale": 65536.0, "_growth_tracker": 0},
            "args": argparse.Namespace(model="convnextv2_atto", lr=4e-3, epochs=300),
        },
        path,
    )


def run(*argv: str) -> int:
    """Print a `ckptx` command line, run it, print its exit code."""
    print(f"\n$ ckptx {shlex.join(argv)}", flush=True)
    code = main(list(argv))
    print(f"[exit {code}]", flush=True)
    return code


def demo() -> int:
    """Run the demo; returns 0 when every step did what it should."""
    OUT.mkdir(exist_ok=True)
    src = OUT / "convnextv2_atto_train.pth"
    dst = OUT / "convnextv2_atto_mmpretrain.pth"
    make_training_checkpoint(src)
    print(
        f"generated {src} ({src.stat().st_size / 1e6:.1f} MB), an official-format ConvNeXt-V2 atto training checkpoint"
    )
    steps = [
        (run("inspect", str(src), "--extract", "model", "--allow-global", "argparse.Namespace") == 0),
        (
            run(
                "convert",
                str(src),
                "-r",
                "convnextv2/official-to-timm",
                "--allow-global",
                "argparse.Namespace",
                "--target",
                "ckptx.factories:convnextv2_mmpretrain",
                "--target-arg",
                "size=atto",
                "-o",
                str(OUT / "wrong.pth"),
                "--force",
            )
            == 1
        ),
        (
            run(
                "convert",
                str(src),
                "-r",
                "convnextv2/official-to-mmpretrain",
                "--allow-global",
                "argparse.Namespace",
                "--set",
                "size=atto",
                "-o",
                str(dst),
                "--force",
                "--verify",
            )
            == 0
        ),
    ]
    ok = all(steps) and dst.exists() and not (OUT / "wrong.pth").exists()
    print("\ndemo:", "OK" if ok else "FAILED", f"- {dst} loads into MMPretrain's ImageClassifier with strict=True")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(demo())
