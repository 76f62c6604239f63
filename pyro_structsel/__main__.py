"""``python -m pyro_structsel``: the main job (see :mod:`pyro_structsel.cli`)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
