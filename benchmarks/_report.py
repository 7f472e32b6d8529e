"""Tables (terminal and Markdown), the verdicts on the performance targets, and the chart."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ._results import Row, ScenarioResult

__all__ = ["Verdict", "machine", "markdown", "render_chart", "text_tables", "verdicts"]

OURS = "prefetch_ingest"


# ---------------------------------------------------------------------------
# cells


def _num(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _ratio(value: float | None, ref: Row | None) -> str:
    if value is None or ref is None or not ref.value:
        return "—"
    return f"{value / ref.value:.2f}x"


def _extra(row: Row, key: str, spec: str) -> str:
    if key not in row.extra:
        return ""
    value = row.extra[key]
    if isinstance(value, str):
        return value
    return format(value, spec)


def _cells(result: ScenarioResult) -> tuple[list[str], list[list[str]]]:
    floor = result.floor()
    best = result.best_peer()
    header = ["system", result.unit]
    if floor is not None:
        header.append(result.floor_header)
    header.append("x best peer")
    header += [h for _, h, _ in result.columns]
    body: list[list[str]] = []
    for row in result.rows:
        shown = row.lacks if row.value is None else _num(row.value)
        cells = [row.system + (" (best peer)" if row is best else ""), shown or "—"]
        if floor is not None:
            cells.append(_ratio(row.value, floor))
        cells.append(_ratio(row.value, best))
        cells += [_extra(row, key, spec) for key, _, spec in result.columns]
        body.append(cells)
    return header, body


# ---------------------------------------------------------------------------
# terminal


def text_tables(results: Sequence[ScenarioResult]) -> str:
    out: list[str] = []
    for result in results:
        out.append("")
        out.append(result.title)
        if result.skipped:
            out.append(f"  skipped: {result.skipped}")
            continue
        header, body = _cells(result)
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

        def line(cells: list[str], widths: list[int] = widths) -> str:
            first = cells[0].ljust(widths[0])
            rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
            return "  " + "  ".join([first, *rest])

        out.append(line(header))
        out.append("  " + "  ".join("-" * w for w in widths))
        out += [line(cells) for cells in body]
        out += [f"  note: {note}" for note in result.notes]
    return "\n".join(out)


# ---------------------------------------------------------------------------
# the performance targets of docs/contract.md


@dataclass(frozen=True)
class Verdict:
    target: str
    met: bool | None  # None: not measured in this run
    detail: str


def _find(results: Sequence[ScenarioResult], key: str) -> ScenarioResult | None:
    for result in results:
        if result.key == key and not result.skipped:
            return result
    return None


def verdicts(results: Sequence[ScenarioResult]) -> list[Verdict]:
    out: list[Verdict] = []
    hit = _find(results, "hit")
    if hit is not None and (ours := hit.row(OURS)) is not None and ours.value is not None:
        floor, best = hit.floor(), hit.best_peer()
        if floor is not None and floor.value:
            ratio = ours.value / floor.value
            out.append(Verdict("hit ≤ 2x the floor", ratio <= 2.0, f"{ratio:.2f}x the floor"))
        if best is not None and best.value:
            out.append(
                Verdict(
                    "hit faster than every peer",
                    ours.value < best.value,
                    f"{ours.value:.0f} ns vs {best.system} {best.value:.0f} ns",
                )
            )
    st = _find(results, "stampede")
    if st is not None and (ours := st.row(OURS)) is not None:
        runs, served = ours.extra.get("executions"), ours.extra.get("served")
        out.append(
            Verdict(
                "stampede: one execution, every caller served",
                ours.value is not None and all(c.ok for c in st.checks if OURS in c.what),
                f"{runs} execution(s), {served} served",
            )
        )
        best = st.best_peer()
        if ours.value is not None and best is not None and best.value:
            out.append(
                Verdict(
                    "stampede: time per waiter ≤ best peer",
                    ours.value <= best.value,
                    f"{ours.value:.2f} µs vs {best.system} {best.value:.2f} µs",
                )
            )
    for key, label in (("cold", "many cold keys"), ("mixed", "mixed workload")):
        sc = _find(results, key)
        if sc is not None and (ours := sc.row(OURS)) is not None and ours.value is not None:
            best = sc.best_peer()
            if best is not None and best.value:
                out.append(
                    Verdict(
                        f"{label}: time per call ≤ best peer",
                        ours.value <= best.value,
                        f"{ours.value:.2f} µs vs {best.system} {best.value:.2f} µs "
                        f"({ours.value / best.value:.2f}x)",
                    )
                )
    mem = _find(results, "memory")
    if mem is not None and (ours := mem.row(OURS)) is not None and ours.value is not None:
        peers = [r for r in mem.rows if r.role == "peer" and r.value is not None]
        least = min(peers, key=lambda r: r.value or 0.0) if peers else None
        out.append(Verdict("memory < 128 B/entry", ours.value < 128, f"{ours.value:.0f} B"))
        if least is not None and least.value is not None:
            out.append(
                Verdict(
                    "memory less than any peer",
                    ours.value < least.value,
                    f"{ours.value:.0f} B vs {least.system} {least.value:.0f} B",
                )
            )
    sw = _find(results, "sweep")
    if sw is not None and (ours := sw.row(OURS)) is not None and ours.value is not None:
        scan = sw.floor()
        if scan is not None and scan.value:
            share = ours.value / scan.value
            detail = f"{share * 100:.1f}% ({ours.value:.2f} ms vs {scan.value:.1f} ms)"
            loop = sw.row("full scan (for loop)")
            if loop is not None and loop.value:
                detail += f"; {ours.value / loop.value * 100:.1f}% of a for-loop scan"
            bound = sw.row("delete the 1% only")
            if bound is not None and bound.value:
                detail += (
                    f"; deleting the 1% alone is {bound.value / scan.value * 100:.1f}% "
                    f"of the full scan (we take {ours.value / bound.value:.1f}x that)"
                )
            if bound is not None and bound.value:
                out.append(
                    Verdict(
                        "sweep ≤ 2x merely deleting the expired entries",
                        ours.value <= 2.0 * bound.value,
                        detail,
                    )
                )
    rd = _find(results, "redis")
    if rd is not None and (ours := rd.row(OURS)) is not None:
        per_hit = ours.extra.get("cmds_per_hit")
        if isinstance(per_hit, float | int):
            out.append(
                Verdict("Redis: one command per hit", per_hit <= 1.0, f"{per_hit:.2f} per hit")
            )
        bare = rd.floor()
        if ours.value is not None and bare is not None and bare.value:
            share = bare.value / ours.value  # both µs per hit: our rate / GET's rate
            out.append(
                Verdict(
                    "Redis: hit rate ≥ 0.8 of a bare GET loop",
                    share >= 0.8,
                    f"{share:.2f} of the bare GET rate",
                )
            )
        overhead = ours.extra.get("record_overhead")
        if isinstance(overhead, int):
            out.append(
                Verdict(
                    "Redis: ≤ 64 B of record overhead beyond the encoded value",
                    overhead <= 64,
                    f"{overhead} B",
                )
            )
        procs = ours.extra.get("cross_executions")
        if isinstance(procs, int):
            out.append(
                Verdict(
                    "Redis: cold key across processes → one execution",
                    procs == 1,
                    f"{procs} execution(s) ({ours.extra.get('cross_desc', '')})",
                )
            )
    pg = _find(results, "postgres")
    if pg is not None and (ours := pg.row(OURS)) is not None:
        bare = pg.floor()
        if ours.value is not None and bare is not None and bare.value:
            share = bare.value / ours.value
            out.append(
                Verdict(
                    "PostgreSQL: hit rate ≥ 0.5 of a bare primary-key SELECT loop",
                    share >= 0.5,
                    f"{share:.2f} of the bare SELECT rate",
                )
            )
        out.extend(Verdict(c.what, c.ok, c.detail) for c in pg.checks)
    sp = _find(results, "speculation")
    if sp is not None:
        out.extend(Verdict(c.what.removeprefix("speculation: "), c.ok, c.detail) for c in sp.checks)
    return out


def _verdict_word(v: Verdict) -> str:
    return "met" if v.met else ("not measured" if v.met is None else "MISSED")


def verdict_text(vs: Sequence[Verdict]) -> str:
    lines = ["", "performance targets (docs/contract.md)"]
    lines += [f"  [{_verdict_word(v):>6}] {v.target}: {v.detail}" for v in vs]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, str]:
    versions = ", ".join(
        f"{d} {_version(d)}"
        for d in ("prefetch-ingest", "anyio", "async-lru", "aiocache", "cashews", "redis")
    )
    return {
        "cpu": f"{_cpu_model()}, {os.cpu_count()} logical CPUs",
        "os": platform.platform(),
        "python": f"{platform.python_implementation()} {sys.version.split()[0]}",
        "packages": versions,
    }


# ---------------------------------------------------------------------------
# Markdown


def _md_table(result: ScenarioResult) -> list[str]:
    if result.skipped:
        return [f"*Skipped: {result.skipped}*", ""]
    header, body = _cells(result)
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    lines.append("")
    lines += [f"{note}" for note in result.notes]
    lines.append("")
    return lines


def markdown(
    results: Sequence[ScenarioResult],
    vs: Sequence[Verdict],
    *,
    command: str,
    date: str,
    duration_s: float,
    chart: str | None,
) -> str:
    m = machine()
    lines = [
        "---",
        "orphan: true",  # a generated page; Sphinx -W must not warn that no toctree lists it
        "---",
        "",
        "# Benchmarks",
        "",
        "prefetch_ingest against async-lru, aiocache (memory), cashews (memory), "
        "`anyio.functools.lru_cache` and the floor (a `dict` lookup inside an awaited "
        "`async def`), in one process on one asyncio loop, systems interleaved, medians "
        "of several repeats. Generated by the command below; do not edit by hand. "
        "How each scenario is measured: `benchmarks/README.md`.",
        "",
        f"- **Command:** `{command}`",
        f"- **Date:** {date} (the run took {duration_s:.0f} s)",
        f"- **Machine:** {m['cpu']}; {m['os']}",
        f"- **Python:** {m['python']}",
        f"- **Packages:** {m['packages']}",
        "",
        "Ratios: `x floor` is a system's figure divided by the floor's (in the sweep, by a "
        "full scan); `x best peer` divides by the best peer that has the behaviour (the row "
        "marked). Lower is better everywhere. Where a system lacks the behaviour a scenario "
        "measures, the figure is replaced by what it lacks.",
        "",
        "## Performance targets (see [the contract](contract.md))",
        "",
        "| target | verdict | measured |",
        "|---|---|---|",
    ]
    lines += [f"| {v.target} | {_verdict_word(v)} | {v.detail} |" for v in vs]
    lines.append("")
    if chart:
        lines += [f"![benchmarks chart]({chart})", ""]
    for result in results:
        lines += [f"## {result.title}", ""]
        lines += _md_table(result)
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------
# chart


def render_chart(results: Sequence[ScenarioResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in results if not r.skipped and any(x.value is not None for x in r.rows)]
    cols = 3
    nrows = max(1, (len(shown) + cols - 1) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(16, 4.2 * nrows), squeeze=False)
    palette = {"ours": "#d1495b", "floor": "#8d99ae", "baseline": "#8d99ae", "peer": "#2e86ab"}
    for ax, result in zip(axes.flat, shown, strict=False):
        rows = [r for r in result.rows if r.value is not None]
        names = [r.system for r in rows]
        values = [r.value or 0.0 for r in rows]
        colors = [palette.get(r.role, "#2e86ab") for r in rows]
        ax.barh(names, values, color=colors)
        ax.invert_yaxis()
        spread = max(values) / max(min(v for v in values if v > 0), 1e-12) if values else 1
        if spread > 30:
            ax.set_xscale("log")
        ax.set_title(result.title.split(":")[0].split(" (")[0] + ": " + result.unit, fontsize=10)
        ax.tick_params(labelsize=8)
        for y, v in enumerate(values):
            ax.text(v, y, " " + _num(v), va="center", fontsize=7)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    fig.suptitle("prefetch_ingest vs peers (lower is better; red: prefetch_ingest)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
