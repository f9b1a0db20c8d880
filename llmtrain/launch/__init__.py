"""Launching workers: the local/hostfile launcher command with signal forwarding, DeepSpeed
hostfiles, and SLURM batch scripts. Imports recipe and errors; starts `llmtrain.train` as a
process, never imports it.
"""
