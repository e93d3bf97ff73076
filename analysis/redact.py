"""Secrets out of what capsweep prints and logs: the userinfo of URIs (`http://alice:S3cretPw@host`).

A tracking URI may carry a user and password (MLflow accepts them in the URI, and so do database URIs),
and capsweep prints URIs in its messages and records commands and specs in MLflow (the parent's
`spec.yaml`, `mlflow.source.name`). Every such place passes the text through `redact`; what reaches the
store and the screen is `http://***@host`. Standard library only: `sweeps` and `analysis` both use it.
"""
from __future__ import annotations

import re

MASK = "***"
# scheme://userinfo@ : userinfo stops at the first '@' (RFC 3986 forbids a raw '@' in it), and has no
# '/', whitespace or quote before it
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s'\"<>]+)@")


def redact(text: str) -> str:
    """`text` with the userinfo of every URI in it replaced by ***."""
    return _USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", str(text))


redact_uri = redact      # the name callers use for a single URI
