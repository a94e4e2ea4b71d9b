"""``python -m gitjax.study <name> ...`` = ``gitjax experiment <name> ...``."""

import sys

from gitjax.study import main

sys.exit(main())
