"""Text of a report: numbers to three significant digits in human units, tables that fit a width, footnotes.

Nothing here knows about runs: :mod:`mpiqsgd.report.tables` and
:mod:`mpiqsgd.report.projection` fill :class:`Table` s and :class:`Footnotes` with cells
made by :func:`quantity`.
"""

import textwrap
from dataclasses import dataclass, field

__all__ = ["WIDTH", "sig3", "quantity", "cell", "Footnotes", "Table", "wrap"]

WIDTH = 120  # columns of the printed report (tables and prose) unless --wide
ELLIPSIS = "…"

# Per kind of number: (scale, unit) from the smallest up; a value takes the first unit in which it is below 999.5.
_UNITS = {"bytes": ((1, "B"), (1e3, "kB"), (1e6, "MB"), (1e9, "GB"), (1e12, "TB")),
          "seconds": ((1e-6, "µs"), (1e-3, "ms"), (1, "s"), (60, "min"), (3600, "h"))}


def sig3(v):
    """``v`` to three significant digits without an exponent: ``0.585``, ``6.50``, ``123``, ``1,234``."""
    if v == 0:
        return "0"
    if abs(v) < 1e-4:
        return f"{v:.2e}"
    text = f"{v:#.3g}"
    if "e" in text or abs(v) >= 1000:
        return f"{v:,.0f}"
    return text.rstrip(".")


def _decimals(text):
    digits = text.split(" ")[0]
    return len(digits.split(".")[1]) if "." in digits and "e" not in digits else 0


def quantity(mean, std=None, kind="count"):
    """``mean`` (± ``std``, to the mean's decimals) as text.

    Args:
        kind: ``"acc"`` (three decimals), ``"ratio"`` (``8.00x``), ``"bytes"`` (B, kB, MB,
            GB), ``"seconds"`` (µs, ms, s, min, h) or ``"count"`` (a bare number); all but
            ``acc`` to three significant digits.
    """
    scale, unit = 1, ""
    for s, u in _UNITS.get(kind, ()):
        scale, unit = s, u
        if abs(mean) / s < 999.5 and (mean or s == 1):  # zero in the base unit: "0 s", not "0 µs"
            break
    text = f"{mean:.3f}" if kind == "acc" else sig3(mean / scale)
    if std is not None:
        text += f" ± {std / scale:.{_decimals(text)}f}"
    return text + ("x" if kind == "ratio" else f" {unit}" if unit else "")


def cell(stat, kind, notes):
    """A :class:`~mpiqsgd.report.stats.Stat` as a cell: :func:`quantity`, or ``n/a [k]`` with its reason noted."""
    if stat.mean is None:
        return notes.mark(stat.why)
    return quantity(stat.mean, stat.std if kind in ("acc", "seconds", "count") else None, kind)


def wrap(text, width=WIDTH, indent=""):
    """``text`` wrapped at ``width`` (None: unchanged), lines after the first indented by ``indent``."""
    if width is None:
        return text
    return "\n".join(textwrap.fill(p, width, subsequent_indent=indent, break_on_hyphens=False) if p else p
                     for p in text.split("\n"))


class Footnotes:
    """Numbered reasons for ``n/a`` cells and ``[k]`` marks."""

    def __init__(self):
        self.notes = []

    def ref(self, why):
        """``[k]``: the number of ``why`` (added if new)."""
        if why not in self.notes:
            self.notes.append(why)
        return f"[{self.notes.index(why) + 1}]"

    def mark(self, why):
        """``n/a [k]``: a missing value and why."""
        return "n/a " + self.ref(why)

    def lines(self):
        return [f"[{i}] {why}" for i, why in enumerate(self.notes, 1)]

    def text(self, markdown=False, width=WIDTH):
        if markdown:
            return "\n".join(f"- {line}" for line in self.lines())
        return "\n".join(wrap(line, width, "    ") for line in self.lines())


@dataclass
class Table:
    """A table of string cells; ``numeric`` columns are right-aligned, ``elide`` ones may be shortened to fit."""

    headers: list
    rows: list
    numeric: list  # per column: right-align
    elide: list = field(default_factory=list)  # columns whose cells may lose their middle, the first shrinks first

    def markdown(self):
        out = ["| " + " | ".join(self.headers) + " |",
               "|" + "|".join("---:" if n else "---" for n in self.numeric) + "|"]
        out += ["| " + " | ".join(str(c) for c in row) + " |" for row in self.rows]
        return "\n".join(out)

    def text(self, width=None):
        """Fixed-width lines; with ``width``, the ``elide`` columns shrink (their cells' middles become …) to fit."""
        cells = [list(self.headers)] + [[str(c) for c in row] for row in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.headers))]
        floor = {i: max(9, len(self.headers[i])) for i in self.elide}
        while width is not None and sum(widths) + 2 * (len(widths) - 1) > width:
            shrinkable = [i for i in self.elide if widths[i] > floor[i]]
            if not shrinkable:
                break
            widths[shrinkable[0]] -= 1
        lines = []
        for j, r in enumerate(cells):
            r = [c if len(c) <= w else c[:(w - 1) // 2 + (w - 1) % 2] + ELLIPSIS + c[len(c) - (w - 1) // 2:]
                 for c, w in zip(r, widths)]
            lines.append("  ".join(c.rjust(w) if n and j else c.ljust(w)
                                   for c, w, n in zip(r, widths, self.numeric)).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)
