"""Reports over finished (or running) run folders: `llmtrain compare` (a table, PNG plots and an
index.md tying them) and `llmtrain study` (variants of one recipe run one after another, then
compared). Reads run folders only; imports train (status, metrics, memory), recipe and heads, never
the CLI or launch.
"""
