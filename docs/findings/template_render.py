"""Render docs/findings/FINDINGS.template.md into FINDINGS.md, and audit both.

The template is FINDINGS.md's prose with every number replaced by a placeholder
`{{<report>.<claim>(<args>)|<format>}}` (claim_library). Three audits back the rule that numbers in
docs come from data:
- `bare_numbers`: a digit in the template's prose outside a placeholder, a code span or fence, a link
  target or the small allowlist below is an error, so a hand-typed figure cannot come back;
- `diff_lines`: FINDINGS.md must equal the rendering, and each differing line is named with the
  numbers that differ;
- a placeholder the data cannot answer (unknown claim, a selector matching no or several
  configurations) is an error, never an empty string.

The allowlist (what a digit may be without a placeholder): issue references (#11), commit hashes
(2a9a7a8), years in citations (et al. 2017, (2017)), and a depth level in "depth 3" / "depth 1-6" /
"depths 3 and 6" that some committed report holds (checked: a depth the data lack is an error).
Digits glued to letters are names, not numbers (c10, l3, float64, mnist5k, H200).
"""
from __future__ import annotations

import difflib
import inspect
import re
from dataclasses import dataclass
from typing import Callable

import claim_library as lib

PLACEHOLDER = re.compile(r"\{\{\s*(?P<ns>\w+)\.(?P<name>\w+)\s*(?:\((?P<args>[^()]*)\))?\s*"
                         r"(?:\|\s*(?P<fmt>[^}\s]*))?\s*\}\}")
TEMPLATE_COMMENT = re.compile(r"\{#.*?#\}", re.S)          # notes to editors, not rendered
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)         # may run over a line break
FENCE = re.compile(r"^\s*```.*?^\s*```[^\n]*$", re.S | re.M)
LINK_TARGET = re.compile(r"\]\([^)]*\)")
NUMBER = re.compile(r"(?<![A-Za-z_\d.])[-+]?\d+(?:[.,]\d+)*(?:e[-+]?\d+)?")
ALLOWED = [
    ("issue reference", re.compile(r"#\d+\b")),
    ("commit hash", re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b")),
    ("year in a citation", re.compile(r"(?:et al\.,?\s*\(?|\()(?:19|20)\d\d\b")),
]
DEPTH_WORDS = re.compile(r"\bdepths?[\s-]+(\d+)(?:\s*(?:-|to|and|or)\s*(\d+))?")


@dataclass
class Problem:
    """One line of --check's output."""
    where: str
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.where}:{self.line}: {self.text}"


def call(ctx: Callable[[str], object], ns: str, name: str, args: str, spec: str):
    """Evaluate one placeholder: claim `ns.name` if registered, else the generic `name` on report
    `ns`; returns the rendered text."""
    fn = lib.CLAIMS.get(f"{ns}.{name}") or lib.CLAIMS.get(name)
    if fn is None:
        raise lib.ClaimError(f"unknown claim {ns}.{name}")
    pos, sel = lib.parse_args(args or "")
    kwargs = {"sel": sel}
    if "spec" in inspect.signature(fn).parameters:
        kwargs["spec"] = spec
    target = ctx(ns)
    value = fn(*(([target] if target is not None else []) + pos), **kwargs)
    return lib.fmt(value, spec)


def render(template: str, ctx, where: str = "template") -> tuple[str, list[Problem]]:
    """The template with every placeholder replaced, and the problems met doing so."""
    problems: list[Problem] = []
    template = TEMPLATE_COMMENT.sub("", template)
    out_lines = []
    for n, line in enumerate(template.split("\n"), 1):
        def sub(m, n=n):
            try:
                return call(ctx, m["ns"], m["name"], m["args"], m["fmt"] or "")
            except (lib.ClaimError, KeyError, ValueError, TypeError) as exc:
                problems.append(Problem(where, n, f"{m.group(0)}: {exc}"))
                return m.group(0)
        out_lines.append(PLACEHOLDER.sub(sub, line))
    return "\n".join(out_lines), problems


def _blank(m: re.Match) -> str:
    """A matched span replaced by a space, keeping its line breaks (so line numbers stay right)."""
    return " " + "\n" * m.group(0).count("\n")


def bare_numbers(template: str, depth_levels: set[float], where: str = "template") -> list[Problem]:
    """Digits in the template's prose that no placeholder, code span/fence, link target or allowlist
    entry accounts for."""
    problems = []
    text = TEMPLATE_COMMENT.sub(_blank, template)
    text = FENCE.sub(_blank, text)
    text = PLACEHOLDER.sub(_blank, text)
    for n, line in enumerate(text.split("\n"), 1):
        if "{{" in line or "}}" in line:
            problems.append(Problem(where, n, "malformed placeholder near: " + line.strip()[:80]))
    text = LINK_TARGET.sub(lambda m: "]" + "\n" * m.group(0).count("\n"), CODE_SPAN.sub(_blank, text))
    for n, line in enumerate(text.split("\n"), 1):
        prose = line
        for _, pat in ALLOWED:
            prose = pat.sub(" ", prose)

        def depth_ok(m, n=n):
            for g in (m[1], m[2]):
                if g is not None and float(g) not in depth_levels:
                    problems.append(Problem(where, n, f'"depth {g}": no committed report has depth {g}'))
            return "depth"
        prose = DEPTH_WORDS.sub(depth_ok, prose)
        for m in NUMBER.finditer(prose):
            ctx_text = " ".join(prose[max(0, m.start() - 30):m.end() + 30].split())
            problems.append(Problem(where, n, f'bare number "{m.group(0)}" outside a placeholder '
                                              f'(... {ctx_text} ...)'))
    return problems


def diff_lines(have: str, want: str, where: str) -> list[Problem]:
    """One problem per line where `have` (FINDINGS.md) differs from `want` (the rendering), naming
    the numbers that differ when the line is otherwise the same."""
    a, b = have.split("\n"), want.split("\n")
    problems = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op == "equal":
            continue
        for k in range(max(i2 - i1, j2 - j1)):
            old = a[i1 + k] if i1 + k < i2 else None
            new = b[j1 + k] if j1 + k < j2 else None
            line = i1 + k + 1 if old is not None else i1 + 1
            if old is None:
                problems.append(Problem(where, line, f"missing line, the data give: {new[:120]}"))
            elif new is None:
                problems.append(Problem(where, line, f"line not in the rendering: {old[:120]}"))
            else:
                problems.append(Problem(where, line, describe(old, new)))
    return problems


def describe(old: str, new: str) -> str:
    """'reads "0.691", the data give "0.690"' for each number that differs, else the changed words."""
    na, nb = NUMBER.findall(old), NUMBER.findall(new)
    if len(na) == len(nb) and NUMBER.sub("#", old) == NUMBER.sub("#", new):
        pairs = [f'reads "{x}", the data give "{y}"' for x, y in zip(na, nb) if x != y]
        return "; ".join(pairs)
    wa, wb = old.split(), new.split()
    sm = difflib.SequenceMatcher(None, wa, wb, autojunk=False)
    parts = [f'reads "{" ".join(wa[i1:i2])}", the data give "{" ".join(wb[j1:j2])}"'
             for op, i1, i2, j1, j2 in sm.get_opcodes() if op != "equal"]
    return "; ".join(parts[:3]) + ("; ..." if len(parts) > 3 else "")
