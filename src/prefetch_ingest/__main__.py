"""Command line: ``python -m prefetch_ingest demo``.

Run ``python -m prefetch_ingest demo --help`` for the options.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence

__all__ = ["main"]

_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m prefetch_ingest``."""
    parser = argparse.ArgumentParser(
        prog="python -m prefetch_ingest",
        description="prefetch_ingest: start expensive coroutines early, run each key once, "
        "serve the result.",
    )
    commands = parser.add_subparsers(dest="command", title="commands", required=True)
    demo = commands.add_parser(
        "demo",
        help="replay the origin service's three timelines, compressed in time",
        description=(
            "Replays the three timelines of the origin service with a simulated ingest: "
            "(1) the background ingest started after Query finishes before the user clicks "
            "Mapping, so the click is a cache hit; (2) the user clicks while it runs and "
            "joins it; (3) the background ingest fails and the click runs it again, as "
            "before prefetching. Prints each timeline and a table of the waits with and "
            "without prefetching, the time saved and the hit ratio. Times are printed in "
            "simulated seconds."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument(
        "--scale",
        type=_positive,
        default=0.01,
        help="real seconds per simulated second; the default runs the 120 s ingest in 1.2 s "
        "and the whole demo in about 5 s",
    )
    demo.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the simulated ingest's made-up statistics (papers, authors)",
    )
    demo.add_argument(
        "--query-seconds",
        type=_positive,
        default=2.0,
        help="simulated duration of the Query step",
    )
    demo.add_argument(
        "--ingest-seconds",
        type=_positive,
        default=120.0,
        help="simulated duration of one ingest (the Mapping step)",
    )
    demo.add_argument(
        "--no-progress",
        action="store_true",
        help="never draw the live progress line (it is drawn only when stdout is a terminal)",
    )
    demo.add_argument(
        "--backend",
        choices=("asyncio", "trio"),
        default="asyncio",
        help="the event loop to run on",
    )
    demo.add_argument(
        "--redis",
        metavar="URL",
        default=None,
        help="run two instances sharing the Redis at URL (redis://host:port/db): A answers "
        "Query and runs the background ingest, B answers the Mapping click; needs the "
        "'redis' extra and --backend asyncio; the demo's keys are removed at the end",
    )
    demo.add_argument(
        "--postgres",
        metavar="DSN",
        default=None,
        help="the same with PostgreSQL (postgresql://user@host/db): two instances share a "
        "table of the run's own, dropped at the end; needs the 'postgres' extra and "
        "--backend asyncio",
    )
    demo.add_argument(
        "--log-level",
        choices=_LOG_LEVELS,
        default="error",
        help="the library's log events at this level and above go to stderr; the default "
        "hides the warning logged for timeline 3's deliberate failure",
    )
    return parser


def _configure_logging(level: str) -> None:
    import structlog

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m prefetch_ingest`` and the ``prefetch-ingest`` script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.redis is not None and args.backend != "asyncio":
            parser.error("--redis runs on asyncio only (the Redis store is asyncio-only)")
        if args.postgres is not None and args.backend != "asyncio":
            parser.error("--postgres runs on asyncio only (the PostgreSQL store is asyncio-only)")
        if args.postgres is not None and args.redis is not None:
            parser.error("--redis and --postgres: choose one store")
        import functools

        import anyio

        from ._demo import DemoConfig, run_demo

        _configure_logging(args.log_level)
        config = DemoConfig(
            scale=args.scale,
            seed=args.seed,
            query_s=args.query_seconds,
            ingest_s=args.ingest_seconds,
            progress=not args.no_progress and sys.stdout.isatty(),
            redis_url=args.redis,
            postgres_dsn=args.postgres,
        )
        try:
            anyio.run(functools.partial(run_demo, config), backend=args.backend)
        except KeyboardInterrupt:
            return 130
        except ImportError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
