"""The README's codec table from runs of ``mpiqsgd bench codec --all --json``.

    mpiqsgd bench codec --all --json > run1.json   # repeat for more runs
    python scripts/codec_table.py run1.json [run2.json ...]   # or .json.gz

Each speed cell is the median over the runs of each run's median (of its repeats), with the
range of every repeat of every run in brackets, and the ratio to memcpy timed in the same
runs; decode writes into a reused tensor, as memcpy into its existing buffer ("new array": a
decode that allocates its output); "1 thread" is the ``scaling`` row at one numba/torch thread,
as GB/s and × memcpy. Sizes and variance come from the first run (they are seeded, the same in
every run).
"""

import gzip
import json
import statistics
import sys


def cell(results, key, range_key=None):
    med = statistics.median(r[key] for r in results)
    if range_key is None:
        return f"{med:.2f}"
    lo = min(r[range_key][0] for r in results)
    hi = max(r[range_key][1] for r in results)
    return f"{med:.2f} ({lo:.2f}–{hi:.2f})"


def one_thread(results, key):
    return statistics.median(next(row[key] for row in r["scaling"] if row["threads"] == 1) for r in results)


def one_thread_cell(results, what):
    if any(r["scaling"] is None for r in results):  # a GPU run: no CPU thread scaling
        return "-"
    return f"{one_thread(results, what + '_GBps'):.2f} ({one_thread(results, what + '_vs_memcpy'):.2f}×)"


def main(paths):
    runs = [json.load(gzip.open(p, "rt") if p.endswith(".gz") else open(p)) for p in paths]
    machine = runs[0]["machine"]
    print(f"{len(runs)} run(s) of `mpiqsgd bench codec --all`, {runs[0]['numel']:,} coordinates, median of "
          f"{runs[0]['repeats']} repeats each; {machine.get('cpu_model') or machine['processor']}, "
          f"{machine['cpu_count']} cores, {machine['device']}, torch {machine['torch']}\n")
    print("| codec | bits | encoding | encode GB/s | × memcpy | decode GB/s | × memcpy | new array GB/s "
          "| 1 thread encode | 1 thread decode | bits/coord | vs H + side | vs Elias bound | var / ‖v‖² |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i, first in enumerate(runs[0]["results"]):
        rows = [run["results"][i] for run in runs]
        sym = first["symbols"] or {}
        vs_h = f"{sym['vs_entropy']:.3f}" if sym else "-"
        vs_elias = f"{sym['vs_elias_bound']:.3f}" if "vs_elias_bound" in sym else "-"
        print(f"| {first['name']} | {first['params'].get('bits', '-')} | {sym.get('encoding', '-')} | "
              f"{cell(rows, 'encode_GBps', 'encode_GBps_range')} | {cell(rows, 'encode_vs_memcpy')} | "
              f"{cell(rows, 'decode_GBps', 'decode_GBps_range')} | {cell(rows, 'decode_vs_memcpy')} | "
              f"{cell(rows, 'decode_new_GBps')} | {one_thread_cell(rows, 'encode')} | "
              f"{one_thread_cell(rows, 'decode')} | "
              f"{first['bits_per_coordinate']:.4f} | {vs_h} | {vs_elias} | {first['variance_ratio']:.4g} |")


if __name__ == "__main__":
    main(sys.argv[1:])
