"""lpkernel's benchmark suite: ``python -m benchmarks``.

Each method is timed against the machine's own floors, measured in the same run.
"""

from benchmarks.runner import run_suite as run_suite
from benchmarks.suites import SUITES as SUITES
