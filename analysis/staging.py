"""A folder of files that changes as a whole: a report is never half old and half new.

`capsweep report` writes a dozen files (verdict.json, report.md/html, the figures); killed half way, in
place, it left the old report's files mixed with the new one's. `staged_dir(out)` gives a staging
folder beside `out` to write into, and when the block ends puts it in place at once: `out` becomes the
staging folder by rename (the old report, if any, is renamed away first and removed after), so a
reader or a later run finds either the whole old report or the whole new one. A folder that holds
more than a report (`--out .`) is never renamed: the new files are moved into it one by one instead.
A block that fails removes its staging folder and leaves `out` as it was. Standard library only.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

REPORT_MARK = "verdict.json"      # a folder holding only files, this one among them, is a report folder


def _siblings(out: Path, kind: str) -> list[Path]:
    return list(out.parent.glob(f".{out.name}.{kind}-*")) if out.parent.is_dir() else []


@contextlib.contextmanager
def staged_dir(out_dir: str) -> Iterator[str]:
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in _siblings(out, "partial") + _siblings(out, "old"):     # left by a run that was killed
        shutil.rmtree(stale, ignore_errors=True)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    stage.mkdir()
    try:
        yield str(stage)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _put_in_place(stage, out)


def _is_report_folder(out: Path) -> bool:
    entries = list(out.iterdir())
    return any(p.name == REPORT_MARK for p in entries) and all(p.is_file() for p in entries)


def _put_in_place(stage: Path, out: Path) -> None:
    if not out.exists():
        os.replace(stage, out)
        return
    if out.is_dir() and _is_report_folder(out):
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(stage, out)
        shutil.rmtree(old, ignore_errors=True)
        return
    names = sorted(p.name for p in stage.iterdir())          # a folder with other things in it
    for name in sorted(names, key=lambda n: n == REPORT_MARK):    # verdict.json last: it marks the report whole
        os.replace(stage / name, out / name)
    shutil.rmtree(stage, ignore_errors=True)
