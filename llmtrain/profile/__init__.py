"""`llmtrain profile`: the analytic memory model (estimate), measurement in a fresh process
(measure) and the report, verdict and plot (report). Imports train (its DeepSpeed config and
memory readers), model, recipe, heads and errors.
"""
