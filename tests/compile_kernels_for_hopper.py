"""Compile every Triton kernel ahead of time for an sm_90 (H100-class) GPU, with no GPU present.

Run as a script (tests/test_kernels.py does, in a process without TRITON_INTERPRET, since the
interpreter replaces the compiler). It prints one JSON line per kernel and layout with the count of
vectorized global loads and stores in the PTX: the evidence, short of a GPU, that the compiled path
type-checks and that loads along the contiguous axis are vectorized in both layouts.

The launch arguments are specialized the way Triton's JIT specializes them at run time: strides
equal to 1 become constants, and pointers and integers divisible by 16 carry that hint.
"""

from __future__ import annotations

import inspect
import json
import os

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

assert os.environ.get("TRITON_INTERPRET") != "1", "the interpreter cannot compile kernels"

from resnet_ablate.kernels import _triton_impl as kernels  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
# Per layout: which stride suffix is 1 (the contiguous axis); every other stride and size is a
# multiple of 16 (ResNet shapes: C = 64..2048; in channels_last launches the sample stride is 0).
LAYOUTS = {"channels_last": ("_c", 64, 64), "nchw": ("_l", 1024, 4)}
DIVISIBLE_SIZES = {"C", "L", "l_blocks", "tiles_total", "tiles_per_split", "count"}
ACTIVATIONS = {"x_ptr", "residual_ptr", "out_ptr", "grad_ptr", "grad_input_ptr", "grad_residual_ptr"}


def compile_kernel(kernel, flags: dict[str, bool], layout: str) -> dict[str, object]:
    unit_suffix, block_r, block_c = LAYOUTS[layout]
    constants = {**flags, "BLOCK_R": block_r, "BLOCK_C": block_c}
    names = list(inspect.signature(kernel.fn).parameters)
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(names):
        is_stride = name.startswith("s") and name[-2:] in ("_n", "_c", "_l")
        if name in constants or (is_stride and name.endswith(unit_suffix)):
            signature[name] = "constexpr"
            constexprs[(index,)] = constants.get(name, 1)
        elif name.endswith("_ptr"):
            signature[name] = "*bf16" if name in ACTIVATIONS else "*fp32"
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name == "eps":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if is_stride or name in DIVISIBLE_SIZES:
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    ptx = triton.compile(source, target=HOPPER, options={"num_warps": 8}).asm["ptx"]
    return {"kernel": kernel.fn.__name__, "layout": layout,
            "vector_loads": ptx.count("ld.global.v"), "vector_stores": ptx.count("st.global.v")}


KERNELS = [
    (kernels._batch_stats_partial_kernel, {}),
    (kernels._batch_stats_finalize_kernel, {}),
    (kernels._forward_kernel, {"HAS_WEIGHT": True, "HAS_BIAS": True, "HAS_RESIDUAL": True,
                               "RELU": True}),
    (kernels._backward_reduce_kernel, {"RELU": True}),
    (kernels._backward_finalize_kernel, {}),
    (kernels._backward_elementwise_kernel, {"HAS_WEIGHT": True, "BATCH_STATS": True, "RELU": True,
                                            "STORE_GRAD_RESIDUAL": True}),
]

if __name__ == "__main__":
    for kernel, flags in KERNELS:
        for layout in LAYOUTS:
            print(json.dumps(compile_kernel(kernel, flags, layout)), flush=True)
