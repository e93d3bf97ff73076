"""The report (analysis/report.py): self-contained HTML, figures, the first lines a reader sees, n/a
for what an old sweep lacks.

The store: tests/helpers/analysis_store.py (the `store` and `s1` fixtures of tests/analysis/conftest.py)."""
from __future__ import annotations

import base64
import os
import struct
import zlib
from html.parser import HTMLParser
from analysis.load import load_sweep
from analysis.report import write_report
from analysis.verdict import compute_verdict


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.links, self.scripts = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "link":
            self.links.append(a)
        if tag == "script":
            self.scripts.append(a)


def _valid_png(raw: bytes) -> bool:
    """Signature, then CRC-checked chunks from IHDR to IEND."""
    if raw[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    pos, kinds = 8, []
    while pos < len(raw):
        (length,) = struct.unpack(">I", raw[pos:pos + 4])
        kind, data = raw[pos + 4:pos + 8], raw[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", raw[pos + 8 + length:pos + 12 + length])
        if zlib.crc32(kind + data) != crc:
            return False
        kinds.append(kind)
        pos += 12 + length
    return kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds


def test_html_report_is_self_contained(s1, tmp_path):
    data, v = s1
    paths = write_report(data, v, str(tmp_path))
    text = open(paths["html"]).read()
    p = _Collect()
    p.feed(text)
    assert len(p.imgs) >= 4
    for src in p.imgs:
        assert src.startswith("data:image/png;base64,")
        assert _valid_png(base64.b64decode(src.split(",", 1)[1], validate=True))
    low = text.lower()
    assert "http://" not in low and "https://" not in low
    assert p.links == [] and all("src" not in s for s in p.scripts)
    md = open(paths["markdown"]).read()
    pngs = sorted(f for f in os.listdir(tmp_path) if f.endswith(".png"))
    assert len(pngs) == len(p.imgs)
    for f in pngs:
        assert f"]({f})" in md
    assert open(paths["verdict"]).readline().startswith('{"escaped": "yes", ')


def test_figures_drawn_by_forked_workers_equal_those_drawn_in_one_process(s1, tmp_path):
    """make_plots draws each figure whole in one of `workers` forked processes: the figure records,
    their order and every PNG byte are those of the one-process run; a figure that cannot be drawn
    is still one 'skipped' record in its place."""
    from analysis import plots
    from analysis.verdict import annotate
    data, v = s1
    trials, _, swept = annotate(data)
    swept = swept + ["no.such_param"]          # one figure per swept factor: this one cannot be drawn
    runs = {}
    for n in (1, 3):
        out = tmp_path / f"w{n}"
        figs = plots.make_plots(trials, data.histories, v, str(out), swept, workers=n)
        runs[n] = (figs, {f: (out / f).read_bytes() for f in sorted(os.listdir(out))})
    assert runs[1] == runs[3]
    figs, files = runs[1]
    assert any("skipped" in f and "no.such_param" in f["title"] for f in figs)
    assert len(files) == sum("file" in f for f in figs) >= 4


def _visible_text(html_text: str) -> list[str]:
    """The report's text in reading order, one entry per text node (no style block)."""
    class Text(HTMLParser):
        def __init__(self):
            super().__init__()
            self.out, self.skip = [], False

        def handle_starttag(self, tag, attrs):
            self.skip = tag == "style"

        def handle_data(self, data):
            if not self.skip and data.strip():
                self.out.append(" ".join(data.split()))
    t = Text()
    t.feed(html_text)
    return t.out


def test_first_lines_state_answer_instrument_test_margin_and_level(s1, tmp_path):
    data, v = s1
    paths = write_report(data, v, str(tmp_path))
    head = " ".join(_visible_text(open(paths["html"]).read())[1:8])   # [0] is the <title>
    assert head.startswith("Escaped: YES Instrument: validated.")
    for words in ("Welch one-sided non-inferiority", "margin 0.01", "alpha = 0.05", "margin 1 decade(s)"):
        assert words in head, head
    md = open(paths["markdown"]).read().splitlines()
    assert md[0] == "# Escaped: YES" and md[2].startswith("**Instrument: validated.**")
    assert "margin 0.01," in md[4] and "level alpha = 0.05" in md[4] and "Holm" in md[4]
    # reasons sit under their row (a full-width row), not in a column that widens the table
    text = open(paths["html"]).read()
    assert "why not" not in text and text.count("<tr class='why'>") == sum(
        1 for c in v.configurations if c.role != "reference")


def test_report_of_an_old_sweep_shows_na_not_zero(store, tmp_path):
    data = load_sweep("capsweep", store["uri"], "tiny", progress=False)
    v = compute_verdict(data)
    paths = write_report(data, v, str(tmp_path))
    md = open(paths["markdown"]).read()
    row = next(l for l in md.splitlines() if l.startswith("| c01 |"))          # depth 1, one seed
    cells = [c.strip() for c in row.strip("|").split("|")]
    # test acc, delta acc, grad ratio, min act_grad, starved, dead, frozen, tree score, routing dyn.
    assert cells[4:] == ["0.7", "-0.2", "n/a", "n/a", "n/a", "0.1", "n/a", "0.3 (null n/a)", "0.02 (null n/a)"]
    assert md.splitlines()[0] == "# Inconclusive: no healthy control in the sweep"   # old sweep: no cnn control
    assert "Not drawn: Gradient floor: log10 min act_grad against hidden capsule layers (depth): n/a" in md


def test_html_and_markdown_render_the_same_sections_in_the_same_order(s1, tmp_path):
    """One list of sections (analysis/report.py SECTIONS), rendered twice: the two files' headings agree
    in order; the interactive explorer is the one section only HTML has."""
    import re

    from analysis.report import SECTIONS, render_html, render_markdown
    data, verdict = s1
    views = {"search": {"skipped": "not computed"}, "repro": [("git", "abc")], "ui": None}
    figures = [{"title": "a figure", "caption": "c", "skipped": "no data"}]
    html_text = render_html(data, verdict, figures, str(tmp_path), views)
    md_text = render_markdown(verdict, figures, views)
    h2_html = [re.sub(r"<[^>]+>", "", h) for h in re.findall(r"<h2[^>]*>(.*?)</h2>", html_text)]
    h2_md = [line[3:] for line in md_text.splitlines() if line.startswith("## ")]
    assert h2_html == ["Configurations", "Thresholds and rules", "Failed, diverged and unfinished trials",
                       "Explore the trials", "Hyperparameter search", "Figures", "Trends", "Reproducibility"]
    assert h2_md == [h for h in h2_html if h != "Explore the trials"]
    assert [s.name for s in SECTIONS][:3] == ["headline", "notes", "configurations"]
    assert md_text.splitlines()[0].startswith("# ") and "a figure: no data" in md_text and "a figure" in html_text
