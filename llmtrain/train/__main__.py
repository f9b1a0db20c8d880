"""`python -m llmtrain.train RUN_DIR`: what launchers (and SLURM scripts written by older versions) start."""

from llmtrain.train.worker import exit_skipping_finalizers, main

exit_skipping_finalizers(main())
