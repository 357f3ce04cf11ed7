"""Pages of paper.pdf: a markdown-like text set on A4 portrait pages, its tables drawn as tables and its
figures placed inline, both numbered with captions. Text is measured with matplotlib's font metrics.

The text, one block per line:
    # / ## / ###  headings                 • ...        a bullet
    | ... |       a markdown table          Table: ...   the caption of the next table (else a paragraph
                                            ending in ':' just before it, else its heading)
    Figure: KEY   the figure figures[KEY]   Figure caption: ...  its caption (the line before it)
    \\f           a page break              anything else       a paragraph
"""
from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.lines import Line2D
from matplotlib.textpath import TextToPath

PAGE, MARGIN = (8.27, 11.69), 0.8       # A4 portrait, inches
WIDTH = PAGE[0] - 2 * MARGIN
BODY, CAPTION, LEAD = 9.5, 8.5, 1.38    # points; line height / font size
HEADINGS = {"# ": (15.0, 0.22), "## ": (12.0, 0.16), "### ": (10.5, 0.1)}   # size, space above (in)
TABLE_MAX, TABLE_MIN = 8.5, 5.0        # table font sizes (pt)
FIGURE_DPI = 150
_TTP = TextToPath()


def width_pt(text: str, size: float, bold: bool = False) -> float:
    """The rendered width of one line of text in points."""
    if not text:
        return 0.0
    props = FontProperties(size=size, weight="bold" if bold else "normal")
    return _TTP.get_text_width_height_descent(text, props, ismath=False)[0]


def wrap(text: str, size: float, width_in: float, bold: bool = False) -> list[str]:
    """Greedy word wrap to width_in inches (a word longer than the line stands alone)."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}" if line else word
        if line and width_pt(trial, size, bold) > 72 * width_in:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line] if line else lines


def parse_table(lines: list[str]) -> tuple[list[str], list[list[str]], list[str]]:
    """A markdown table's header, body rows and column alignments (right where the separator ends in ':')."""
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    has_sep = len(cells) > 1 and all(set(c) <= set("-: ") and c for c in cells[1])
    header, body = cells[0], cells[2:] if has_sep else cells[1:]
    align = ["right" if c.endswith(":") else "left" for c in cells[1]] if has_sep else ["left"] * len(header)
    n = len(header)
    return header, [(r + [""] * n)[:n] for r in body], (align + ["left"] * n)[:n]


