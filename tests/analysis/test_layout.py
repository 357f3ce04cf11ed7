"""The paper's layout: markdown tables parsed and drawn as tables that fit the page, wrapping, numbering."""
from llm_psi.analysis import layout


def test_parse_table_reads_header_rows_and_alignment():
    header, body, align = layout.parse_table(["| a | b | c |", "|---|---:|:--|", "| x | 1 | y |", "| z | 2 |"])
    assert header == ["a", "b", "c"] and body == [["x", "1", "y"], ["z", "2", ""]]
    assert align == ["left", "right", "left"]


def test_wrap_keeps_lines_within_the_width():
    text = "the quick brown fox jumps over the lazy dog " * 8
    lines = layout.wrap(text, 10, 2.0)
    assert len(lines) > 3 and " ".join(lines) == text.strip()
    assert all(layout.width_pt(line, 10) <= 144 for line in lines)


def test_a_wide_table_shrinks_to_fit_and_a_narrow_one_does_not():
    narrow = layout.Layout.table_size(["a", "b"], [["1", "2"]])
    assert narrow[0] == layout.TABLE_MAX
    wide_body = [["x" * 12] * 14]
    size, cols = layout.Layout.table_size(["column"] * 14, wide_body)
    assert layout.TABLE_MIN <= size < layout.TABLE_MAX
    assert sum(cols) + 2 * 0.6 * size / 72 * 14 <= layout.WIDTH or size == layout.TABLE_MIN


def test_tables_and_figures_are_numbered_with_captions():
    from matplotlib.figure import Figure
    fig = Figure(figsize=(4, 2))
    fig.subplots().plot([0, 1], [0, 1])
    lay = layout.Layout({"f": fig}).add("# T\n## Section\nTable: first\n| a | b |\n|---|--:|\n| x | 1 |\n"
                                        "| y | 2 |\nFigure caption: a line\nFigure: f\nFigure: missing\n\f\nend")
    assert (lay.tables, lay.figure_count) == (1, 1)
    pages = lay.finish()
    texts = [t.get_text() for page in pages for t in page.texts]
    assert "Table 1. first" in texts and "Figure 1. a line" in texts and "x" in texts and "2" in texts
    assert len(pages) == 2 and [page.texts[-1].get_text() for page in pages] == ["1", "2"]  # \f; page numbers
    assert "end" in [t.get_text() for t in pages[1].texts]
    assert not any(t.startswith("|") for t in texts)
