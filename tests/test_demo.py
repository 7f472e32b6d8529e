"""``python -m prefetch_ingest demo``: the three timelines, the summary table, the command line.

The exact numbers are checked on trio's ``MockClock`` (virtual time: the
demo's sleeps jump the clock, so the waits are exactly the simulated
durations). The command itself is run in a subprocess, on a pipe and on a
pseudo-terminal, where only what does not depend on the machine's speed is
checked.
"""

from __future__ import annotations

import errno
import functools
import io
import math
import os
import subprocess
import sys

import anyio
import pytest
import trio.testing

from prefetch_ingest.__main__ import build_parser, main
from prefetch_ingest._demo import DemoConfig, DemoSummary, run_demo

from .postgres_server import PostgresServer, postgres_server
from .redis_server import RedisServer, redis_server_fixture

redis_server = redis_server_fixture()
__all__ = ["postgres_server"]

DEMO = [sys.executable, "-m", "prefetch_ingest", "demo"]
FAST = ["--scale", "0.001"]


def _run_on_mock_clock(config: DemoConfig) -> tuple[DemoSummary, str]:
    out = io.StringIO()
    summary = anyio.run(
        functools.partial(run_demo, config, out),
        backend="trio",
        backend_options={"clock": trio.testing.MockClock(autojump_threshold=0)},
    )
    return summary, out.getvalue()


def test_demo_serves_the_three_clicks_as_hit_joined_and_ran() -> None:
    summary, text = _run_on_mock_clock(DemoConfig())
    assert [s.source for s in summary.scenarios] == ["hit", "joined", "ran"]
    assert "Mapping answered (hit)" in text
    assert "Mapping answered (joined)" in text
    assert "Mapping answered (ran)" in text
    assert "background ingest failed: RuntimeError: LLM provider answered 429" in text


def test_demo_summary_matches_the_simulated_durations() -> None:
    summary, text = _run_on_mock_clock(DemoConfig())
    # Click 1 after the ingest finished, click 2 30 s into the 120 s ingest,
    # click 3 after the background run failed: it waits a whole ingest.
    waited = [s.waited_s for s in summary.scenarios]
    without = [s.without_s for s in summary.scenarios]
    assert all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(waited, [0, 90, 120], strict=True))
    assert all(math.isclose(w, 120, abs_tol=1e-6) for w in without)
    assert math.isclose(summary.saved_s, 150, abs_tol=1e-6)
    assert (summary.hits, summary.joins, summary.misses) == (1, 1, 1)
    assert math.isclose(summary.hit_ratio, 2 / 3)
    # every background run was clicked: nothing speculative went unread
    assert (summary.background_started, summary.unclaimed, summary.wasted_s) == (3, 0, 0.0)
    assert "speculation: 3 background ingest(s) started, 0 unclaimed" in text
    lines = text.splitlines()
    assert any(
        line.split() == ["total", "210.0", "s", "360.0", "s", "150.0", "s"] for line in lines
    )
    assert "time saved: 150.0 s of 360.0 s (42%)" in lines
    assert "hit ratio: 67% (1 hit, 1 joined, 1 ran, of 3 clicks)" in lines
    assert "hits alone: 33% (1 of 3 clicks found the ingest finished)" in lines


def test_every_column_and_figure_of_the_summary_is_explained_on_screen() -> None:
    _, text = _run_on_mock_clock(DemoConfig())
    legend = text[text.index("What the figures mean") :]
    for named in (
        "served",
        "hit =",
        "joined =",
        "ran =",
        "wait with prefetch",
        "wait without",
        "time saved",
        "hit ratio",
        "hits alone",
        "unclaimed, wasted",
    ):
        assert named in legend, named


def test_demo_summary_scales_with_the_ingest_duration_option() -> None:
    summary, _ = _run_on_mock_clock(DemoConfig(ingest_s=40.0, query_s=1.0))
    assert [round(s.waited_s, 6) for s in summary.scenarios] == [0, 30, 40]
    assert math.isclose(summary.saved_s, 50, abs_tol=1e-6)


def test_demo_seed_decides_the_statistics_and_nothing_else() -> None:
    _, first = _run_on_mock_clock(DemoConfig(seed=1))
    _, same = _run_on_mock_clock(DemoConfig(seed=1))
    _, other = _run_on_mock_clock(DemoConfig(seed=2))
    assert first == same
    assert first != other
    assert first.splitlines()[-8:] == other.splitlines()[-8:]  # the summary


