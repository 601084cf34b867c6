"""``freed_memory_kept``: within it a large block freed and asked for again is reused without
page faults, where glibc's own settings fault it in afresh every time; after it the memory kept
goes back to the system and mid-size blocks are reused as glibc reuses them without it; the
user's own glibc settings turn it off; synthesis runs in it and its sets say so."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from dsgonnx.hardware import tunable_malloc
from dsgonnx.synth import synthesize
from zoo import export_torchscript

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc settings (Linux)")

# a fresh process: a loop of torch tensors of 40 and 256 MiB, each written and freed, inside the
# block or not; the minor page faults of each write, the resident memory after the block, and the
# page faults of 20 blocks of 8 MiB written after it
_PROBE = """
import json, resource, sys
import torch
from dsgonnx.hardware import freed_memory_kept

def resident_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmRSS:"))

def loop():
    faults = []
    for size in (40, 256, 40, 256, 40, 256):
        block = torch.empty(size * 2**20, dtype=torch.uint8)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block.fill_(1)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        del block
    return faults

start = resident_mib()
if sys.argv[1] == "kept":
    with freed_memory_kept() as applied:
        faults = loop()
        inside = resident_mib()
elif sys.argv[1] == "empty":  # the block around nothing: what it leaves behind alone
    with freed_memory_kept() as applied:
        faults, inside = [], resident_mib()
else:
    applied, faults, inside = None, loop(), resident_mib()
after = resident_mib()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # glibc's limits after the block: mid-size blocks are reused again
    block = torch.empty(8 * 2**20, dtype=torch.uint8)
    block.fill_(1)
    del block
later = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults": faults, "start": start, "inside": inside, "after": after,
                  "later": later}))
"""
_PAGES_40MIB = 40 * 2**20 // os.sysconf("SC_PAGE_SIZE")
_PAGES_8MIB = 8 * 2**20 // os.sysconf("SC_PAGE_SIZE")


def _env(**extra) -> dict:
    return {**{k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_",
                                                                 "LD_PRELOAD")}, **extra}


def _probe(mode: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env=env,
                         timeout=120, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_freed_blocks_are_reused_within_and_given_back_after():
    system = _probe("system", _env())
    kept = _probe("kept", _env())
    assert min(system["faults"]) > _PAGES_40MIB // 2  # glibc's own: every block faulted in afresh
    assert kept["applied"] is True
    assert min(kept["faults"][2:]) < _PAGES_40MIB // 20  # the loop's later blocks reuse the first ones
    assert kept["inside"] - kept["start"] >= 256  # kept resident while inside...
    assert kept["after"] - kept["start"] < 64  # ...and given back after
    # and after it, as without it, most 8 MiB blocks reuse the first ones (not 20 blocks' pages)
    empty = _probe("empty", _env())
    assert max(kept["later"], empty["later"], system["later"]) < 20 * _PAGES_8MIB // 2


def test_the_users_own_glibc_settings_turn_it_off():
    own = _probe("kept", _env(MALLOC_TRIM_THRESHOLD_="131072"))
    assert own["applied"] is False and min(own["faults"]) > _PAGES_40MIB // 2


def test_synthesis_keeps_freed_memory_and_says_so(tmp_path):
    model = export_torchscript(tmp_path / "kept.onnx", keep_bn=True)
    made = synthesize(str(model), method="dsg", iters=2, num_samples=4)
    assert made.meta["freed_memory_kept"] is (tunable_malloc() is not None)
