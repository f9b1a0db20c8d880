"""The worker (one process per rank, `python -m llmtrain.train RUN_DIR`): the DeepSpeed engine, the
loop, evaluation, checkpoints, metrics, universal checkpoints, peak-memory reading. Imports model,
data, recipe, heads and errors; never the CLI, launch or profile.
"""
