"""Where the fallback's probes disagreed, and which side the held-out real images took.

quantize's fallback replaces the model it keeps by the next candidate where the candidate is
at least as close to the float model on one probe and not measurably less close on any (a
paired bootstrap's 90 % interval wholly below 0 dB). This reads the checks the benchmark
recorded (``against_plain`` in benchmarks/results.json: every step's difference and interval
on each probe) and prints each step where the probes pulled in opposite directions and one
of them measurably so. Where the row kept every candidate (``…+cands``) it adds what the
held-out real images say of the two models: top-1 and logit SQNR. Nothing is run; the
figures are those of the rows.

    python benchmarks/fallback_probes.py [--results benchmarks/results.json] [--probe procedural]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def disagreements(results: dict, probe: str = "procedural images"):
    """(model, row, bits, step, the other probe's name, candidate's figures, kept model's
    figures) for each step where ``probe`` and the row's first probe differ in sign and one
    of them measurably (its interval excludes 0); figures are (top-1, SQNR dB) on the
    held-out real images, or None where the row did not score its candidates."""
    for model, table in results.items():
        for row, cells in table.get("rows", {}).items():
            for bits, checks in cells.get("against_plain", {}).items():
                scored = cells.get("candidates", {}).get(bits, [])
                for index, check in enumerate(checks):
                    models = scored[index]["models"] if index < len(scored) else {}
                    for step in check.get("steps", []):
                        probes = step["probes"]
                        if probe not in probes:
                            continue
                        first = next(name for name in probes if name != probe)
                        one, other = probes[first], probes[probe]
                        measurable = any(d["low"] > 0 or d["high"] < 0 for d in (one, other))
                        if (one["db"] > 0) == (other["db"] > 0) or not measurable:
                            continue
                        figures = [(round(models[name]["top1"], 2), round(models[name]["sqnr_db"], 2))
                                   if name in models else None for name in (step["candidate"], step["against"])]
                        yield model, row, bits, step, first, *figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(HERE / "results.json"))
    parser.add_argument("--probe", default="procedural", help="the independent probe to set against the first one")
    args = parser.parse_args(argv)
    results = json.loads(Path(args.results).read_text())
    probe = f"{args.probe} images"
    print(f"| model | row | bits | candidate vs kept | replaced | first probe dB | {args.probe} dB [90 %] | "
          "real top-1 (candidate / kept) | real SQNR dB (candidate / kept) |")
    print("|---|---|---|---|---|---|---|---|---|")
    tally = {"top-1": [0, 0], "SQNR": [0, 0]}  # scored vetoes: [the veto right, the veto wrong]
    seen = set()  # rows that repeat a computation (e.g. +bothprobes' procedural step) count once
    for model, row, bits, step, first, candidate, kept in disagreements(results, probe):
        one, other = step["probes"][first], step["probes"][probe]
        real = ("–", "–")
        if candidate and kept:
            real = (f"{candidate[0]} / {kept[0]}", f"{candidate[1]} / {kept[1]}")
            same = (model, bits, candidate, kept, other["db"])
            if not step["replaced"] and other["high"] < 0 and same not in seen:  # the probe vetoed the candidate
                seen.add(same)
                tally["top-1"][candidate[0] > kept[0]] += 1
                tally["SQNR"][candidate[1] > kept[1]] += 1
        print(f"| {model} | {row} | W{bits} | {step['candidate']} vs {step['against']} | {step['replaced']} | "
              f"{first.split()[0]} {one['db']:+.2f} | {other['db']:+.2f} [{other['low']:+.2f}, {other['high']:+.2f}] | "
              f"{real[0]} | {real[1]} |")
    for measure, (right, wrong) in tally.items():
        print(f"\nscored vetoes by the {args.probe} probe (distinct computations): the vetoed candidate better by "
              f"held-out real {measure} in {wrong} of {right + wrong}", end="")
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
