"""python -m experiments.run <name>|all|list --scale small|full [--out DIR] [--only ROWFILTER]

Thin entry point: all logic is in ``gitjax.study`` (``gitjax experiment`` calls the same ``main``).
"""

import sys

from gitjax.study import main

if __name__ == "__main__":
    import gitjax

    gitjax.configure_xla_cpu()  # as the gitjax CLI: without it an Exact-GIT ResNet step can hang on XLA:CPU
    sys.exit(main())
