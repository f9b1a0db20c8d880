"""The model around the head: our Llama-style decoder body, `LanguageModel` (body → hidden states →
head), Hugging Face import (hf.py) and export. Imports heads, recipe, errors and, for the export's
tokenizer files, data's tokenizer helpers; never DeepSpeed.
"""
