"""`python -m ckptx`."""

import sys

from ckptx.cli import main

sys.exit(main())