class Layout:
    """A cursor over pages: each block is placed below the last, on a new page when it does not fit."""

    def __init__(self, figures: dict | None = None):
        self.pages, self.figures, self.tables, self.figure_count = [], figures or {}, 0, 0
        self.heading, self.caption, self.figure_caption = "", None, ""
        self.new_page()

    def new_page(self) -> None:
        self.pages.append(Figure(figsize=PAGE))
        self.y = PAGE[1] - MARGIN

    def fits(self, height: float) -> bool:
        return self.y - height >= MARGIN

    def ensure(self, height: float) -> None:
        if not self.fits(height) and self.y < PAGE[1] - MARGIN:
            self.new_page()

    def put(self, x: float, text: str, size: float, ha: str = "left", **props) -> None:
        self.pages[-1].text(x / PAGE[0], self.y / PAGE[1], text, fontsize=size, va="top", ha=ha, **props)

    def rule(self, width: float = 0.6, right: float = PAGE[0] - MARGIN) -> None:
        """A horizontal line from the left margin to ``right`` (inches)."""
        y = self.y / PAGE[1]
        self.pages[-1].add_artist(Line2D([MARGIN / PAGE[0], right / PAGE[0]], [y, y], lw=width, color="black"))

    def lines(self, lines: list[str], size: float, indent: float = 0.0, first: str = "", **props) -> None:
        step = size * LEAD / 72
        for i, line in enumerate(lines):
            self.ensure(step)
            if i == 0 and first:
                self.put(MARGIN + indent - 0.16, first, size, **props)
            self.put(MARGIN + indent, line, size, **props)
            self.y -= step

    # --- blocks ---------------------------------------------------------------------------------------------
    def heading_block(self, text: str, prefix: str) -> None:
        size, above = HEADINGS[prefix]
        self.y -= above
        self.ensure(size * LEAD / 72 + 0.9)          # a heading is not left alone at the foot of a page
        self.lines(wrap(text, size, WIDTH, bold=True), size, weight="bold")
        self.y -= 0.04
        self.heading = text

    def paragraph(self, text: str) -> None:
        if text.startswith("• "):
            self.lines(wrap(text[2:], BODY, WIDTH - 0.2), BODY, indent=0.2, first="•")
        else:
            self.lines(wrap(text, BODY, WIDTH), BODY)
        self.y -= 0.07

    def caption_lines(self, label: str, text: str) -> list[str]:
        return wrap(f"{label} {text}".strip(), CAPTION, WIDTH, bold=True)

    def table(self, lines: list[str]) -> None:
        header, body, align = parse_table(lines)
        self.tables += 1
        caption = self.caption_lines(f"Table {self.tables}.", self.caption or self.heading)
        self.caption = None
        size, cols = self.table_size(header, body)
        pad, step = 0.6 * size / 72, size * LEAD / 72
        heads = [wrap(h, size, w, bold=True) or [""] for h, w in zip(header, cols)]
        head_h = max(map(len, heads)) * step + 0.06
        cap_h = len(caption) * CAPTION * LEAD / 72 + 0.05
        whole = cap_h + head_h + len(body) * step + 0.1
        if not self.fits(whole) and whole < 0.6 * (PAGE[1] - 2 * MARGIN):
            self.ensure(whole)
        self.ensure(cap_h + head_h + min(3, len(body)) * step)
        self.lines(caption, CAPTION, weight="bold")
        self.y -= 0.03
        xs = MARGIN + np.concatenate([[0.0], np.cumsum([w + 2 * pad for w in cols])])
        rule = lambda width: self.rule(width, right=xs[-1])   # noqa: E731  (the table's own width)

        def draw_header():
            rule(0.9)
            self.y -= 0.03
            top = self.y
            for j, head in enumerate(heads):
                self.y = top
                for line in head:
                    x, ha = (xs[j + 1] - pad, "right") if align[j] == "right" else (xs[j] + pad, "left")
                    self.put(x, line, size, ha=ha, weight="bold")
                    self.y -= step
            self.y = top - max(map(len, heads)) * step - 0.01
            rule(0.5)
            self.y -= 0.03

        draw_header()
        for row in body:
            if not self.fits(step + 0.05):
                rule(0.9)
                self.new_page()
                draw_header()
            for j, cell in enumerate(row):
                x, ha = (xs[j + 1] - pad, "right") if align[j] == "right" else (xs[j] + pad, "left")
                self.put(x, cell, size, ha=ha)
            self.y -= step
        self.y -= 0.01
        rule(0.9)
        self.y -= 0.18

    @staticmethod
    def table_size(header: list[str], body: list[list[str]]) -> tuple[float, list[float]]:
        """The largest font size (TABLE_MIN..TABLE_MAX) at which the columns fit the text width, and the
        column widths (in) at it: each as wide as its widest cell and its header's longest word."""
        def columns(size):
            return [max([width_pt(r[j], size) for r in body] + [width_pt(w, size, True) for w in h.split()] + [1])
                    / 72 for j, h in enumerate(header)]
        size = TABLE_MAX
        for _ in range(3):
            total = sum(columns(size)) + 2 * 0.6 * size / 72 * len(header)
            if total <= WIDTH:
                break
            size = max(TABLE_MIN, size * WIDTH / total * 0.98)
        return size, columns(size)

    def figure(self, key: str) -> None:
        fig = self.figures.get(key)
        if fig is None:
            return
        self.figure_count += 1
        w, h = fig.get_size_inches()
        height = WIDTH * h / w
        caption = self.caption_lines(f"Figure {self.figure_count}.", self.figure_caption)
        self.figure_caption = ""
        self.ensure(height + len(caption) * CAPTION * LEAD / 72 + 0.15)
        canvas = FigureCanvasAgg(fig)
        fig.set_dpi(FIGURE_DPI)
        canvas.draw()
        image = np.array(canvas.buffer_rgba())
        ax = self.pages[-1].add_axes((MARGIN / PAGE[0], (self.y - height) / PAGE[1], WIDTH / PAGE[0], height / PAGE[1]))
        ax.imshow(image, interpolation="none")
        ax.set_axis_off()
        self.y -= height + 0.08
        self.lines(caption, CAPTION)
        self.y -= 0.15

    # --- the text -------------------------------------------------------------------------------------------
    def add(self, text: str) -> "Layout":
        table: list[str] = []
        held = None   # a paragraph ending in ':' becomes the caption of a table that follows it at once
        for line in text.split("\n") + [""]:   # not splitlines(): it splits at the page break \f too
            if line.startswith("|"):
                if held is not None:
                    self.caption, held = held.rstrip(":"), None
                table.append(line)
                continue
            if table:
                self.table(table)
                table = []
            if held is not None and line.strip():
                self.paragraph(held)
                held = None
            prefix = next((p for p in HEADINGS if line.startswith(p)), None)
            if line == "\f":
                self.new_page()
            elif prefix:
                self.heading_block(line[len(prefix):], prefix)
            elif line.startswith("Table: "):
                self.caption = line[len("Table: "):]
            elif line.startswith("Figure caption: "):
                self.figure_caption = line[len("Figure caption: "):]
            elif line.startswith("Figure: "):
                self.figure(line[len("Figure: "):])
            elif line.rstrip().endswith(":"):
                held = line.strip()
            elif line.strip():
                self.paragraph(line)
        if held is not None:
            self.paragraph(held)
        return self

    def finish(self) -> list[Figure]:
        """The pages, numbered at the foot."""
        for i, page in enumerate(self.pages, 1):
            page.text(0.5, 0.45 / PAGE[1], str(i), fontsize=8, ha="center", va="bottom")
        return self.pages
