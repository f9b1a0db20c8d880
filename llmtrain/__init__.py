"""llmtrain: DeepSpeed ZeRO training for large-vocabulary LMs with a swappable output head."""

__version__ = "0.1.0"
