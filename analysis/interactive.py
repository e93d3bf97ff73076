"""The report's interactive charts: inline SVG plus one small script, no library and no network, so
report.html stays one self-contained file that opens anywhere (mailed, or from the MLflow UI).

Each chart is drawn in full by Python (it shows without JavaScript); the script only adds what a
reader does with it: pick the colour probe of the parallel-coordinates view, drag on an axis to keep
the lines in a range (click the axis to clear), and hover a point to light up the same configuration
in every Pareto panel. Tooltips are SVG <title>s. Charts scale with the page (viewBox, width 100%).

Colours run from bad (red) through yellow to good (blue) whatever the probe's direction, so "blue"
always reads as healthy; a trial that does not log the probe is grey (n/a, never drawn as 0).
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from itertools import combinations
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd

from analysis.verdict import factor_kind

BAD, MID, GOOD, NA = (215, 48, 39), (254, 224, 144), (69, 117, 180), "#bbbbbb"
PC_MIN_SCALE = 0.75   # the parallel-coordinates chart is never drawn smaller than this share of its size
LOG_SPAN = 50.0   # a positive numeric axis spanning more than this factor is drawn on log10

CSS = """
figure.chart{margin:1em 0} figure.chart svg{width:100%;height:auto;display:block;border:1px solid #ddd;background:#fff}
.charts{display:flex;flex-wrap:wrap;gap:12px} .charts>figure.chart{flex:1 1 360px;max-width:100%;margin:.3em 0}
svg text{font:11px system-ui,sans-serif;fill:#333} svg .ax{stroke:#555;stroke-width:1}
svg .pl{fill:none;stroke-width:1.4;stroke-opacity:.75} svg .pl:hover{stroke-width:3.5;stroke-opacity:1}
svg .pl.off{stroke-opacity:.05} svg .brush{fill:transparent;cursor:ns-resize} svg .sel{fill:#3366cc;fill-opacity:.15}
svg circle.pt{stroke:#fff;stroke-width:.8} svg circle.pt.hl{stroke:#000;stroke-width:2.5}
svg .grid{stroke:#eee} .chart-ctl{font-size:.85em;margin:.2em 0}
svg text.tick{paint-order:stroke;stroke:#fff;stroke-width:3px;stroke-linejoin:round} .pcwrap{overflow-x:auto}
"""

SCRIPT = """
(function(){
function pts(pl){return pl.getAttribute('points').trim().split(' ').map(p=>+p.split(',')[1]);}
function svgY(svg,ev){const p=svg.createSVGPoint();p.x=ev.clientX;p.y=ev.clientY;return p.matrixTransform(svg.getScreenCTM().inverse()).y;}
document.querySelectorAll('figure.pc').forEach(function(fig){
  const svg=fig.querySelector('svg'),lines=[...svg.querySelectorAll('.pl')],sel=fig.querySelector('select');
  const ys=lines.map(pts),range={};
  function filter(){lines.forEach((l,i)=>{let on=true;for(const k in range){const y=ys[i][k];if(y<range[k][0]||y>range[k][1])on=false;}
    l.classList.toggle('off',!on);});}
  if(sel)sel.addEventListener('change',function(){const k=+sel.value;
    lines.forEach(l=>l.setAttribute('stroke',l.dataset.c.split('|')[k]));
    svg.querySelectorAll('g.legend').forEach(g=>g.style.display=(+g.dataset.k===k)?'':'none');});
  svg.querySelectorAll('rect.brush').forEach(function(b){
    const k=+b.dataset.i,box=svg.querySelector('rect.sel[data-i="'+k+'"]');let y0=null;
    b.addEventListener('mousedown',ev=>{y0=svgY(svg,ev);ev.preventDefault();});
    svg.addEventListener('mousemove',ev=>{if(y0===null)return;const y=svgY(svg,ev);
      box.setAttribute('y',Math.min(y0,y));box.setAttribute('height',Math.abs(y-y0));});
    svg.addEventListener('mouseup',ev=>{if(y0===null)return;const y=svgY(svg,ev);
      if(Math.abs(y-y0)<3){delete range[k];box.setAttribute('height',0);}else{range[k]=[Math.min(y0,y),Math.max(y0,y)];}
      y0=null;filter();});
  });
});
document.querySelectorAll('figure.pareto, .charts.pareto').forEach(function(box){
  box.querySelectorAll('circle.pt').forEach(function(c){
    c.addEventListener('mouseenter',()=>box.querySelectorAll('circle.pt[data-cfg="'+c.dataset.cfg+'"]').forEach(x=>x.classList.add('hl')));
    c.addEventListener('mouseleave',()=>box.querySelectorAll('circle.pt.hl').forEach(x=>x.classList.remove('hl')));
  });
});
})();
"""


def _t(s) -> str:
    return html.escape("" if s is None else str(s)).replace("://", "&#58;//")


def _g(x: float) -> str:
    return f"{x:.4g}"


@dataclass
class Scale:
    """Maps a column's values to [0, 1] (0 = axis bottom / left): linear, log10, or evenly spaced levels.
    pos(v) is None for a missing value."""
    kind: str                                   # numeric | log | categorical
    pos: Callable[[object], Optional[float]]
    ticks: list[tuple[float, str]] = field(default_factory=list)


def scale_of(values: pd.Series) -> Scale:
    kind = factor_kind(values)
    s = values.dropna()
    if kind == "numeric" and len(s):
        x = s.astype(float)
        x = x[np.isfinite(x)]
        lo, hi = (float(x.min()), float(x.max())) if len(x) else (0.0, 1.0)
        log = lo > 0 and hi / lo > LOG_SPAN
        f = (lambda v: math.log10(v)) if log else (lambda v: v)
        a, b = f(lo), f(hi)
        span = (b - a) or 1.0
        mid = 0.5 if b == a else None

        def pos(v):
            try:
                v = float(v)
            except (TypeError, ValueError):
                return None
            if not math.isfinite(v) or (log and v <= 0):
                return None
            return mid if mid is not None else (f(v) - a) / span
        if log:
            ticks = [(pos(10.0 ** e), f"1e{e}") for e in range(math.ceil(a), math.floor(b) + 1)]
        else:
            ticks = [(pos(v), _g(v)) for v in tick_values(x.tolist())]
        return Scale("log" if log else "numeric", pos, ticks)
    levels = sorted(s.astype(str).unique(), key=lambda v: (v.lower() not in ("false", "true"), v))
    n = len(levels)
    where = {v: (0.5 if n == 1 else i / (n - 1)) for i, v in enumerate(levels)}
    return Scale("categorical", lambda v: None if v is None or v != v else where.get(str(v)),
                 [(where[v], v) for v in levels])


MAX_LEVEL_TICKS = 6


def tick_values(values: Sequence[float], n: int = 5) -> list[float]:
    """Where a linear axis over `values` gets its labels. A few levels (a swept param: depth 0, 1;
    iterations 1, 3): those levels, nothing in between (depth 0.25 means nothing). More: about n
    "nice" values (1, 2, 2.5 or 5 times a power of ten) inside the range, whole numbers only when every
    value is whole."""
    distinct = sorted(set(float(v) for v in values))
    if len(distinct) <= MAX_LEVEL_TICKS:
        return distinct
    lo, hi = distinct[0], distinct[-1]
    whole = all(v.is_integer() for v in distinct)
    mag = 10.0 ** math.floor(math.log10((hi - lo) / (n - 1)))
    steps = [m * mag * f for f in (0.1, 1, 10) for m in ((1, 2, 5) if whole else (1, 2, 2.5, 5))]
    steps = [st for st in steps if not whole or (st >= 1 and float(st).is_integer())]

    def ticks(step: float) -> list[float]:
        k0, k1 = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
        return [round(k * step, 12) for k in range(k0, k1 + 1)]
    # the step whose tick count is nearest n (ties: the coarser step)
    return ticks(min(steps, key=lambda st: (abs(len(ticks(st)) - n), -st)))


def colour(t: Optional[float]) -> str:
    """t in [0, 1] (1 = good) -> '#rrggbb' on bad-yellow-good; None -> grey."""
    if t is None or not math.isfinite(t):
        return NA
    t = min(1.0, max(0.0, t))
    a, b, u = (BAD, MID, t * 2) if t < 0.5 else (MID, GOOD, t * 2 - 1)
    return "#" + "".join(f"{round(x + (y - x) * u):02x}" for x, y in zip(a, b))


def parallel_coordinates(df: pd.DataFrame, dims: Sequence[tuple[str, str]],
                         colour_by: Sequence[tuple[str, str, bool]], tips: Sequence[str], chart_id: str,
                         title: str, caption: str) -> str:
    """One polyline per row of df across the axes `dims` [(column, label)], coloured by one of
    `colour_by` [(column, label, higher_is_better)] (a <select> switches), tooltip tips[i] per row."""
    n = len(dims)
    W, H, left, right, top, bottom = max(720, 92 * n + 60), 440, 50, 50, 56, 44
    xs = [left + (W - left - right) * (i / (n - 1) if n > 1 else 0.5) for i in range(n)]
    ph = H - top - bottom
    scales = [scale_of(df[c]) for c, _ in dims]

    def y_of(p: Optional[float]) -> float:
        return H - bottom + 22 if p is None else top + (1 - p) * ph

    colours = []
    for col, _, higher in colour_by:
        vals = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float) if col in df else np.full(len(df), np.nan)
        fin = vals[np.isfinite(vals)]
        lo, hi = (fin.min(), fin.max()) if len(fin) else (0.0, 1.0)
        t = (vals - lo) / (hi - lo) if hi > lo else np.full(len(vals), 0.5)
        colours.append(([colour(None if not np.isfinite(v) else (u if higher else 1 - u)) for v, u in zip(vals, t)],
                        lo, hi, higher))
    out = [f"<figure class='chart pc' id='{chart_id}'>"]
    if colour_by:
        opts = "".join(f"<option value='{k}'>{_t(label)}</option>" for k, (_, label, _) in enumerate(colour_by))
        out.append(f"<div class='chart-ctl'>colour: <select>{opts}</select> &nbsp;<span class='muted'>drag on an "
                   "axis to keep a range, click it to clear; hover a line for its trial</span></div>")
    # in a narrow window the chart keeps 3/4 of its drawn size (11 px text at 8 px) and scrolls in its box
    out.append(f"<div class='pcwrap'><svg viewBox='0 0 {W} {H}' role='img' aria-label='{_t(title)}' "
               f"style='min-width:{round(PC_MIN_SCALE * W)}px'>")
    # every row's height on every axis, one column at a time (no per-row frame access)
    positions = [[sc.pos(v) for v in df[c].tolist()] for (c, _), sc in zip(dims, scales)]
    ys = [[f"{y_of(p):.1f}" for p in pos] for pos in positions]
    for i, ((col, label), sc, x) in enumerate(zip(dims, scales, xs)):
        out.append(f"<line class='ax' x1='{x:.1f}' x2='{x:.1f}' y1='{top}' y2='{H - bottom}'/>")
        out.append(f"<text x='{x:.1f}' y='{14 if i % 2 == 0 else 30}' text-anchor='middle' font-weight='600'>"
                   f"{_t(label)}<title>{_t(col)}</title></text>")
    xs_text = [f"{x:.1f}" for x in xs]
    for r in range(len(df)):
        pts = " ".join(f"{x},{col[r]}" for x, col in zip(xs_text, ys))
        data_c = "|".join(cs[0][r] for cs in colours) or "#446"
        out.append(f"<polyline class='pl' points='{pts}' stroke='{data_c.split('|')[0]}' data-c='{data_c}'>"
                   f"<title>{_t(tips[r])}</title></polyline>")
    # tick labels after the lines (SVG paints in document order), on a white halo (CSS text.tick): a line
    # passes under a label, never through it
    for i, (sc, x) in enumerate(zip(scales, xs)):
        for p, text in sc.ticks:
            out.append(f"<text class='tick' x='{x + 4:.1f}' y='{y_of(p) + 4:.1f}'>{_t(text)}</text>")
        if None in positions[i]:                     # a row not logged or not set on this axis
            out.append(f"<text class='tick' x='{x + 4:.1f}' y='{y_of(None) + 4:.1f}' fill='#888'>n/a</text>")
    for i, x in enumerate(xs):   # brushes above the lines, so a drag starts on the axis
        out.append(f"<rect class='sel' data-i='{i}' x='{x - 7:.1f}' y='{top}' width='14' height='0'/>"
                   f"<rect class='brush' data-i='{i}' x='{x - 9:.1f}' y='{top}' width='18' height='{ph}'/>")
    out.append(_legends(colour_by, colours, chart_id, W, H))
    out.append(f"</svg></div><figcaption><b>{_t(title)}.</b> {_t(caption)}</figcaption></figure>")
    return "\n".join(out)


def _legends(colour_by, colours, chart_id: str, W: int, H: int) -> str:
    """One gradient bar per colour probe (bad -> good, with the probe's range); only the chosen shows."""
    parts = [f"<defs><linearGradient id='{chart_id}-grad'>"
             + "".join(f"<stop offset='{o}' stop-color='{colour(o)}'/>" for o in (0, 0.5, 1))
             + "</linearGradient></defs>"]
    x0, y0, w = W - 330, H - 16, 160
    for k, ((_, label, _), (_, lo, hi, higher)) in enumerate(zip(colour_by, colours)):
        bad, good = (lo, hi) if higher else (hi, lo)
        hide = "" if k == 0 else " style='display:none'"
        parts.append(f"<g class='legend' data-k='{k}'{hide}>"
                     f"<text x='{x0 - 6}' y='{y0 + 9}' text-anchor='end'>{_t(label)}: {_g(bad)} (bad)</text>"
                     f"<rect x='{x0}' y='{y0}' width='{w}' height='10' fill='url(#{chart_id}-grad)'/>"
                     f"<text x='{x0 + w + 6}' y='{y0 + 9}'>{_g(good)} (good)</text></g>")
    return "".join(parts)


def scatter_panels(table: pd.DataFrame, objectives: Sequence[tuple[str, str]], on_front: Sequence[bool],
                   ids: Sequence[str], tips: Sequence[str], title: str, caption: str) -> str:
    """One scatter panel per pair of objectives (at most 3 pairs): front points dark, others grey;
    hovering a point outlines the same configuration in every panel."""
    pairs = list(combinations(range(len(objectives)), 2))[:3]
    W, H, left, bottom, top, right = 380, 320, 58, 42, 14, 14
    panels = []
    for i, j in pairs:
        (cx, mx), (cy, my) = objectives[i], objectives[j]
        sx, sy = scale_of(table[cx]), scale_of(table[cy])
        pw, ph = W - left - right, H - top - bottom
        pad = 0.05   # points at the ends of a range stay inside the frame
        sx, sy = (Scale(sc.kind, (lambda v, f=sc.pos: None if f(v) is None else pad + (1 - 2 * pad) * f(v)),
                        [(pad + (1 - 2 * pad) * p, t) for p, t in sc.ticks]) for sc in (sx, sy))
        body = [f"<svg viewBox='0 0 {W} {H}' role='img' aria-label='{_t(cx)} vs {_t(cy)}'>",
                f"<line class='ax' x1='{left}' x2='{W - right}' y1='{H - bottom}' y2='{H - bottom}'/>",
                f"<line class='ax' x1='{left}' x2='{left}' y1='{top}' y2='{H - bottom}'/>"]
        for p, text in sx.ticks:
            body.append(f"<text x='{left + p * pw:.1f}' y='{H - bottom + 14}' text-anchor='middle'>{_t(text)}</text>")
        for p, text in sy.ticks:
            body.append(f"<text x='{left - 4}' y='{top + (1 - p) * ph + 4:.1f}' text-anchor='end'>{_t(text)}</text>")
        body.append(f"<text x='{left + pw / 2:.1f}' y='{H - 6}' text-anchor='middle' font-weight='600'>"
                    f"{_t(cx)} ({mx}{', log' if sx.kind == 'log' else ''})</text>")
        body.append(f"<text transform='translate(12,{top + ph / 2:.1f}) rotate(-90)' text-anchor='middle' "
                    f"font-weight='600'>{_t(cy)} ({my}{', log' if sy.kind == 'log' else ''})</text>")
        order = sorted(range(len(table)), key=lambda r: bool(on_front[r]))   # front drawn last, on top
        for r in order:
            px, py = sx.pos(table[cx].iloc[r]), sy.pos(table[cy].iloc[r])
            if px is None or py is None:
                continue
            fill, rad = ("#1f4e9b", 5.5) if on_front[r] else ("#b0b0b0", 4)
            body.append(f"<circle class='pt' data-cfg='{_t(ids[r])}' cx='{left + px * pw:.1f}' "
                        f"cy='{top + (1 - py) * ph:.1f}' r='{rad}' fill='{fill}'><title>{_t(tips[r])}</title></circle>")
        body.append("</svg>")
        panels.append(f"<figure class='chart'>{''.join(body)}</figure>")
    return (f"<div class='charts pareto'>{''.join(panels)}</div>"
            f"<p class='small'><b>{_t(title)}.</b> {_t(caption)}</p>")


def bar_chart(values: dict[str, float], title: str, caption: str = "") -> str:
    """Horizontal bars, largest first: a param importance per bar (fractions of 1)."""
    items = sorted(values.items(), key=lambda kv: -kv[1])
    W, row, left = 380, 22, 130
    H = 30 + row * len(items)
    top = max((v for _, v in items), default=1.0) or 1.0
    body = [f"<svg viewBox='0 0 {W} {H}' role='img' aria-label='{_t(title)}'>",
            f"<text x='4' y='14' font-weight='600'>{_t(title)}</text>"]
    for k, (name, v) in enumerate(items):
        y = 24 + k * row
        w = (W - left - 60) * v / top
        body.append(f"<text x='{left - 6}' y='{y + 13}' text-anchor='end'>{_t(name)}</text>"
                    f"<rect x='{left}' y='{y + 2}' width='{w:.1f}' height='{row - 6}' fill='#4575b4'>"
                    f"<title>{_t(name)}: {v:.3f}</title></rect>"
                    f"<text x='{left + w + 4:.1f}' y='{y + 13}'>{v:.2f}</text>")
    body.append("</svg>")
    cap = f"<figcaption>{_t(caption)}</figcaption>" if caption else ""
    return f"<figure class='chart'>{''.join(body)}{cap}</figure>"


__all__ = ["CSS", "SCRIPT", "Scale", "scale_of", "colour", "parallel_coordinates", "scatter_panels", "bar_chart"]
