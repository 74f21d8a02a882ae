"""`python -m ensemble_kernel` (and `torchrun -m ensemble_kernel`) runs the command line."""

from .cli import main

main()
