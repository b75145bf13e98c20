"""GPU time of a function with its host cost left out: launches captured in a CUDA graph, replayed.

Timed one call at a time with CUDA events, a function whose host path (Python, autograd, launch
overhead) takes longer than its kernels measures the host: the GPU waits between launches. A
graph's replay issues every captured launch at once, so the time between two events is the
kernels' own. Two figures per function:
- cold: each call preceded by a write of FLUSH_BYTES (over twice an H100/H200's L2), so that its
  inputs come from memory as in a training step, where a layer's tensors are evicted by the
  layers between; measured as the graph of (flush, call) pairs less the graph of flushes alone,
  the two replayed in turn and the median of the rounds' differences kept (a microsecond kernel
  is the difference of two figures each mostly the flush: in separate medians, their drift
  between rounds was a large part of it); the lowest and highest round beside it, so that a
  reader sees where the flush's noise is as large as the kernel (a low below zero says so);
- warm: calls back to back, a small tensor's data then staying in the L2.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import NamedTuple

import torch

FLUSH_BYTES = 128 * 2**20  # 2.5x an H100's L2 (50 MB), 2.1x an H200's (60 MB)
CALLS = 10  # captured per graph
REPLAYS = 5  # per measurement; the median of ROUNDS measurements is kept
ROUNDS = 5


class GraphTimes(NamedTuple):
    cold_ms: float  # the median round's, floored at 0
    warm_ms: float
    cold_low_ms: float  # the lowest and highest rounds', not floored
    cold_high_ms: float


def graph_times(fn: Callable[[], object], *, warmups: int = 2) -> GraphTimes:
    """Milliseconds per call of `fn`, cold and warm, from CUDA graph replays on the current
    device. `fn` must be capturable: no host synchronization, no CPU tensors read. It runs
    `warmups` times on the capture stream first (first-call allocations, cuDNN's choices and
    compiles happen outside the capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()

    def capture(body: Callable[[], None]) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(CALLS):
                body()
        return graph

    flushed = capture(lambda: (flush.zero_(), fn()))
    flushes = capture(flush.zero_)
    back_to_back = capture(fn)
    cold = [with_flush - alone for with_flush, alone in zip(*_rounds_ms((flushed, flushes)))]
    warm = statistics.median(*_rounds_ms((back_to_back,)))
    return GraphTimes(cold_ms=max(statistics.median(cold), 0.0), warm_ms=warm,
                      cold_low_ms=min(cold), cold_high_ms=max(cold))


def _rounds_ms(graphs: tuple[torch.cuda.CUDAGraph, ...]) -> list[list[float]]:
    """Each graph's milliseconds per captured call in each of ROUNDS rounds, the graphs replayed
    in turn within a round."""
    for graph in graphs:
        graph.replay()  # uploads the graph: its first replay costs more
    samples: list[list[float]] = [[] for _ in graphs]
    for _ in range(ROUNDS):
        for graph, taken in zip(graphs, samples):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(REPLAYS):
                graph.replay()
            end.record()
            end.synchronize()
            taken.append(start.elapsed_time(end) / (REPLAYS * CALLS))
    return samples
