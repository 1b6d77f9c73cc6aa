"""``mpiqsgd report --link``: each run's communication seconds per step projected onto other links.

The projection itself (alpha-beta, per rank or on one shared link) is
:func:`mpiqsgd.linkmodel.project`; this module puts it beside the measured seconds.
"""

from dataclasses import dataclass
from typing import Optional

from .runs import codec_label, configuration
from .text import WIDTH, Footnotes, Table, quantity, wrap

__all__ = ["Projection", "PROJECTION_NOTE"]

PROJECTION_NOTE = ("PROJECTION, not a measurement: each rank's counted messages (comm.json) serialized on "
                   "{where}, t = alpha + bytes / beta per message (an allreduce as 2 (n-1) messages); "
                   "per step, {which}. It ignores overlap with compute, congestion and waiting for slower "
                   "ranks. Measured: the run's own communicate (and wait) seconds per step, mean over ranks.")


@dataclass
class Projection:
    """Projected communication seconds per step of each run on each link (``--link``)."""

    links: list
    shared: bool
    source: Optional[str]
    rows: list  # (run, projection dict of linkmodel.project, or None when the run has no comm.json)
    intra: Optional[object] = None  # the Link of bytes inside a node, or None

    @classmethod
    def of(cls, runs, links, shared, source, intra=None):
        from ..linkmodel import project

        return cls(links, shared, source,
                   [(r, project(r.comm, r.steps, links, shared, intra) if r.comm and r.comm.get("per_rank")
                     else None) for r in runs], intra)

    def table(self, notes, wide=True):
        """The projection table; ``wide`` spells its headers out (``projected s/step LINK``)."""
        headers = ["run", "codec", "topology", "ranks", "msgs/step", "bytes/step"]
        if wide:
            headers += ["measured comm s/step", "measured wait s/step"]
            headers += [f"projected s/step {link.label}" for link in self.links]
        else:
            headers += ["comm", "wait"] + [f"on {link.label}" for link in self.links]
        rows = []
        for run, p in self.rows:
            phases = run.summary.get("seconds_per_phase", {})
            measured = [quantity(phases[k] / run.timed_steps, kind="seconds") if k in phases else
                        "-" if k == "wait" and not run.flags.get("overlap") else  # no overlap, no wait phase
                        notes.mark(f"no {k} seconds in summary.json") for k in ("communicate", "wait")]
            if p is None:
                cells = [notes.mark("no comm.json with per-rank counts")] * (2 + len(self.links))
            else:
                cells = [quantity(p["messages_per_step"]), quantity(p["bytes_per_step"], kind="bytes")]
                cells += [quantity(p["seconds_per_step"][link.label], kind="seconds") for link in self.links]
            cfg = configuration(run)
            rows.append([run.name, codec_label(cfg), cfg["topology"], cfg["ranks"]] + cells[:2] + measured
                        + cells[2:])
        return Table(headers, rows, [False] * 3 + [True] * (len(headers) - 3), elide=[0, 1, 2])

    def note(self, wide=True):
        where = "one link shared by all ranks" if self.shared else "its own link (one per rank)"
        which = "all ranks' messages" if self.shared else "the slowest rank (msgs/step, bytes/step are its own)"
        links = "; ".join(f"{link.label}: alpha {link.alpha * 1e6:.1f} us, beta {link.beta / 1e6:.3g} MB/s "
                          f"({link.beta * 8 / 1e6:.4g} Mbit/s)" for link in self.links)
        source = f" alpha/beta from {self.source}." if self.source else \
            " No --link-model: latency 0 unless given as RATE@LATENCY."
        columns = "" if wide else " Columns comm and wait: measured seconds per step; on LINK: projected."
        if self.intra is not None:
            columns += (f" Bytes inside a node (a hierarchical run's node-* phases) are priced on {self.intra.label} "
                        f"({self.intra.beta / 1e9:.3g} GB/s), the network link carries the rest; bytes/step: "
                        "the network's.")
        return PROJECTION_NOTE.format(where=where, which=which) + columns + f" Links: {links}." + source

    def sections(self, fmt="text", width=WIDTH):
        """Title, table, note and footnotes in ``fmt`` (``text``, ``wide`` or ``markdown``)."""
        md = fmt == "markdown"
        notes = Footnotes()
        table = self.table(notes, wide=fmt != "text")
        out = [("## " if md else "") + "Projected communication time per step (projection, alpha-beta model)",
               table.markdown() if md else table.text(width if fmt == "text" else None),
               wrap(self.note(fmt != "text"), None if md else width)]
        if notes.notes:
            out.append(notes.text(md, width))
        return out

    def csv_rows(self):
        out = []
        for run, p in self.rows:
            phases = run.summary.get("seconds_per_phase", {})
            d = {"run": str(run.path), **configuration(run), "shared_link": self.shared,
                 "measured_communicate_seconds_per_step": phases.get("communicate", 0) / run.timed_steps,
                 "measured_wait_seconds_per_step": phases.get("wait", 0) / run.timed_steps}
            if p is not None:
                d.update(rank=p["rank"], messages_per_step=p["messages_per_step"], bytes_per_step=p["bytes_per_step"])
                d.update({f"projected_seconds_per_step_{k}": v for k, v in p["seconds_per_step"].items()})
            out.append(d)
        return out
