"""`python -m workbench` (and `torchrun -m workbench`) run the CLI."""

from workbench.cli import entry_point

entry_point()
