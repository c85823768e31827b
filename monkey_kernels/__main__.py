"""``python -m monkey_kernels``: the ``monkey-kernels`` command line (see :mod:`monkey_kernels.cli`)."""
import sys

from monkey_kernels.cli import main

if __name__ == "__main__":
    sys.exit(main())
