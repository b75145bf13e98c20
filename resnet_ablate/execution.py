"""How a training run executes on its device: precision, memory format, compilation, CUDA graphs.

A recipe names these choices (`TrainRecipe.precision`, `.memory_format`, `.compile`,
`.cuda_graphs`), "auto" where the best one depends on the device and the run;
`resolve_execution` turns them into an `Execution` for one run on one device, refusing what that
device cannot do. They change how fast a trial trains, not what it trains: bf16 and fp16 autocast
round the convolutions' inputs, which moves results within seed-to-seed noise, and the rest is
exact.

The defaults: bf16 autocast on GPUs that have bf16, fp32 elsewhere. On a CPU bf16 is an opt-in:
it ran the digits networks 8-11% faster on this project's AVX512-BF16 development machine
(benchmarks/bench_trial.py, variant project+bf16), but a default that followed the CPU's
instructions would give one spec different numbers on different machines. channels_last
everywhere, the layout that cuDNN's fastest convolutions and the Triton kernels' vector loads
want, and that oneDNN ran the digits networks 1-7% faster in it than in NCHW
(benchmarks/bench_trial.py measures it). CUDA graphs wherever a graph can capture the step: a
fused layer issues its launches from Python (tens of microseconds of host time where eager
PyTorch's BN + add + ReLU takes about as many, benchmarks/bench_host.py), which a replayed graph
pays once at capture, and the small CIFAR networks' steps are otherwise bound by such host time.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .recipe import TrainRecipe
from .record import ExecutionRecord

_AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Execution:
    """The resolved choices of one run on one device (no "auto" left)."""

    device: str
    precision: str  # fp32 | bf16 | fp16
    memory_format: str  # channels_last | nchw
    compile: bool
    cuda_graphs: bool
    # Where training crops are decoded: "cpu" or "gpu" for a streamed data set (recipe.decode),
    # "none" for an in-memory one.
    decode: str = "none"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return _AUTOCAST_DTYPES[self.precision]

    @property
    def torch_memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.memory_format == "channels_last" else torch.contiguous_format

    @property
    def scales_gradients(self) -> bool:
        """fp16 needs a gradient scaler: its gradients underflow where bf16's and fp32's do not.
        With fused SGD the scaler's overflow check stays on the device (no host read)."""
        return self.precision == "fp16"

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Autocast to the run's precision (nothing for fp32)."""
        dtype = self.autocast_dtype
        with torch.autocast(torch.device(self.device).type, dtype=dtype, enabled=dtype is not None):
            yield

    def images(self, batch: torch.Tensor) -> torch.Tensor:
        """A batch of images in the run's memory format (no copy when it already is)."""
        return batch.contiguous(memory_format=self.torch_memory_format) if batch.dim() == 4 else batch

    def record(self, stacked_seeds: int = 1) -> ExecutionRecord:
        """What a run's result records of it (with the seeds it trained beside, stacked)."""
        return ExecutionRecord(self.device, self.precision, self.memory_format, self.compile,
                               self.cuda_graphs, self.decode, stacked_seeds)


def cuda_graphs_by_default(on_cuda: bool, in_memory: bool, processes: int, precision: str,
                           compile: bool) -> bool:
    """What `cuda_graphs: auto` resolves to. What a graph captures must be the same every step:
    batches of one shape from memory (a streamed set's loader is outside), one process (replicas
    reweight their losses), no gradient scaler (fp16's per-step state), and not a compiled model
    (whose own graphs and guards are torch.compile's business). `precision` may be "auto", which
    is never fp16."""
    return on_cuda and in_memory and processes == 1 and precision != "fp16" and not compile


def resolve_execution(recipe: TrainRecipe, device: torch.device | str, *, in_memory: bool = True,
                      processes: int = 1, gpu_decoder: bool = False) -> Execution:
    """The recipe's choices for one run on `device` (its data set `in_memory` or streamed, its
    replicas' `processes`, whether a GPU JPEG decoder is installed for it: `gpu_decoder`),
    "auto" resolved; a ValueError names one it cannot run."""
    precision, memory_format = recipe.precision, recipe.memory_format
    compile, cuda_graphs = recipe.compile, recipe.cuda_graphs
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    bf16_ok = on_cuda and torch.cuda.is_bf16_supported(including_emulation=False)
    if precision == "auto":
        precision = "bf16" if bf16_ok else "fp32"
    elif precision == "bf16" and on_cuda and not bf16_ok:
        raise ValueError(
            f"precision bf16 needs a GPU with bfloat16 (compute capability 8.0 or newer); "
            f"{torch.cuda.get_device_name(device)} has none: use fp16 or fp32"
        )
    if cuda_graphs == "auto":
        cuda_graphs = cuda_graphs_by_default(on_cuda, in_memory, processes, precision, compile)
    if cuda_graphs and not on_cuda:
        raise ValueError(f"cuda_graphs needs a CUDA device, and this run is on {device.type}")
    if cuda_graphs and precision == "fp16":
        raise ValueError(
            "cuda_graphs runs precision bf16 or fp32, not fp16: its gradient scaler's per-step "
            "state is not captured in the graph"
        )
    return Execution(str(device), precision, memory_format, bool(compile), bool(cuda_graphs),
                     _decode(recipe.decode, device, in_memory, gpu_decoder))


