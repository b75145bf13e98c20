"""How many programs of a compiled kernel one GPU runs at once: the size of one wave.

A reduction launch that runs more programs than fit at once runs a second, partial wave that costs
a whole program's time for a fraction of the work; one that runs fewer leaves SMs idle. So the
reduction kernels size their grids to exactly one wave, from the compiled kernel's registers and
shared memory and the SM's limits (CUDA's occupancy rules). The same arithmetic serves the
ahead-of-time check (tests/compile_kernels_for_hopper.py), which reads registers from the binary.
"""

from __future__ import annotations

from dataclasses import dataclass

WARP_SIZE = 32


@dataclass(frozen=True)
class SMLimits:
    """Per-SM resources of a GPU; the defaults are Hopper's (sm_90: H100, H200)."""

    sms: int = 132
    registers: int = 65536
    threads: int = 2048
    ctas: int = 32
    shared_bytes: int = 233472  # 228 KiB usable by CTAs
    register_unit: int = 256  # registers are allocated per warp in units of this many


HOPPER = SMLimits()


def ctas_per_sm(registers_per_thread: int, num_warps: int, shared_bytes: int,
                limits: SMLimits = HOPPER) -> int:
    """CTAs of a kernel that one SM holds at once (at least 1)."""
    unit = limits.register_unit
    registers_per_warp = -(-max(registers_per_thread, 1) * WARP_SIZE // unit) * unit
    by_registers = limits.registers // (registers_per_warp * num_warps)
    by_threads = limits.threads // (WARP_SIZE * num_warps)
    by_shared = limits.shared_bytes // shared_bytes if shared_bytes else limits.ctas
    return max(1, min(by_registers, by_threads, by_shared, limits.ctas))


def programs_per_wave(registers_per_thread: int, num_warps: int, shared_bytes: int,
                      limits: SMLimits = HOPPER) -> int:
    return limits.sms * ctas_per_sm(registers_per_thread, num_warps, shared_bytes, limits)


def cuda_limits(device) -> SMLimits:
    """The SM limits of a CUDA device, as torch reports them (Hopper's where it does not)."""
    import torch

    props = torch.cuda.get_device_properties(device)
    return SMLimits(
        sms=props.multi_processor_count,
        registers=getattr(props, "regs_per_multiprocessor", HOPPER.registers),
        threads=getattr(props, "max_threads_per_multi_processor", HOPPER.threads),
        shared_bytes=getattr(props, "shared_memory_per_multiprocessor", HOPPER.shared_bytes),
    )
