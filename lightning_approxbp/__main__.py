"""``python -m lightning_approxbp fit --config configs/approxbp.yaml``: same as the ``lightning`` command."""

import sys

from lightning_approxbp.cli import main

sys.exit(main())
