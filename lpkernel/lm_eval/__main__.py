"""``python -m lpkernel.lm_eval``: lm-eval's command line with ``model="lpkernel"`` registered."""

from lpkernel.lm_eval import main

main()
