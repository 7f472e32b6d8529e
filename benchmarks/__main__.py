"""``python -m benchmarks``: every scenario, every system, one process."""

from __future__ import annotations

if __name__ == "__main__":  # not when multiprocessing's spawn re-imports it
    from ._cli import main

    raise SystemExit(main())
