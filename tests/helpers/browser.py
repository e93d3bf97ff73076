"""A real headless browser for the report tests: Debian's `chromium` (installed by apt-get when missing
and the tests run as root, as on CI; see tests/helpers/pg.py), driven from the command line only.

`measure` copies a page, appends a script that measures it after load and writes the result as JSON
into a <pre>, and reads it back from `chromium --headless --dump-dom`: no DevTools client, no network
(every page under test is self-contained). `screenshot` saves a PNG of the page at a given size.
"""
from __future__ import annotations

import html
import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

from tests.helpers.pg import ensure_debian_packages

PROBE_ID = "capsweep-browser-probe"
_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
          "--disable-extensions", "--disable-background-networking", "--mute-audio"]


def chromium() -> tuple[Optional[str], Optional[str]]:
    """(path of chromium, None) or (None, why not) for pytest.skip."""
    reason = ensure_debian_packages({"chromium": "chromium"})
    if reason:
        return None, reason
    return shutil.which("chromium"), None


def _run(binary: str, args: list[str], timeout: int = 180) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="capsweep-chromium-") as profile:
        return subprocess.run([binary, *_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=timeout)


def measure(binary: str, page: Path, script: str, width: int, height: int = 900) -> dict:
    """Load `page` at width x height, run `script` (a JS function body returning a JSON-able value)
    after the load event, and return its value."""
    runner = (f"<script>window.addEventListener('load',function(){{setTimeout(function(){{var r;"
              f"try{{r=(function(){{{script}}})();}}catch(e){{r={{error:String(e)}};}}"
              f"var p=document.createElement('pre');p.id='{PROBE_ID}';p.textContent=JSON.stringify(r);"
              f"document.body.appendChild(p);}},50);}});</script>")
    text = page.read_text()
    at = text.rfind("</body>")
    probe = page.with_name(page.stem + ".probe.html")
    probe.write_text(text[:at] + runner + text[at:] if at >= 0 else text + runner)
    proc = _run(binary, [f"--window-size={width},{height}", "--virtual-time-budget=10000", "--dump-dom",
                         probe.resolve().as_uri()])
    start = proc.stdout.find(f'<pre id="{PROBE_ID}">')
    assert start >= 0, f"no result from chromium (rc {proc.returncode}): {proc.stderr[-2000:]}"
    body = proc.stdout[start + len(f'<pre id="{PROBE_ID}">'):]
    got = json.loads(html.unescape(body[:body.find("</pre>")]))
    assert not (isinstance(got, dict) and "error" in got), got
    return got


def screenshot(binary: str, page: Path, out: Path, width: int, height: int) -> Path:
    """A PNG of the page's top width x height pixels."""
    proc = _run(binary, [f"--window-size={width},{height}", "--virtual-time-budget=10000",
                         f"--screenshot={out}", page.resolve().as_uri()])
    assert out.exists() and out.stat().st_size > 0, f"no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return out
