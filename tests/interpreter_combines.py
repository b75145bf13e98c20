"""Triton's interpreter, with its scans and reductions of user-defined combine functions run as
trees over whole arrays instead of one element at a time.

The interpreter runs `tl.associative_scan` and `tl.reduce` with a combine function of the
kernel's own (the span kernels' segmented merge, the finalize's paired sums) by calling that
function once per element on scalars, through all of Triton's per-op Python: about three
quarters of an NCHW training case's time in the kernel tests. A combine function is elementwise
by Triton's rules, so it can as well take whole arrays: a scan in log2(n) such calls
(Hillis-Steele: each step combines every element with the one `offset` before it) and a
reduction in log2(n) (adjacent pairs, the odd one carried). Both need only associativity, which
Triton requires of a combine; they associate as a GPU's trees do rather than left to right, so
float results may differ from the element-wise loop's in the last bits, as a GPU's do. The
kernel tests compare every result with PyTorch's, so a wrong tree here fails them.
"""

from __future__ import annotations

import numpy as np


_ELEMENTWISE: dict = {}  # the interpreter's own, for what the trees leave to them (empty inputs)


def _combined(combine_fn, to_tensor, dtypes, earlier: list, later: list) -> list:
    """combine(earlier, later), elementwise over arrays of one shape, as arrays of the inputs'
    dtypes (a combine may return a Python scalar, broadcast here)."""
    tensors = [to_tensor(a, dtype) for a, dtype in zip(earlier, dtypes)] \
        + [to_tensor(b, dtype) for b, dtype in zip(later, dtypes)]
    returned = combine_fn.fn(*tensors)
    returned = returned if isinstance(returned, tuple) else (returned,)
    shape = earlier[0].shape
    return [np.broadcast_to(np.asarray(getattr(getattr(r, "handle", None), "data", r)), shape)
            .astype(a.dtype) for r, a in zip(returned, earlier)]


def _along(array: np.ndarray, axis: int, start: int | None, stop: int | None,
           step: int | None) -> np.ndarray:
    index = [slice(None)] * array.ndim
    index[axis] = slice(start, stop, step)
    return array[tuple(index)]


def tree_scan(self, input) -> list:
    """ScanOps.generic_scan, as a Hillis-Steele scan."""
    if input[0].handle.data.size == 0:
        return _ELEMENTWISE["scan"](self, input)
    dtypes = [arg.dtype for arg in input]
    arrays = [np.array(arg.handle.data) for arg in input]
    axis = self.axis % arrays[0].ndim
    n = arrays[0].shape[axis]
    position = np.arange(n).reshape([n if d == axis else 1 for d in range(arrays[0].ndim)])
    offset = 1
    while offset < n:
        # Whole arrays (Triton's blocks are powers of 2): each element with the one `offset`
        # before it, rolled round; the first `offset` keep their values.
        combined = _combined(self.combine_fn, self.to_tensor, dtypes,
                             [np.roll(a, offset, axis=axis) for a in arrays], arrays)
        arrays = [np.where(position >= offset, c, a) for a, c in zip(arrays, combined)]
        offset *= 2
    return [self.to_tensor(a, dtype) for a, dtype in zip(arrays, dtypes)]


def tree_reduce(self, input) -> list:
    """ReduceOps.generic_reduce, as a reduction of adjacent pairs."""
    if input[0].handle.data.size == 0:
        return _ELEMENTWISE["reduce"](self, input)
    original_axis = self.axis
    axis = 0 if self.axis is None else self.axis % input[0].handle.data.ndim
    dtypes = [arg.dtype for arg in input]
    input_ndim = input[0].handle.data.ndim
    # axis None: over all elements, of every input (the interpreter's `unravel` flattens the
    # first alone)
    arrays = [np.array(arg.handle.data).reshape(-1) if original_axis is None
              else np.array(arg.handle.data) for arg in input]
    while arrays[0].shape[axis] > 1:
        n = arrays[0].shape[axis]
        pairs = n // 2
        combined = _combined(self.combine_fn, self.to_tensor, dtypes,
                             [_along(a, axis, 0, 2 * pairs, 2) for a in arrays],
                             [_along(a, axis, 1, 2 * pairs, 2) for a in arrays])
        if n % 2:
            combined = [np.concatenate((c, _along(a, axis, n - 1, None, None)), axis=axis)
                        for a, c in zip(arrays, combined)]
        arrays = combined
    results = []
    for array, dtype in zip(arrays, dtypes):
        data = np.squeeze(array, axis=axis)
        if self.keep_dims:
            data = np.expand_dims(data, axis) if original_axis is not None \
                else data.reshape((1,) * input_ndim)
        elif original_axis is None:
            data = data.item()
        results.append(self.to_tensor(data, dtype))
    return results


def install() -> bool:
    """Replaces the interpreter's element-at-a-time scan and reduction (where this Triton has
    them where this module expects); True where it did."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    scans, reductions = getattr(interpreter, "ScanOps", None), getattr(interpreter, "ReduceOps", None)
    if not (hasattr(scans, "generic_scan") and hasattr(reductions, "generic_reduce")):
        return False
    if scans.generic_scan is not tree_scan:  # installed once: the originals kept are Triton's
        _ELEMENTWISE.update(scan=scans.generic_scan, reduce=reductions.generic_reduce)
    scans.generic_scan = tree_scan
    reductions.generic_reduce = tree_reduce
    return True
