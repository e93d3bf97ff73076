"""Files that run code when unpickled: what a tampered model or state file would hold (the tests check none runs)."""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import torch


def payload(kind: str, marker: Path) -> bytes:
    """The bytes of a file that runs `touch marker` when fully unpickled."""
    class P:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    if kind == "pickle":
        return pickle.dumps(P())
    buf = io.BytesIO()
    torch.save(P(), buf)
    return buf.getvalue()


# ---- Ray Tune's own (pickled) state -------------------------------------------------------------------
def fallback_json(marker: Path) -> bytes:
    """An experiment-state JSON whose value Tune's decoder would cloudpickle.loads."""
    import json
    blob = payload("pickle", marker).hex()
    return json.dumps({"runner_data": {"_type": "CLOUDPICKLE_FALLBACK", "value": blob}}).encode()
