"""Side-by-side benchmarks of prefetch_ingest against its peers (targets: docs/contract.md).

Run ``python -m benchmarks`` from the repository root; ``--quick`` for the
small smoke run. See ``benchmarks/README.md``.
"""
