"""Collectives take tensors on the ranks' device. NCCL, the backend on CUDA, reduces device tensors
only: before this rule every GPU run ended at its first collective (a host tensor in the MFU
rate's all-reduce: "No backend type associated with device type cpu", seen on an H200), while gloo
on CPU took anything, so no CPU test could see it. Host values go through `worker.reduced`."""

import ast
from pathlib import Path

import torch

import llmtrain
from llmtrain.train import worker

PACKAGE = Path(llmtrain.__file__).parent
# Functions that may call a collective directly, each because its tensor is made on the device of
# the model's own tensors.
DIRECT = {("train/worker.py", "reduced"), ("heads/zloss.py", "sums")}
COLLECTIVES = {"all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter"}


class _Collectives(ast.NodeVisitor):
    """(innermost function, line) of every `dist.<collective>(...)` call in a module."""

    def __init__(self):
        self.functions, self.calls = ["<module>"], []

    def visit_FunctionDef(self, node):
        self.functions.append(node.name)
        self.generic_visit(node)
        self.functions.pop()

    def visit_Call(self, node):
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in COLLECTIVES and isinstance(f.value, ast.Name) and f.value.id == "dist":
            self.calls.append((self.functions[-1], node.lineno))
        self.generic_visit(node)


def _collective_calls():
    for path in sorted(PACKAGE.rglob("*.py")):
        visitor = _Collectives()
        visitor.visit(ast.parse(path.read_text()))
        yield from ((str(path.relative_to(PACKAGE)), fn, line) for fn, line in visitor.calls)


def test_every_collective_goes_through_the_device():
    calls = list(_collective_calls())
    assert {(f, fn) for f, fn, _ in calls} >= DIRECT  # the scan sees the calls it should
    stray = [f"{f}:{line} in {fn}" for f, fn, line in calls if (f, fn) not in DIRECT]
    assert not stray, f"collectives on tensors that may live on the host (NCCL refuses them): {stray}"


def test_reduced_reduces_on_the_given_device_and_returns_host_values(monkeypatch):
    seen = []

    def all_reduce(tensor, op=None):
        seen.append((tensor.device, op))
        tensor.mul_(2)  # two ranks holding the same value

    monkeypatch.setattr(worker.dist, "all_reduce", all_reduce)
    out = worker.reduced(torch.tensor([1.5, 2.0], dtype=torch.float64), torch.device("cpu"), worker.dist.ReduceOp.MAX)
    assert seen == [(torch.device("cpu"), worker.dist.ReduceOp.MAX)]
    assert out.device.type == "cpu" and out.tolist() == [3.0, 4.0]
