"""`python -m privet ...` is the `privet` command."""

from privet.experiments.cli import main

main()
