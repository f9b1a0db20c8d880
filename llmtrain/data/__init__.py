"""Data: corpus sources, the tokenizer, packed blocks and the resumable sampler.

`prepare.prepare_data` runs once in the CLI before any rank starts; workers read what it wrote
(`packing.load_split`) and walk it with `sampler.ResumableSampler`. Imports recipe and errors only.
"""
