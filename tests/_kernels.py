"""Whether torch's CPU kernels here sum in the same order as the run that wrote the golden files.

The official files under ``tests/data/official`` were written with torch 2.13.0 on one CPU
thread. On an AVX-512 CPU torch takes the same fp32 kernel paths and this project reproduces
them to 1e-5 (bitwise for most arrays). On other instruction sets (AVX2) the matmul kernels
reassociate their sums: each result moves by an ulp or two, which a planner amplifies through
its iterations and an Adam step amplifies into ``±lr`` where a gradient is near zero. Tests
check the strict bounds where the kernels match and documented cross-ISA bounds everywhere.
"""

from __future__ import annotations

import torch

#: The instruction set of torch's CPU kernels in the run that wrote the golden files.
REFERENCE_ISA = "AVX512"

#: True when this machine's torch kernels are those of the reference run.
SAME_KERNELS = torch.backends.cpu.get_cpu_capability() == REFERENCE_ISA

#: Why a strict, same-kernels check does not run here.
NOT_SAME_KERNELS = (
    f"torch's CPU kernels here are {torch.backends.cpu.get_cpu_capability()}, the golden files "
    f"were written with {REFERENCE_ISA} ones; the cross-ISA bounds are checked instead"
)
