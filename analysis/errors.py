"""The one exception type the analysis raises for bad input; the CLI prints its message as one line."""


class AnalysisError(Exception):
    """Bad input (missing experiment, empty sweep, runs without probes...). The message is one line
    that names what is wrong and what would be accepted; the CLI turns it into exit code 1."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (library messages span several), cut at `limit`."""
    msg = " ".join(str(e).split())
    return msg[:limit] + ("..." if len(msg) > limit else "")
