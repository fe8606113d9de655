"""`python -m crystal_ext.evaluate`: see crystal_ext.training.evaluation (and `--help`)."""

import sys

from crystal_ext.training.evaluation import main

if __name__ == "__main__":
    sys.exit(main())
