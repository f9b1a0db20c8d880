"""Launching workers: the local/hostfile launcher command with signal forwarding, one node's
ranks (ranks.py), DeepSpeed hostfiles, and SLURM batch scripts. Imports recipe and errors; starts
`llmtrain.train` as a process, never imports it.
"""
