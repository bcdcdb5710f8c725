"""The matrix products of some training steps, recorded, then replayed alone.

What it answers: how fast would the step be if everything but its matrix products
(elementwise work, copies, softmax, autograd bookkeeping, Python) took no time? That is
the most any fusion (a compiler, hand-written kernels) could buy without changing the
products themselves, so `model FLOPs / replayed seconds / peak` bounds the MFU of this
workload on this machine from above.

Recorded below autograd (a TorchDispatchMode), so the backward pass's products are seen
too, with their exact shapes, strides and dtypes. The replay reuses one random tensor per
distinct (shape, stride, dtype): operands then stay warmer in cache than in the real step,
which makes the bound, if anything, optimistic.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# The products a transformer step runs through on CPU (linear -> mm/addmm, matmul -> bmm).
MATMULS = {aten.mm.default, aten.addmm.default, aten.addmm_.default, aten.bmm.default, aten.baddbmm.default}
Spec = tuple[tuple[int, ...], tuple[int, ...], torch.dtype]


@dataclass
class Call:
    op: torch._ops.OpOverload
    args: list[Spec | object]  # a Spec for each tensor argument, the value itself otherwise
    kwargs: dict[str, object]
    flops: int


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Call] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's signature)
        kwargs = kwargs or {}
        if func in MATMULS:
            specs = [(tuple(a.shape), tuple(a.stride()), a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
            self.calls.append(Call(func, specs, dict(kwargs), _flops(func, args)))
        return func(*args, **kwargs)


def _flops(op: torch._ops.OpOverload, args: tuple) -> int:
    if op in (aten.bmm.default, aten.baddbmm.default):
        a, b = (args[0], args[1]) if op is aten.bmm.default else (args[1], args[2])
        return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    a, b = (args[0], args[1]) if op is aten.mm.default else (args[1], args[2])
    return 2 * a.shape[0] * a.shape[1] * b.shape[1]


def record(work: Callable[[], None]) -> list[Call]:
    """Run `work` (forward and backward of some steps) and return the matrix products it ran."""
    recorder = _Recorder()
    with recorder:
        work()
    return recorder.calls


def replay_seconds(calls: list[Call], repeats: int = 3) -> float:
    """Seconds to run the recorded products alone, one after the other (the best of `repeats`)."""
    pool: dict[Spec, torch.Tensor] = {}

    def tensor(spec: Spec) -> torch.Tensor:
        if spec not in pool:
            shape, stride, dtype = spec
            t = torch.empty_strided(shape, stride, dtype=dtype)
            t.copy_(torch.randn(shape) * 0.1)  # values like activations: no denormals, no infinities
            pool[spec] = t
        return pool[spec]

    prepared = [(c.op, [tensor(a) if _is_spec(a) else a for a in c.args], c.kwargs) for c in calls]
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for op, args, kwargs in prepared:
            op(*args, **kwargs)
        best = min(best, time.perf_counter() - started)
    return best


def _is_spec(a: object) -> bool:
    return isinstance(a, tuple) and len(a) == 3 and isinstance(a[2], torch.dtype)
