"""The reference for `ckptx.io.zero`: DeepSpeed's own `zero_to_fp32.py`, the copy saved beside each checkpoint.

`python zero_reference.py OUT_ROOT CKPT_DIR...` runs `convert_zero_checkpoint_to_fp32_state_dict(CKPT_DIR,
OUT_ROOT/<name of CKPT_DIR>)` from `CKPT_DIR/zero_to_fp32.py` for each folder, in one process (deepspeed is
imported once), which is what `python CKPT_DIR/zero_to_fp32.py CKPT_DIR OUT` does: each output folder then
holds `pytorch_model.bin`. Needs deepspeed importable; ckptx never imports this file.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def run_copied_script(checkpoint: Path, out: Path) -> Path:
    """Run the `zero_to_fp32.py` saved in `checkpoint` on it; returns the written `pytorch_model.bin`."""
    spec = importlib.util.spec_from_file_location(
        f"zero_to_fp32_{checkpoint.name.replace('-', '_')}", checkpoint / "zero_to_fp32.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.convert_zero_checkpoint_to_fp32_state_dict(str(checkpoint), str(out))
    return out / "pytorch_model.bin"


def main(argv: list[str]) -> int:
    """Convert every folder named after OUT_ROOT."""
    out_root, *folders = map(Path, argv)
    for folder in folders:
        written = run_copied_script(folder, out_root / folder.name)
        if not written.is_file():
            raise SystemExit(f"{folder}: zero_to_fp32.py wrote no {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
