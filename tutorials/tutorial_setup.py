"""What every tutorial starts with: quick mode, the output folder, files-only matplotlib, one thread.

Import it first (``from tutorial_setup import tutorial_settings``), before
``matplotlib.pyplot``: importing it selects the Agg backend, so figures go
to files and no window opens.

The quick mode is Pyro's convention for tutorials in CI: the ``CI``
environment variable, or ``--quick``; fewer steps, the same code. Figures go
to ``--out``, else ``$STRUCTSEL_TUTORIAL_OUT``, else ``./tutorial-out``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")  # write files, never open windows


def tutorial_settings(doc: str, *, quick_help: str = "few steps (also when CI is set)",
                      arguments: Callable[[argparse.ArgumentParser], None] | None = None
                      ) -> argparse.Namespace:
    """Parse the tutorial's command line; ``quick`` and ``out`` (an existing folder) are set.

    ``arguments(parser)`` adds the tutorial's own options. Torch runs on one
    thread: the tutorials' networks are small, and threads only add overhead.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", type=Path, default=None, help="directory for the figures")
    if arguments is not None:
        arguments(parser)
    settings = parser.parse_args()
    settings.quick = "CI" in os.environ or settings.quick
    settings.out = settings.out or Path(os.environ.get("STRUCTSEL_TUTORIAL_OUT", "tutorial-out"))
    settings.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    return settings