def test_demo_command_prints_the_outcomes_and_no_progress_line_on_a_pipe() -> None:
    done = subprocess.run([*DEMO, *FAST], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    for outcome in ("(hit)", "(joined)", "(ran)"):
        assert f"Mapping answered {outcome}" in done.stdout
    assert "hit ratio: 67% (1 hit, 1 joined, 1 ran, of 3 clicks)" in done.stdout
    assert "\x1b[K" not in done.stdout
    assert done.stderr == ""  # the library's expected warning stays hidden


def test_demo_command_runs_on_trio() -> None:
    done = subprocess.run(
        [*DEMO, *FAST, "--backend", "trio"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "hit ratio: 67%" in done.stdout


def test_demo_log_level_option_sends_the_library_logs_to_stderr() -> None:
    done = subprocess.run(
        [*DEMO, *FAST, "--log-level", "info"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "prefetch.started" in done.stderr
    assert "prefetch.failed" in done.stderr
    assert "prefetch." not in done.stdout


@pytest.mark.redis
def test_demo_with_redis_runs_two_instances_and_leaves_no_keys(redis_server: RedisServer) -> None:
    done = subprocess.run(
        [*DEMO, *FAST, "--redis", redis_server.url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Two instances share Redis" in done.stdout
    assert "Query answered by A" in done.stdout
    assert "user clicks Mapping on B" in done.stdout
    for outcome in ("(hit)", "(joined)", "(ran)"):
        assert f"Mapping answered {outcome}" in done.stdout
    assert "hit ratio: 67% (1 hit, 1 joined, 1 ran, of 3 clicks)" in done.stdout
    assert redis_server.command("KEYS", "prefetch_ingest_demo_*:*") == []


@pytest.mark.postgres
def test_demo_with_postgres_runs_two_instances_and_drops_its_table(
    postgres_server: PostgresServer,
) -> None:
    done = subprocess.run(
        [*DEMO, *FAST, "--postgres", postgres_server.dsn],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Two instances share PostgreSQL" in done.stdout
    assert "user clicks Mapping on B" in done.stdout
    for outcome in ("(hit)", "(joined)", "(ran)"):
        assert f"Mapping answered {outcome}" in done.stdout
    assert "hit ratio: 67% (1 hit, 1 joined, 1 ran, of 3 clicks)" in done.stdout
    left = postgres_server.sql(
        "SELECT relname FROM pg_class WHERE relname LIKE 'prefetch_ingest_demo_%%'"
    )
    assert left == []


def test_demo_refuses_postgres_on_trio_and_two_stores(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--postgres", "postgresql://u@127.0.0.1:1/db", "--backend", "trio"])
    assert exit_info.value.code == 2
    assert "--postgres runs on asyncio only" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--postgres", "postgresql://u@h/db", "--redis", "redis://h:1/0"])
    assert exit_info.value.code == 2
    assert "choose one store" in capsys.readouterr().err


def test_demo_refuses_redis_on_trio(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--redis", "redis://127.0.0.1:1/0", "--backend", "trio"])
    assert exit_info.value.code == 2
    assert "--redis runs on asyncio only" in capsys.readouterr().err


def _run_in_terminal(args: list[str]) -> str:
    primary, secondary = os.openpty()
    try:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=secondary, stderr=secondary)
    finally:
        os.close(secondary)
    chunks: list[bytes] = []
    try:
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError as exc:  # EIO: the child closed the terminal
                if exc.errno != errno.EIO:
                    raise
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(primary)
        assert proc.wait(timeout=60) == 0
    return b"".join(chunks).decode()


def test_demo_draws_a_live_progress_line_on_a_terminal() -> None:
    text = _run_in_terminal([*DEMO, *FAST])
    assert "\r\x1b[K" in text
    assert "run-2 [" in text  # the bar of the run being waited for
    assert "hit ratio: 67%" in text


def test_demo_no_progress_option_suppresses_the_line_on_a_terminal() -> None:
    text = _run_in_terminal([*DEMO, *FAST, "--no-progress"])
    assert "\x1b[K" not in text
    assert "hit ratio: 67%" in text


def test_help_explains_every_option() -> None:
    parser = build_parser()
    demo = next(
        action.choices["demo"]
        for action in parser._actions
        if isinstance(action.choices, dict) and "demo" in action.choices
    )
    text = demo.format_help()
    options = [a for a in demo._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in options} >= {"scale", "seed", "no_progress", "redis"}
    for action in options:
        assert action.help, action.dest
        assert action.option_strings[0] in text
    done = subprocess.run([*DEMO, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert "--scale" in done.stdout
    assert "--no-progress" in done.stdout


@pytest.mark.parametrize("scale", ["0", "-1", "nan", "inf", "fast"])
def test_a_bad_scale_is_rejected_with_a_usage_error(
    scale: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--scale", scale])
    assert exit_info.value.code == 2
    assert "--scale" in capsys.readouterr().err


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "demo" in capsys.readouterr().err
