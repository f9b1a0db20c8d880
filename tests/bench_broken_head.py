"""A head whose forward fails, registered by tests/test_bench.py to check that the benchmark
reports a failing contender instead of stopping."""

from llmtrain.heads.softmax import SoftmaxHead


class BrokenHead(SoftmaxHead):
    name = "broken"

    def forward(self, hidden, targets):
        raise RuntimeError("broken head: forward refused")
