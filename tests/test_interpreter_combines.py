"""The tests' interpreter scans and reductions (interpreter_combines.py) against Triton's own
element-at-a-time ones, with a combine that is associative but not commutative (composition of
affine maps, in integers: exact whatever the association), so that a tree that combined its
elements in the wrong order, or one off, gives other numbers."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the interpreter runs only without a GPU")

triton = pytest.importorskip("triton")
tl = triton.language
interpreter = pytest.importorskip("triton.runtime.interpreter")
import interpreter_combines  # noqa: E402


@triton.jit
def _compose(a_scale, a_shift, b_scale, b_shift):
    """(b after a) of x -> scale * x + shift: associative, not commutative."""
    return a_scale * b_scale, a_shift * b_scale + b_shift


@triton.jit
def _scan_and_reduce_kernel(scale_ptr, shift_ptr, scanned_ptr, reduced_ptr, kept_ptr,
                            ROWS: tl.constexpr, COLS: tl.constexpr):
    rows, cols = tl.arange(0, ROWS), tl.arange(0, COLS)
    offsets = rows[:, None] * COLS + cols[None, :]
    scale, shift = tl.load(scale_ptr + offsets), tl.load(shift_ptr + offsets)
    scanned_scale, scanned_shift = tl.associative_scan((scale, shift), 1, _compose)
    tl.store(scanned_ptr + offsets, scanned_scale * 1000 + scanned_shift)
    reduced_scale, reduced_shift = tl.reduce((scale, shift), 0, _compose)
    tl.store(reduced_ptr + cols, reduced_scale * 1000 + reduced_shift)
    kept_scale, kept_shift = tl.reduce((scale, shift), 1, _compose, keep_dims=True)
    tl.store(kept_ptr + rows[:, None], kept_scale * 1000 + kept_shift)


def _run(rows: int, cols: int, seed: int, reversed_rows: bool = False) -> list[torch.Tensor]:
    """The kernel's outputs on seeded maps; with `reversed_rows`, each row's maps in the
    opposite order."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.randint(-1, 2, (rows, cols), generator=generator, dtype=torch.int64)
    shift = torch.randint(-3, 4, (rows, cols), generator=generator, dtype=torch.int64)
    if reversed_rows:
        scale, shift = scale.flip(1).contiguous(), shift.flip(1).contiguous()
    outputs = [torch.empty(rows, cols, dtype=torch.int64), torch.empty(cols, dtype=torch.int64),
               torch.empty(rows, dtype=torch.int64)]
    _scan_and_reduce_kernel[(1,)](scale, shift, *outputs, ROWS=rows, COLS=cols)
    return outputs


@pytest.mark.parametrize("rows, cols", [(1, 1), (2, 8), (8, 2), (4, 16), (16, 64)])
def test_trees_give_the_interpreters_own_results(monkeypatch, rows, cols):
    assert interpreter_combines.install()  # as conftest does (again: it only replaces methods)
    trees = _run(rows, cols, seed=rows * cols)
    monkeypatch.setattr(interpreter.ScanOps, "generic_scan",
                        interpreter_combines._ELEMENTWISE["scan"])
    monkeypatch.setattr(interpreter.ReduceOps, "generic_reduce",
                        interpreter_combines._ELEMENTWISE["reduce"])
    one_at_a_time = _run(rows, cols, seed=rows * cols)
    for tree, reference in zip(trees, one_at_a_time):
        np.testing.assert_array_equal(tree.numpy(), reference.numpy())
    # A scan's last element is the reduction along its axis.
    np.testing.assert_array_equal(trees[0][:, -1].numpy(), trees[2].numpy())


def test_the_combine_depends_on_the_order():
    """Else the comparison above could not see a tree that combined in the wrong order."""
    forward = _run(4, 16, seed=3)[2]
    assert not torch.equal(forward, _run(4, 16, seed=3, reversed_rows=True)[2])
