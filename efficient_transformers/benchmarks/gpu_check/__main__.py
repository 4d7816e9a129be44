"""`python -m efficient_transformers.benchmarks.gpu_check`: see the package docstring."""

import sys

from efficient_transformers.benchmarks.gpu_check.cli import main

if __name__ == "__main__":
  sys.exit(main())
