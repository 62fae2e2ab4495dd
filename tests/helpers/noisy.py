"""A model factory that talks the way mmengine, DeepSpeed and transformers do while a target is built: a logging
handler on stdout, a print, and a write to file descriptor 1 (C code). Importable as
`tests.helpers.noisy:noisy_tiny_net` by a ckptx run in another process."""

from __future__ import annotations

import logging
import os
import sys

from torch import nn

from tests.helpers.models import tiny_net

LINE = "noisy library: building the model"


def noisy_tiny_net() -> nn.Module:
    """TinyNet, after logging, printing and writing to fd 1 one line each."""
    logger = logging.getLogger("tests.noisy")
    handler = logging.StreamHandler(sys.stdout)  # what mmengine's MMLogger and DeepSpeed's logger do
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.info("%s (logging)", LINE)
    print(f"{LINE} (print)")
    sys.stdout.flush()
    os.write(1, f"{LINE} (fd 1)\n".encode())
    return tiny_net()
