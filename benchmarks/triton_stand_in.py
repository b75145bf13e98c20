"""Triton's launch path on a machine without a GPU: a stand-in for the CUDA driver.

Installed (`install()`, before the kernels are first launched, in a process without
TRITON_INTERPRET), it makes `kernel[grid](...)` run all of Triton's own host work for an H100
(binding and specializing the arguments, the cache key, compiling for sm_90 on a first call, the
launch metadata) and hands the result to a stand-in launcher, which reads every tensor's address
as the real one does and records the call instead of launching. So host costs that include
Triton's launch path can be measured here (benchmarks/bench_host.py --launches stand-in), and
what the kernels' own launches pass the launcher can be compared with what Triton's would pass
(tests/test_kernels.py). The real launcher's C work after that is not included.
"""

from __future__ import annotations

from typing import Any

import torch

HOPPER_SHARED_MEMORY = 232448  # bytes a block may use on an H100 (sm_90)
STREAM = 7  # the stand-in's current stream, passed through to the launcher


class Launch:
    """One launcher call as the stand-in received it."""

    def __init__(self, grid, stream, function, packed_metadata, launch_metadata, hooks, args):
        self.grid, self.stream, self.function = grid, stream, function
        self.packed_metadata, self.launch_metadata, self.hooks = packed_metadata, launch_metadata, hooks
        self.args = args

    @property
    def through_jit(self) -> bool:
        """Whether Triton's JITFunction.run made it (it always builds launch metadata)."""
        return self.launch_metadata is not None


class StandInDriver:
    """The parts of Triton's active driver that compiling and launching use."""

    def __init__(self) -> None:
        self.launches: list[Launch] | None = None  # a list to record into, or None
        self.utils = self._Utils()

    class _Utils:
        @staticmethod
        def load_binary(name, kernel, shared, device):
            return 1, 1, 64, 0, 1024  # module, function, registers, spills, threads

        @staticmethod
        def unload_module(module) -> None:
            """Nothing was loaded: `load_binary` only made up its handles."""

        @staticmethod
        def get_device_properties(device) -> dict[str, int]:
            return {"max_shared_mem": HOPPER_SHARED_MEMORY, "multiprocessor_count": 132}

    def launcher_cls(self, src, metadata):
        # The real launcher reads each pointer argument's address (its C code, from the
        # signature): so does this one, and it checks that every argument is there.
        types = list(src.signature.values())
        pointers = [i for i, kind in enumerate(types) if str(kind).startswith("*")]

        def launch(grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata,
                   enter_hook, exit_hook, *args) -> None:
            if len(args) != len(types):
                raise TypeError(f"{src.name} takes {len(types)} arguments, got {len(args)}")
            for i in pointers:
                args[i].data_ptr()
            if enter_hook is not None:
                enter_hook(launch_metadata)
            if self.launches is not None:
                self.launches.append(Launch((grid_x, grid_y, grid_z), stream, function,
                                            packed_metadata, launch_metadata,
                                            (enter_hook, exit_hook), args))

        return launch

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return STREAM

    def get_current_target(self) -> Any:
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def install() -> StandInDriver:
    """Make the stand-in Triton's active driver, and let the Triton backend take CPU tensors
    (it does only under the interpreter otherwise: these launches never run)."""
    from triton.runtime.driver import driver

    from resnet_ablate.kernels import backends

    stand_in = StandInDriver()
    driver.set_active(stand_in)
    backends.TRITON_INTERPRETED = True
    return stand_in
