"""The benchmark of record's bookkeeping: runs merged into one model's section keep the
machine each command ran on (RESULTS.md names every one), and new cells replace old ones."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from run_all import _machines, _merged  # noqa: E402


def _run(command: str, machine: str, rows: dict) -> dict:
    return {"profile": "cpu", "eval_images": 900, "rows": rows, "bits": sorted({int(b) for r in rows.values()
                                                                                 for b in r["top1"]}),
            "commands": [command], "machine": machine, "wall_seconds": 10}


def test_merged_runs_keep_each_commands_machine():
    first = _run("run A", "Linux (AMD EPYC)", {"real": {"top1": {"8": [70.0, 0.0], "4": [20.0, 0.0]}}})
    second = _run("run B", "Linux (Intel Xeon)", {"real": {"top1": {"4": [25.0, 0.0]}},
                                                  "real+refine": {"top1": {"4": [30.0, 0.0]}}})
    merged = _merged(_merged(None, first), second)
    assert merged["ran_on"] == {"run A": "Linux (AMD EPYC)", "run B": "Linux (Intel Xeon)"}
    assert _machines(merged) == ["Linux (AMD EPYC)", "Linux (Intel Xeon)"]
    assert merged["rows"]["real"]["top1"] == {"8": [70.0, 0.0], "4": [25.0, 0.0]}  # the new cell replaces
    assert merged["wall_seconds"] == 20 and merged["bits"] == [8, 4]
    # the same machine again is named once
    third = _run("run C", "Linux (Intel Xeon)", {"real+refine": {"top1": {"8": [71.0, 0.0]}}})
    assert _machines(_merged(merged, third)) == ["Linux (AMD EPYC)", "Linux (Intel Xeon)"]


def test_a_section_merged_before_commands_carried_their_machine_still_names_its_one():
    legacy = dict(_run("run A", "Linux (AMD EPYC)", {"real": {"top1": {"8": [70.0, 0.0]}}}),
                  commands=["run A", "run A2"])  # two commands, one machine recorded for both
    assert _machines(legacy) == ["Linux (AMD EPYC)"]
    merged = _merged(legacy, _run("run B", "Linux (Intel Xeon)", {"real+refine": {"top1": {"8": [71.0, 0.0]}}}))
    assert merged["ran_on"] == {"run B": "Linux (Intel Xeon)"}  # nothing invented for A and A2
    assert _machines(merged) == ["Linux (AMD EPYC)", "Linux (Intel Xeon)"]
