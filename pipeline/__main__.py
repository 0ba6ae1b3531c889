"""``python -m pipeline``: the ``editledger`` command, runnable by module name — what ``torchrun -m
pipeline covariance|evaluate ...`` starts in every process."""

from pipeline.cli import main

main()
