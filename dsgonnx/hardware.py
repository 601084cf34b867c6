"""Which integer-math instructions this CPU has (AVX2, AVX-512, VNNI).

Why it matters: ONNX Runtime picks its int8 kernels by CPU feature. Without VNNI
(``avx512_vnni`` or ``avx_vnni``) the x86 kernels multiply u8×s8 with ``vpmaddubsw``,
whose 16-bit intermediate sums can saturate, so the same QDQ model can give different
results on two machines. The validation report records these flags next to the accuracy,
and the quantize stage uses :func:`needs_reduce_range` to quantize weights to 7 bits
(``reduce_range=True``) where saturation is possible.

Detection reads the ``flags`` line of ``/proc/cpuinfo`` (Linux, x86). Elsewhere (macOS,
Windows, containers without /proc) the flags are *unknown* — reported as such, never
guessed. On non-x86 machines (Arm) these x86 extensions are simply absent.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from dataclasses import dataclass
from typing import Iterator

CPUINFO_PATH = "/proc/cpuinfo"
_X86_MACHINES = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})


@dataclass(frozen=True)
class CpuInfo:
    """What is known about the host CPU; ``flags is None`` means "could not tell"."""

    machine: str
    model: str | None
    flags: frozenset[str] | None

    @property
    def is_x86(self) -> bool:
        return self.machine.lower() in _X86_MACHINES

    def _has(self, *names: str) -> bool | None:
        if not self.is_x86:
            return False
        if self.flags is None:
            return None
        return any(name in self.flags for name in names)

    @property
    def avx2(self) -> bool | None:
        return self._has("avx2")

    @property
    def avx512(self) -> bool | None:
        """AVX-512 Foundation (``avx512f``), the base every other AVX-512 part needs."""
        return self._has("avx512f")

    @property
    def vnni(self) -> bool | None:
        """VNNI in either form: AVX-512 VNNI or the 256-bit AVX-VNNI of newer cores."""
        return self._has("avx512_vnni", "avx_vnni")

    def isa_summary(self) -> str:
        """``"AVX2 AVX-512 VNNI"``, ``"AVX2"``, ``"none"`` or ``"unknown"``."""
        if not self.is_x86:
            return f"none (not x86: {self.machine})"
        if self.flags is None:
            return "unknown"
        present = [name for name, has in (("AVX2", self.avx2), ("AVX-512", self.avx512), ("VNNI", self.vnni)) if has]
        return " ".join(present) or "none"

    def to_dict(self) -> dict:
        return {
            "machine": self.machine,
            "model": self.model,
            "isa": self.isa_summary(),
            "avx2": self.avx2,
            "avx512": self.avx512,
            "vnni": self.vnni,
        }


def parse_cpuinfo(text: str, machine: str | None = None) -> CpuInfo:
    """Build a :class:`CpuInfo` from the text of ``/proc/cpuinfo`` (first processor wins)."""
    machine = machine or platform.machine() or "unknown"
    model = None
    flags = None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key == "model name" and model is None:
            model = value.strip() or None
        elif key == "flags" and flags is None:
            flags = frozenset(value.split())
    return CpuInfo(machine=machine, model=model, flags=flags)


def cpu_info(path: str = CPUINFO_PATH) -> CpuInfo:
    """The host CPU's ISA flags; unknown (``flags=None``) when ``path`` cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError:
        return CpuInfo(machine=platform.machine() or "unknown", model=platform.processor() or None, flags=None)
    return parse_cpuinfo(text)


def needs_reduce_range(info: CpuInfo | None = None) -> bool:
    """Whether int8 weights should use 7 bits (onnxruntime's ``reduce_range``) on this CPU.

    True on x86 without VNNI, and on x86 whose flags are unknown (the safe choice: a 7-bit
    weight range costs a little precision but cannot saturate). False with VNNI and on
    non-x86 CPUs, whose int8 kernels do not have the u8×s8 saturation problem.
    """
    info = info or cpu_info()
    return info.is_x86 and info.vnni is not True


MEMINFO_PATH = "/proc/meminfo"


def available_memory(path: str = MEMINFO_PATH) -> int | None:
    """Bytes of memory available to new work (``MemAvailable``), or None where unknown."""
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def memory_on(device) -> int | None:
    """Bytes free for new work on the torch ``device``: the GPU's free memory on CUDA, else
    the machine's available memory (None where unknown)."""
    if device.type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    return available_memory()


