"""`python -m encdiff` (and `torchrun -m encdiff`): the command line."""

import sys

from .cli import main

sys.exit(main())
