"""CPU ISA detection for the report (and for quantize's reduce_range choice)."""

from __future__ import annotations

import platform

from dsgonnx.hardware import cpu_info, needs_reduce_range, parse_cpuinfo

ICELAKE = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512dq avx512_vnni
processor\t: 1
model name\t: ignored second core
flags\t\t: fpu
"""
ALDERLAKE = "model name : 12th Gen Intel(R) Core(TM) i7-12700\nflags : sse2 avx avx2 avx_vnni\n"
HASWELL = "model name : Intel(R) Xeon(R) CPU E5-2680 v3\nflags : sse2 avx avx2 fma\n"
GRAVITON = "processor : 0\nBogoMIPS : 243.75\nFeatures : fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics asimddp\n"


def test_avx512_vnni():
    info = parse_cpuinfo(ICELAKE, machine="x86_64")
    assert (info.avx2, info.avx512, info.vnni) == (True, True, True)
    assert info.model == "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz"  # first processor wins
    assert info.isa_summary() == "AVX2 AVX-512 VNNI"
    assert not needs_reduce_range(info)


def test_avx_vnni_without_avx512():
    info = parse_cpuinfo(ALDERLAKE, machine="x86_64")
    assert (info.avx2, info.avx512, info.vnni) == (True, False, True)
    assert info.isa_summary() == "AVX2 VNNI" and not needs_reduce_range(info)


def test_avx2_only_needs_reduce_range():
    info = parse_cpuinfo(HASWELL, machine="x86_64")
    assert info.to_dict() == {
        "machine": "x86_64", "model": "Intel(R) Xeon(R) CPU E5-2680 v3", "isa": "AVX2",
        "avx2": True, "avx512": False, "vnni": False,
    }
    assert needs_reduce_range(info)


def test_unknown_flags_are_reported_as_unknown(tmp_path):
    info = cpu_info(str(tmp_path / "no-such-cpuinfo"))
    assert info.flags is None
    if info.is_x86:
        assert info.isa_summary() == "unknown" and info.vnni is None and needs_reduce_range(info)
    x86_no_flags = parse_cpuinfo("model name : something\n", machine="x86_64")
    assert x86_no_flags.to_dict()["isa"] == "unknown" and x86_no_flags.avx2 is None


def test_arm_has_no_x86_extensions():
    info = parse_cpuinfo(GRAVITON, machine="aarch64")
    assert (info.avx2, info.avx512, info.vnni) == (False, False, False)
    assert info.isa_summary() == "none (not x86: aarch64)" and not needs_reduce_range(info)


def test_this_machine():
    info = cpu_info()
    assert info.machine == (platform.machine() or "unknown")
    assert isinstance(info.isa_summary(), str) and info.isa_summary()
