"""`python -m stages.cli.serve` runs qlora-serve."""

import sys

from stages.cli.serve.app import main

sys.exit(main())
