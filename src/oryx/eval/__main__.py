"""``python -m oryx.eval COMMAND``: the benchmark runners (see ``oryx.eval.cli``)."""

import sys

from oryx.eval.cli import main

sys.exit(main())
