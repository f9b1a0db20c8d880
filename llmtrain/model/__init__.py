"""The model around the head: our Llama-style decoder body, `LanguageModel` (body → hidden states →
head), and the Hugging Face export. Imports heads, recipe and errors; never DeepSpeed or data.
"""