# the share of the memory available that one stage's working set may take (a synthesis batch's
# activations, the activations reconstruction holds)
MEMORY_SHARE = 0.8


# what one synthetic image costs while it is made, in copies of the image: the image, its
# gradient and Adam's two moments in torch, the numpy set, and the calibration copy
IMAGE_COPIES = 6


def check_image_memory(count: int, chw: tuple[int, int, int], what: str | tuple[str, ...] = "num_samples") -> None:
    """Refuse, with the figures, a set of ``count`` float32 images of size ``chw`` that would
    not fit in the memory this machine has available (instead of an allocation error after
    minutes of work); ``what`` names the parameter (or the parameters, summed) that asked for
    them."""
    from .errors import DataError

    need = count * int(chw[0]) * int(chw[1]) * int(chw[2]) * 4 * IMAGE_COPIES
    have = available_memory()
    if have is not None and need > have:
        named = " + ".join(f"`{name}`" for name in ((what,) if isinstance(what, str) else what))
        raise DataError(f"{named} {count} images of {chw[0]}×{chw[1]}×{chw[2]} need about {size_text(need)} of memory "
                        f"while they are made and used; {size_text(have)} is available — ask for fewer")


def size_text(count: int) -> str:
    """A byte count for a message: GiB from 1 GiB up, else MiB."""
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


# glibc's mallopt parameters (malloc.h); after a block, the limits glibc's own adjustment moves
# to once a large block has been freed (its mmap threshold's ceiling on 64-bit, trim at twice
# it): any mallopt stops that adjustment, and left at the start values every block above
# 128 KiB was mapped afresh each time (20 blocks of 8 MiB written after the block: 41,021 page
# faults, against 12,328 with these limits and 14,335 in a process without the block)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_AFTER_MMAP_THRESHOLD, _AFTER_MMAP_MAX = 32 * 2**20, 65536


def tunable_malloc() -> ctypes.CDLL | None:
    """The C library where it is glibc and the user left its malloc alone (no ``MALLOC_*``
    settings of theirs, no allocator in ``LD_PRELOAD``), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    if any(os.environ.get(name) for name in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")):
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextlib.contextmanager
def freed_memory_kept() -> Iterator[bool]:
    """Within the block, glibc's malloc keeps freed memory in the process for reuse; after it,
    the limits glibc moves to by itself once a large block is freed (fixed from then on) and the
    memory kept is given back. Yields whether it applied.

    glibc serves every block above a threshold (which grows to at most 32 MiB) with fresh pages
    from the kernel and unmaps it when freed, so each large tensor torch makes on a CPU is
    first written through a page fault per 4 KB. On this project's 2-core AMD EPYC virtual
    machine an out-of-place clamp of a 42 MB activation took 35 ms that way and 2.5 ms into
    memory already mapped. Synthesis, reconstruction and QAT, which make the same large
    tensors every iteration, run in this block: the README's main command took 202 s instead
    of 293–300 s (synthesis 189 s instead of 284–288 s, peak 10.2 GB instead of 8.6 GB),
    EfficientNet-Lite0's W4A4 reconstruction 143–149 s instead of 186 s (peak 5.0 GB both
    ways), and its QAT 0.136–0.163 steps/s instead of 0.080–0.083 (peak 13.2 GB instead of
    10.4–10.6 GB), with the same models byte for byte.

    Only for a bounded loop: served from the heap, a block freed between two small ones that
    glibc's per-thread cache holds is never joined to its neighbours, and a loop asking for
    the same large block again (torch asks 64-byte alignment, a little more than the block)
    grows the heap by one block per turn (measured: 256 MiB a turn). Synthesis's mix of sizes
    reuses them: its peak grew 6.25 → 6.44 → 6.55 GB over 3, 10 and 30 iterations of 48
    images; reconstruction's did not move; QAT's levelled at 11.04 GB from the 62nd of 100
    Lite0 steps (learned steps as one node: README). Nothing changes off Linux/glibc, where
    the user set glibc's ``MALLOC_MMAP_MAX_`` or ``MALLOC_TRIM_THRESHOLD_``, or where an
    allocator is preloaded (``LD_PRELOAD``).
    """
    libc = tunable_malloc()
    if libc is None:
        yield False
        return
    applied = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    try:
        yield applied
    finally:
        libc.mallopt(_M_MMAP_MAX, _AFTER_MMAP_MAX)
        libc.mallopt(_M_MMAP_THRESHOLD, _AFTER_MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * _AFTER_MMAP_THRESHOLD)
        libc.malloc_trim(0)
