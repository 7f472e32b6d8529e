"""``python -m benchmarks``: every scenario, every system, one process."""

from __future__ import annotations

from ._cli import main

raise SystemExit(main())
