"""Data: corpus sources (streamed), the tokenizer, parallel tokenization into uint32 shards, blocks
read from memory-mapped shards and the resumable sampler.

`prepare.prepare_data` runs once in the CLI before any rank starts; workers read what it wrote
(`packing.load_split`) and walk it with `sampler.ResumableSampler`. Imports recipe and errors only.
"""
