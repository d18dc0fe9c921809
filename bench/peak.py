"""Measured dense-maths peak: the best sustained GFLOP/s of matmuls and convolutions on these threads.

``bench.train`` divided the training GFLOP/s by one 2048x2048 ``torch.mm`` loop and got a "fraction of
GEMM peak" of 1.61 for resnet34 on the 2-core dev machine: that loop is not the machine's peak. One
shape is not a peak (the library's blocking suits some shapes better than others), and resnet34 is
not a matmul: over 99 % of its counted FLOPs are 3x3 convolutions (forward, grad-input, grad-weight),
which the CPU build runs in oneDNN, while ``torch.mm`` runs in MKL's sgemm, a different library with
its own kernels and CPU dispatch. On top of that the dev machine's two cores are shared, so a single
2 s window often measures the neighbours' load rather than the CPU.

:func:`measured_peak_gflops` therefore sweeps large square and rectangular ``torch.mm`` shapes,
batched ``torch.bmm``, and resnet34's own 3x3 convolution layers at the training batch, both forward
and forward + backward (the x3 that ``bench.train`` counts), each warmed up and timed in ``repeats``
windows of at least ``seconds``, shapes interleaved so that a burst of foreign load spoils one window
rather than one shape; the best window counts. FLOPs come from ``FlopCounterMode``, the counter
``bench.train`` uses for the model, so numerator and denominator are counted alike.

Which fraction: against ``peak_gflop_per_s``, the maximum of the matmul and the convolution peaks,
i.e. the best dense fp32 throughput this torch build sustains on these threads. That compares like
with like (the conv peak covers the kernels resnet34 actually runs, in the training direction), and
taking the maximum rather than the conv figure alone keeps the denominator an upper bound even on
machines where MKL beats oneDNN. The fraction is kept rather than dropped because, so defined, it
answers a real question: how much of the best-case kernel throughput the whole training step (batch
norm, activations, optimiser, engine) achieves. It cannot be made exact on a shared machine: the peak
is a best-of-windows, so it survives bursts but not load that lasts the whole sweep. Measure it
before and after the training runs and keep the larger; a fraction above 1 still means the peak
measurement was starved and the figure is void, not that the model beat the hardware.

Run from the repository root: ``python -m bench.peak [--seconds 0.5] [--repeats 3] [--threads N]``
(prints the figures; ``bench.train`` records them with its own results).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .report import flatten, format_value

#: (batch, m, k, n): [m, k] @ [k, n]; batch 0 is a plain ``torch.mm``
MATMUL_SHAPES: tuple[tuple[int, int, int, int], ...] = (
    (0, 1024, 1024, 1024), (0, 2048, 2048, 2048), (0, 4096, 4096, 4096),
    (0, 4096, 1024, 4096), (0, 1024, 4096, 1024), (8, 1024, 1024, 1024), (32, 512, 512, 512),
)
#: (channels, pixels) of resnet34's 3x3 stride-1 convolutions at 112x112 input (stages at 56/28/14/7 px)
CONV_SHAPES: tuple[tuple[int, int], ...] = ((64, 56), (128, 28), (256, 14), (512, 7))
#: the single shape bench.train used to call its peak, kept in the sweep for comparison
LEGACY_GEMM = "mm 2048x2048x2048"


@dataclass
class Kernel:
    """One timed operation: ``run`` does it once; ``flops`` is what FlopCounterMode counts for it."""

    name: str
    family: str  # "matmul" | "conv"
    run: Callable[[], object]
    flops: float = 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _matmul(batch: int, m: int, k: int, n: int, dtype: torch.dtype, device: torch.device) -> Kernel:
    lead = (batch,) if batch else ()
    a = torch.randn(*lead, m, k, dtype=dtype, device=device)
    b = torch.randn(*lead, k, n, dtype=dtype, device=device)
    out = torch.empty(*lead, m, n, dtype=dtype, device=device)  # no allocation inside the timed loop
    if batch:
        return Kernel(f"bmm {batch}x{m}x{k}x{n}", "matmul", lambda: torch.bmm(a, b, out=out))
    return Kernel(f"mm {m}x{k}x{n}", "matmul", lambda: torch.mm(a, b, out=out))


def _conv(channels: int, pixels: int, batch: int, train: bool, dtype: torch.dtype,
          device: torch.device) -> Kernel:
    x = torch.randn(batch, channels, pixels, pixels, dtype=dtype, device=device, requires_grad=train)
    w = torch.randn(channels, channels, 3, 3, dtype=dtype, device=device, requires_grad=train)
    name = f"conv3x3 {channels}ch {pixels}px b{batch}"
    if not train:
        def forward() -> torch.Tensor:
            with torch.no_grad():
                return F.conv2d(x, w, padding=1)

        return Kernel(f"{name} fwd", "conv", forward)
    grad_out = torch.randn(batch, channels, pixels, pixels, dtype=dtype, device=device)

    def forward_backward() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(F.conv2d(x, w, padding=1), (x, w), grad_out)

    return Kernel(f"{name} fwd+bwd", "conv", forward_backward)


def _count_flops(kernel: Kernel) -> float:
    with FlopCounterMode(display=False) as counter:
        kernel.run()
    return float(counter.get_total_flops())


def _best_rate(kernel: Kernel, seconds: float, device: torch.device) -> float:
    """GFLOP/s of one window: whole calls until ``seconds`` have passed (at least one call)."""
    _sync(device)
    calls, t0 = 0, time.perf_counter()
    while True:
        kernel.run()
        calls += 1
        _sync(device)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return kernel.flops * calls / elapsed / 1e9


def measured_peak_gflops(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                         seconds: float = 0.5, repeats: int = 3, threads: int | None = None,
                         conv_batch: int = 32, *,
                         matmul_shapes: Sequence[tuple[int, int, int, int]] = MATMUL_SHAPES,
                         conv_shapes: Sequence[tuple[int, int]] = CONV_SHAPES) -> dict[str, Any]:
    """Best sustained GFLOP/s over the matmul and convolution sweep (see the module docstring).

    ``threads`` sets torch's intra-op threads for the measurement (restored afterwards); None keeps
    the current setting, i.e. the one the training set. ``conv_batch`` should be the training batch;
    the shape lists default to the sweep above (smaller ones make a quick smoke test).
    Returns ``peak_gflop_per_s`` (the denominator for a fraction of peak) and ``peak_kernel``, the
    matmul and conv peaks with their kernels, the legacy 2048x2048 figure, every kernel's best rate
    and ``cpu_share``, how much of ``threads`` cores the process got (a contention warning).
    """
    if seconds <= 0 or repeats < 1:
        raise ValueError(f"seconds must be > 0 and repeats >= 1, got {seconds} and {repeats}")
    if not matmul_shapes or not conv_shapes:
        raise ValueError("the sweep needs at least one matmul and one convolution shape")
    device = torch.device(device)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        kernels = [_matmul(*shape, dtype, device) for shape in matmul_shapes]
        kernels += [_conv(c, px, conv_batch, train, dtype, device) for c, px in conv_shapes for train in (False, True)]
        for kernel in kernels:  # the counted call doubles as the first warm-up (oneDNN primitive creation)
            kernel.flops = _count_flops(kernel)
            kernel.run()
        best = dict.fromkeys((k.name for k in kernels), 0.0)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(repeats):  # interleaved: foreign load spoils a window, not a shape
            for kernel in kernels:
                best[kernel.name] = max(best[kernel.name], _best_rate(kernel, seconds, device))
        used_threads = torch.get_num_threads()
        cpu_share = (time.process_time() - cpu0) / ((time.perf_counter() - wall0) * used_threads)
    finally:
        torch.set_num_threads(previous)
    figures: dict[str, Any] = {}
    for family in ("matmul", "conv"):
        name = max((k.name for k in kernels if k.family == family), key=best.__getitem__)
        figures[f"{family}_peak_gflop_per_s"] = best[name]
        figures[f"{family}_peak_kernel"] = name
    top = max(("matmul", "conv"), key=lambda f: figures[f"{f}_peak_gflop_per_s"])
    return {
        "peak_gflop_per_s": figures[f"{top}_peak_gflop_per_s"],
        "peak_kernel": figures[f"{top}_peak_kernel"],
        **figures,
        "legacy_gemm_2048_gflop_per_s": best.get(LEGACY_GEMM),  # None when the sweep leaves it out
        "sweep_gflop_per_s": best,
        "threads": used_threads,
        # CPU: process CPU time / (wall time x threads) over the sweep; well below 1 = other load took
        # the cores, and the peak is then a floor (spinning OpenMP threads count as busy, so not a cure)
        "cpu_share": cpu_share,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "seconds_per_window": seconds,
        "repeats": repeats,
    }


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=0.5, help="minimum length of one timed window")
    p.add_argument("--repeats", type=int, default=3, help="timed windows per kernel (the best counts)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all usable cores, as bench.train)")
    p.add_argument("--dtype", default="float32", help="torch dtype name, e.g. float32 or bfloat16")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--conv-batch", type=int, default=32, help="batch of the convolution kernels (training batch)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    dtype = getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise SystemExit(f"--dtype {args.dtype!r} is not a torch dtype")
    threads = args.threads or len(os.sched_getaffinity(0))
    figures = measured_peak_gflops(dtype, args.device, args.seconds, args.repeats, threads, args.conv_batch)
    rows = flatten(figures)
    width = max(len(key) for key, _ in rows)
    print("peak:")
    for key, value in rows:
        print(f"  {key:<{width}}  {format_value(value)}")
    return figures


if __name__ == "__main__":
    main()
