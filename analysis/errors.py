"""The one exception type the analysis raises for bad input; the CLI prints its message as one line."""
from capsmodels.errors import CapsweepError


class AnalysisError(CapsweepError):
    """Bad input (missing experiment, empty sweep, runs without probes...). The message is one line
    that names what is wrong and what would be accepted; the command exits 2 (its CapsweepError code)."""
