"""A head whose forward fails, registered by tests/test_bench.py to check that the benchmark
reports a failing contender instead of stopping, and that a head's options reach its worker."""

from llmtrain.heads.softmax import SoftmaxHead


class BrokenHead(SoftmaxHead):
    name = "broken"

    def forward(self, hidden, targets):
        raise RuntimeError(f"broken head: forward refused (label_smoothing={self.options.label_smoothing})")
