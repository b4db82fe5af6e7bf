"""`python -m pissa.cli ...`: the same CLI, for launchers that run modules (torchrun -m, accelerate launch -m)."""

from . import main

main()
