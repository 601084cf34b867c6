"""Synthesis over two CPU processes with torchrun (gloo): one output, the same images as one
process making the same batches, and bad launches that stop every rank with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

from dsgonnx import SyntheticSet
from dsgonnx_cli.main import cli
from zoo import export_torchscript

BIN = Path(sys.executable).parent
TORCHRUN = BIN / "torchrun"
pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this python")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    return {"kept": export_torchscript(folder / "kept.onnx", keep_bn=True),
            "folded": export_torchscript(folder / "folded.onnx", keep_bn=False)}


def _env() -> dict:
    # one thread per process on both sides, so that float sums run in the same order
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _torchrun(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", *map(str, args)],
                          capture_output=True, text=True, env=_env(), timeout=timeout)


def _alone(*args) -> Result:
    """``dsgonnx *args`` in this process with one torch thread, as each rank runs: the one
    process the split runs are compared with (a process of its own would spend as long again
    importing torch, onnx2torch and ORT as the run takes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return CliRunner().invoke(cli, [str(a) for a in args])
    finally:
        torch.set_num_threads(threads)


def _ranked_script(tmp_path: Path, argv_by_rank: str) -> Path:
    """A launcher whose dsgonnx arguments depend on the rank (``argv_by_rank``: Python that
    sets ``argv`` from ``rank``), for launches that go wrong."""
    script = tmp_path / "launch.py"
    script.write_text("import os, sys\nfrom dsgonnx_cli.main import main\nrank = int(os.environ['RANK'])\n"
                      f"{argv_by_rank}\nsys.argv = ['dsgonnx', *argv]\nmain()\n")
    return script


@pytest.mark.parametrize("method", ["dsg", "inversion"])
def test_two_ranks_write_one_set_equal_to_one_process_making_the_same_batches(tiny, tmp_path, method):
    model = tiny["kept"] if method == "dsg" else tiny["folded"]
    # 12 samples in all, the last 4 held out: two ranks of 6 each, as one process in batches of 6
    common = ["--num-samples", "8", "--holdout", "4", "--iters", "4", "--device", "cpu", "--method", method,
              "--preprocess", "imagenet"]
    two = tmp_path / "two.npz"
    launched = _torchrun(BIN / "dsgonnx", "synthesize", model, "-o", two, *common)
    assert launched.returncode == 0, launched.stderr[-2000:]
    assert launched.stdout.count('"output"') == 1  # rank 0 alone reports
    one = tmp_path / "one.npz"
    alone = _alone("synthesize", model, "-o", one, *common, "--batch-size", "6", "--quiet")
    assert alone.exit_code == 0, alone.output
    together, single = SyntheticSet.load(two), SyntheticSet.load(one)
    assert together.images.shape == (8, 3, 16, 16) and together.holdout.shape == (4, 3, 16, 16)
    assert together.meta["ranks"] == 2 and together.meta["holdout"] == 4
    np.testing.assert_array_equal(together.images, single.images)
    np.testing.assert_array_equal(together.holdout, single.holdout)
    assert together.meta["target_classes"] == single.meta["target_classes"]
    if method == "inversion":  # one target class per sample, split as the images are
        assert len(together.meta["target_classes"]) == 8 and len(together.meta["holdout_target_classes"]) == 4
    made = np.concatenate([together.images, together.holdout])
    assert not np.allclose(made[:6], made[6:])  # the ranks made different batches


def test_quantize_under_torchrun_writes_one_model_from_rank_0(tiny, tmp_path):
    out = tmp_path / "q.onnx"
    launched = _torchrun(BIN / "dsgonnx", "quantize", tiny["kept"], "-o", out, "--num-samples", "8", "--iters", "2",
                         "--device", "cpu", "--no-validate")
    assert launched.returncode == 0, launched.stderr[-2000:]
    summary = json.loads(launched.stdout)
    assert summary["output"] == str(out) and out.exists()
    assert "rank 1 made its share of the calibration images" in launched.stderr


def test_ranks_that_disagree_on_arguments_all_stop_with_one_line(tiny, tmp_path):
    out = tmp_path / "x.npz"
    script = _ranked_script(tmp_path, f"argv = ['synthesize', {str(tiny['kept'])!r}, '-o', {str(out)!r}, "
                                      "'--num-samples', '4', '--iters', '1', '--device', 'cpu', '--seed', str(rank)]")
    launched = _torchrun(script)
    assert launched.returncode != 0
    lines = [line for line in launched.stderr.splitlines() if "the ranks disagree on the synthesis settings" in line]
    assert len(lines) == 2 and all(line.startswith("dsgonnx: error:") for line in lines)
    assert "rank 1 differs from rank 0" in lines[0]
    assert not out.exists()


def test_a_failing_rank_stops_every_rank_and_nothing_is_written(tiny, tmp_path):
    out = tmp_path / "x.npz"
    script = _ranked_script(tmp_path, f"model = {str(tiny['kept'])!r} if rank == 0 else 'missing.onnx'\n"
                                      f"argv = ['synthesize', model, '-o', {str(out)!r}, '--num-samples', '4', "
                                      "'--iters', '1', '--device', 'cpu']")
    launched = _torchrun(script)
    assert launched.returncode != 0
    errors = [line for line in launched.stderr.splitlines() if line.startswith("dsgonnx: error:")]
    assert any("missing.onnx" in line and "rank" not in line for line in errors)  # rank 1's own error
    assert any("rank 1 of 2 failed" in line for line in errors)  # rank 0 names it
    assert not out.exists() and not list(tmp_path.glob("*.npz*"))


def _initializers(path: Path) -> dict:
    import onnx
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


QAT = ["--w4a4", "--num-samples", "24", "--qat", "--qat-iters", "12", "--qat-batch-size", "8", "--qat-lr", "1e-3",
       "--no-fallback", "--no-validate", "--device", "cpu", "--force"]


@pytest.fixture(scope="module")
def calib(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    images = np.random.default_rng(0).normal(size=(24, 3, 16, 16)).astype(np.float32)
    np.savez(path, images=images)
    return path


def _split_and_alone(tiny, calib, tmp_path, args: list, first_learning_flag: str):
    """Quantize with ``args`` under torchrun (2 ranks) and in one process, and with plain nearest
    rounding; returns (split run, its integers that differ from one process's, integers that
    differ from nearest rounding, integers in all)."""
    two, one = tmp_path / "two.onnx", tmp_path / "one.onnx"
    launched = _torchrun(BIN / "dsgonnx", "quantize", tiny["kept"], "-o", two, "--calib", calib, *args)
    assert launched.returncode == 0, launched.stderr[-2000:]
    assert launched.stdout.count('"output"') == 1  # rank 0 alone reports and writes
    assert "rank 1 trained on its share of each batch" in launched.stderr
    alone = _alone("quantize", tiny["kept"], "-o", one, "--calib", calib, *args)
    assert alone.exit_code == 0, alone.output
    start = _alone("quantize", tiny["kept"], "-o", tmp_path / "plain.onnx", "--calib", calib,
                   *args[: args.index(first_learning_flag)], "--no-validate", "--device", "cpu", "--rounding", "nearest")
    assert start.exit_code == 0, start.output
    split, whole, plain = _initializers(two), _initializers(one), _initializers(tmp_path / "plain.onnx")
    integers = [name for name in whole if name.endswith("_quantized") and whole[name].dtype != np.int32]
    assert integers and split.keys() == whole.keys()
    differ = sum(int((split[n] != whole[n]).sum()) for n in integers)
    moved = sum(int((plain[n] != whole[n]).sum()) for n in integers if n in plain and plain[n].shape == whole[n].shape)
    return launched, (split, whole), differ, moved, sum(whole[n].size for n in integers)


def test_qat_under_torchrun_splits_each_batch_and_trains_the_model_one_process_trains(tiny, calib, tmp_path):
    _, (split, whole), differ, moved, total = _split_and_alone(tiny, calib, tmp_path, QAT, "--qat")
    # the same steps as one process on the whole batch (gradients summed in another order:
    # a weight within float rounding of a rounding boundary may land on the other integer)
    assert moved > 20 * max(differ, 1) and differ <= total // 200, (differ, moved, total)
    for name, value in whole.items():
        if value.dtype == np.float32:
            np.testing.assert_allclose(split[name], value, rtol=1e-3, atol=1e-6, err_msg=name)


def test_qat_with_a_generator_under_torchrun_is_refused_on_every_rank_and_nothing_is_written(tiny, calib, tmp_path):
    out = tmp_path / "gen.onnx"
    launched = _torchrun(BIN / "dsgonnx", "quantize", tiny["kept"], "-o", out, "--calib", calib, *QAT,
                         "--qat-data", "generator")
    assert launched.returncode != 0
    errors = [line for line in launched.stderr.splitlines() if line.startswith("dsgonnx: error:")]
    assert len(errors) == 2 and all("does not split over torchrun's ranks" in line for line in errors), errors
    assert not out.exists() and not list(tmp_path.glob("*.onnx*"))


def test_qat_under_torchrun_stops_on_its_time_budget_together_and_resumes_from_rank_0s_checkpoint(tiny, calib, tmp_path):
    checkpoint, out = tmp_path / "qat.pt", tmp_path / "resumed.onnx"
    common = ["quantize", tiny["kept"], "--calib", calib, *QAT, "--qat-checkpoint", checkpoint]
    stopped = _torchrun(BIN / "dsgonnx", *common, "-o", tmp_path / "stopped.onnx", "--qat-time-budget", "1e-9")
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert json.loads(stopped.stdout)["qat"]["stopped"] == "time budget" and checkpoint.exists()
    resumed = _torchrun(BIN / "dsgonnx", *common, "-o", out, "--qat-resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads(resumed.stdout)["qat"]
    assert summary["resumed_from"] == 0 and summary["steps"] == 12 and summary["stopped"] == "done"
    # resumed where every rank stopped, it ends where one uninterrupted process ends
    alone = _alone("quantize", tiny["kept"], "-o", tmp_path / "one.onnx", "--calib", calib, *QAT)
    assert alone.exit_code == 0, alone.output
    written, whole = _initializers(out), _initializers(tmp_path / "one.onnx")
    for name, value in whole.items():
        np.testing.assert_allclose(written[name], value, rtol=1e-3, atol=1e-6, err_msg=name)


REFINE = ["--w4a4", "--num-samples", "24", "--refine", "brecq", "--refine-iters", "40", "--refine-lr", "1e-2",
          "--refine-batch-size", "8", "--no-fallback", "--no-validate", "--device", "cpu", "--force"]


def test_refine_under_torchrun_splits_each_batch_and_learns_the_rounding_one_process_learns(tiny, calib, tmp_path):
    # without QDrop's random drops (each rank draws its own) both runs see the same numbers
    launched, _, differ, moved, total = _split_and_alone(tiny, calib, tmp_path, [*REFINE, "--refine-drop", "0"],
                                                         "--refine")
    assert "each batch shared by 2 ranks" in launched.stderr
    # (AdaRound decides by the sign of each learned value: float order flips one only at 0; trained
    # on half of each batch without the all-reduce, 6 of these 1,368 integers came out otherwise)
    assert moved > 20 * max(differ, 1) and differ <= total // 1000, (differ, moved, total)
    # with QDrop on, the split run still trains and writes one model
    dropped = _torchrun(BIN / "dsgonnx", "quantize", tiny["kept"], "-o", tmp_path / "drop.onnx", "--calib", calib, *REFINE)
    assert dropped.returncode == 0 and dropped.stdout.count('"output"') == 1, dropped.stderr[-2000:]
    # a batch the ranks cannot share ends every rank with one line, nothing written
    small = _torchrun(BIN / "dsgonnx", "quantize", tiny["kept"], "-o", tmp_path / "small.onnx", "--calib", calib,
                      *REFINE[: REFINE.index("--refine-batch-size")], "--refine-batch-size", "1",
                      *REFINE[REFINE.index("--refine-batch-size") + 2 :])
    assert small.returncode != 0 and not (tmp_path / "small.onnx").exists()
    assert "refine: a batch of 1 samples cannot be shared by 2 ranks; raise --refine-batch-size to 2" in small.stderr


@pytest.mark.parametrize("learning", ["qat", "refine"])
def test_ranks_that_disagree_on_the_training_settings_all_stop_with_one_line(tiny, calib, tmp_path, learning):
    args, flag, what = {"qat": (QAT, "--qat-lr", "the QAT"),
                        "refine": (REFINE, "--refine-lr", "the model, grids, refine")}[learning]
    out = tmp_path / "x.onnx"
    argv = [str(a) for a in ["quantize", tiny["kept"], "-o", out, "--calib", calib, *args]]
    script = _ranked_script(tmp_path, f"argv = {argv!r}\nargv[argv.index({flag!r}) + 1] = str(1e-3 * (rank + 1))")
    launched = _torchrun(script)
    assert launched.returncode != 0
    lines = [line for line in launched.stderr.splitlines() if f"the ranks disagree on {what}" in line]
    assert len(lines) == 2 and all(line.startswith("dsgonnx: error:") for line in lines), launched.stderr[-2000:]
    assert not out.exists()
