"""`python -m analysis ...` is `capsweep report ...`."""
import sys

from analysis.cli import main

sys.exit(main())
