"""The reference figures the chapters quote: one table, `reference_figures.json`, beside this file.

A figure measured by ``bench/`` (CPU per delivery, loopback round trip, memory per connection)
is never typed into a chapter's prose: a cell renders it from this table, which names the
regime it was measured in and the run it comes from::

    from figures import quote
    display(Markdown(f"In a burst a delivery costs {quote('cpu_ws_burst_n100')}."))

renders "In a burst a delivery costs 4.63 µs (server CPU per WebSocket delivery; burst of 1000
messages, N=100; bench/README.md, ...)". ``value(key)`` gives the number for
arithmetic. A key that is not in the table raises ``KeyError`` naming the keys there are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

TABLE = Path(__file__).with_name("reference_figures.json")


@dataclass(frozen=True)
class Figure:
    key: str
    quantity: str
    regime: str
    value: float
    unit: str
    source: str

    def number(self) -> str:
        """The value as the table writes it (no rounding, no trailing ``.0`` added or lost)."""
        return f"{self.value:g}"


def table() -> dict[str, Figure]:
    """Every reference figure, by key (read from ``reference_figures.json`` on each call)."""
    rows = json.loads(TABLE.read_text(encoding="utf-8"))["figures"]
    return {key: Figure(key=key, **row) for key, row in rows.items()}


def figure(key: str) -> Figure:
    figures = table()
    if key not in figures:
        raise KeyError(f"{key!r} is not a reference figure; there are: {', '.join(figures)}")
    return figures[key]


def value(key: str) -> float:
    """The figure's value, for arithmetic in a cell (its unit is ``figure(key).unit``)."""
    return figure(key).value


def quote(key: str, *, source: bool = True) -> str:
    """The figure as prose: "4.63 µs (quantity; regime; source)"; without the source if asked."""
    f = figure(key)
    where = f"; {f.source}" if source else ""
    return f"{f.number()} {f.unit} ({f.quantity}; {f.regime}{where})"
