"""A test-only fifth head (a scaled softmax), registered by tests/test_head_capabilities.py: all a
new head needs is its own file and a registry line."""

import torch
from pydantic import Field

from llmtrain.heads.softmax import SoftmaxHead, SoftmaxOptions


class FifthOptions(SoftmaxOptions):
    scale: float = Field(1.0, gt=0, description="multiplies the logits")


class FifthHead(SoftmaxHead):
    name = "fifth"
    Options = FifthOptions
    supports_temperature = False
    linear_lm_head = False

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().logits(hidden) * self.options.scale
