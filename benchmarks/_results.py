"""Result records shared by the scenarios, the report and the JSON output."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

__all__ = ["Check", "Row", "ScenarioResult", "median"]


@dataclass
class Row:
    """One system's figures in one scenario.

    ``value`` is the headline figure (lower is better in every scenario);
    ``None`` with ``lacks`` set when the system does not have the behaviour
    the scenario measures (the table prints the reason instead of a figure).
    """

    system: str
    role: str  # "floor", "ours", "peer", or "baseline"
    value: float | None
    lacks: str | None = None
    extra: dict[str, float | int | str] = field(default_factory=dict)
    samples: list[float] = field(default_factory=list)


@dataclass
class Check:
    """A behaviour the run verified (these, not timings, decide ``--quick``)."""

    what: str
    ok: bool
    detail: str = ""
    required: bool = True  # False: a finding about a peer, reported, never fatal


@dataclass
class ScenarioResult:
    key: str
    title: str
    unit: str
    rows: list[Row]
    #: extra columns to print: (key in Row.extra, header, format spec)
    columns: list[tuple[str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    #: the name the "x floor" column compares with (a row's system name)
    floor_name: str = "floor (dict)"
    floor_header: str = "x floor"
    skipped: str | None = None

    def row(self, system: str) -> Row | None:
        for row in self.rows:
            if row.system == system:
                return row
        return None

    def floor(self) -> Row | None:
        row = self.row(self.floor_name)
        return row if row is not None and row.value is not None else None

    def best_peer(self) -> Row | None:
        peers = [r for r in self.rows if r.role == "peer" and r.value is not None]
        return min(peers, key=lambda r: r.value or 0.0) if peers else None


def median(samples: list[float]) -> float:
    return statistics.median(samples)