# PyTorch's CPU backward of a 1x1 convolution with a stride, in channels_last, from fewer than
# this many input channels (ungrouped) writes outside its buffers: heap corruption, then a crash
# or silently wrong numbers (PyTorch 2.13; tests/test_train.py shows it). A ResNet has one where a
# projection shortcut (options B, C) or a v1 bottleneck's first conv strides from so few
# channels: only narrow nets, but the toolkit trains those too.
_CPU_STRIDED_1X1_MIN_CHANNELS = 8


def with_safe_layout(execution: Execution, model: torch.nn.Module,
                     log: Callable[[str], None] | None = None) -> Execution:
    """`execution`, in NCHW where it would run `model` on a CPU in channels_last through a
    strided 1x1 convolution that PyTorch's CPU kernels get wrong (the first one named in `log`;
    the run's record says nchw). The numbers are the same in either layout."""
    if execution.memory_format != "channels_last" or torch.device(execution.device).type != "cpu":
        return execution
    for name, conv in model.named_modules():
        if isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (1, 1) \
                and conv.stride != (1, 1) and conv.groups == 1 \
                and conv.in_channels < _CPU_STRIDED_1X1_MIN_CHANNELS:
            if log is not None:
                log(f"memory format nchw, not channels_last: {name} strides a 1x1 convolution "
                    f"from {conv.in_channels} channels, whose channels_last backward PyTorch's "
                    "CPU kernels get wrong")
            return dataclasses.replace(execution, memory_format="nchw")
    return execution


def _decode(choice: str, device: torch.device, in_memory: bool, gpu_decoder: bool) -> str:
    """Where the run's training crops are decoded ("none": its data set is in memory)."""
    if in_memory:
        if choice == "gpu":
            raise ValueError("decode: gpu applies to streamed image data sets (imagefolder, "
                             "webdataset); this one is in memory: set decode to cpu")
        return "none"
    if choice == "gpu" and not gpu_decoder:
        raise ValueError(f"decode: gpu needs a CUDA device with torchvision's nvJPEG decoder "
                         f"installed; this run is on {device.type}"
                         + (" without it" if device.type == "cuda" else "")
                         + ": set decode to cpu or auto")
    if choice == "auto":
        return "gpu" if gpu_decoder else "cpu"
    return choice


class GraphedStep:
    """A whole training step (forward, backward, optimizer step) replayed from one CUDA graph.

    Small CIFAR networks launch hundreds of kernels per step, each doing microseconds of work:
    replaying them from a graph removes the per-launch CPU cost that otherwise bounds the step.
    `step(images, labels)` must run the step without zeroing gradients (the captured backward
    writes them afresh), touch only tensors that outlive the graph, and sync nothing with the
    host. The caller has run a few eager steps on a side stream first (`side_stream`), as CUDA
    graph capture requires, so that the optimizer's state exists.
    """

    def __init__(
        self,
        step: Callable[[torch.Tensor, torch.Tensor], None],
        optimizer: torch.optim.Optimizer,
        images: torch.Tensor,
        labels: torch.Tensor,
    ) -> None:
        self.images = images.clone()
        self.labels = labels.clone()
        self.graph = torch.cuda.CUDAGraph()
        optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            step(self.images, self.labels)

    def shape(self) -> tuple[torch.Size, torch.Size]:
        return self.images.shape, self.labels.shape

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images.copy_(images)
        self.labels.copy_(labels)
        self.graph.replay()


@contextlib.contextmanager
def side_stream(device: torch.device) -> Iterator[None]:
    """Run the enclosed eager steps on a side stream, as CUDA graph capture wants its warm-up."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream(device).wait_stream(stream)
