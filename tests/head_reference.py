"""Independent references for head tests: float64 eager math, a matmul counter, relative errors."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


class MatmulCounter(TorchDispatchMode):
    """Multiply-adds of every matrix product run inside it (mm, addmm and their in-place and out=
    forms, bmm), whatever path issued them."""

    def __init__(self):
        super().__init__()
        self.macs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in (aten.mm, aten.addmm, aten.addmm_, aten.bmm, aten.baddbmm):
            a, b = (args[0], args[1]) if packet in (aten.mm, aten.bmm) else (args[1], args[2])
            self.macs += a.numel() * b.shape[-1]
        return func(*args, **(kwargs or {}))


def relative_error(x: torch.Tensor, truth: torch.Tensor) -> float:
    """‖x − truth‖ / ‖truth‖ in float64 (absolute where the truth is 0)."""
    diff = (x.double() - truth.double()).norm().item()
    size = truth.double().norm().item()
    return diff / size if size else diff


def assert_within_eager(ours, eager, truth, names, floor):
    """Each tensor's relative error against the float64 truth at most twice eager's in the same
    dtype plus ``floor`` (Apple's test style, on norms): a dropped gradient term moves a tensor
    by far more than rounding does."""
    for name, o, e, t in zip(names, ours, eager, truth):
        err, allowed = relative_error(o, t), 2 * relative_error(e, t) + floor
        assert err <= allowed, f"{name}: relative error {err:.3g} > allowance {allowed:.3g} (eager {allowed - floor:.3g}/2)"
