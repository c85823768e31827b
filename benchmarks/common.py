"""The benchmark scripts' import of the one harness, which lives in the package (``monkey_kernels.benchmarking``)
so that ``monkey-kernels demo`` works from an installed wheel too."""
from monkey_kernels.benchmarking import *  # noqa: F401,F403
from monkey_kernels.benchmarking import __all__  # noqa: F401
