"""The cohort report: Tukey outliers by hand, and the page's structure (self-contained, sections, escaping)."""
from html.parser import HTMLParser

from IBIXLogic import cohort, report


class Page(HTMLParser):
    """The tags and text of an HTML page, for structural checks."""

    def __init__(self):
        super().__init__()
        self.images, self.links, self.headings, self.text, self._heading = [], [], [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        if tag in ("a", "link", "script") and (attrs.get("href") or attrs.get("src")):
            self.links.append(attrs)
        if tag in ("h1", "h2", "h3"):
            self._heading = tag

    def handle_endtag(self, tag):
        self._heading = None if tag == self._heading else self._heading

    def handle_data(self, data):
        self.text.append(data)
        if self._heading:
            self.headings.append(data.strip())


def test_tukey_fences_by_hand():
    # quartiles of 1, 2, 3, 4, 100 are 2 and 4: fences 2 - 3 = -1 and 4 + 3 = 7
    found, fences = report.tukey_outliers(list("abcde"), [1, 2, 3, 4, 100], "peak")
    assert fences == (-1.0, 7.0)
    assert [(o.case, o.value) for o in found] == [("e", 100.0)]
    assert report.tukey_outliers(list("abc"), [1, 2, 100], "peak") == ([], None)  # too few cases
    assert report.tukey_outliers(list("abcde"), [1, None, 2, 3, 4], "peak")[0] == []


def test_report_names_outliers_and_failures(tmp_path):
    rows = [{"case": f"c{i}", "status": "ok", "error": "", "evaluations": 10, "seconds": 1.0,
             "reach95_mm": value, "inside_fraction": 0.5, "peak": 1.0, "peak_r_mm": 0.0, "peak_a_mm": 0.0,
             "peak_s_mm": 0.0} for i, value in enumerate([3.0, 3.2, 2.9, 3.1, 30.0])]
    rows.append({"case": "bad <one>", "status": "failed", "error": "x.nrrd: no such file"})
    path = report.write_report(tmp_path, rows, "forward", cohort.statistic_columns("forward"))
    page = Page()
    page.feed(path.read_text())
    assert page.headings[0].startswith("IBIX cohort report: forward maps")
    assert {"Distributions", "Outliers", "Failed cases", "Maps"} <= set(page.headings)
    text = " ".join(page.text)
    assert "c4" in text and "reach95_mm" in text and "bad <one>" in text  # escaped in the HTML, text again here
    assert "<one>" not in path.read_text()
    plots = [i for i in page.images if i["alt"].startswith("distribution of")]
    assert len(plots) == 5  # reach95, inside fraction, peak, evaluations, seconds
    assert page.links == []  # self-contained: nothing fetched or linked
    assert all(image["src"].startswith("data:image/png;base64,") for image in page.images)
    assert "no PNG written" in text  # these cases have no folder


def test_report_says_what_each_case_read_where_the_rows_say(tmp_path):
    rows = [{"case": "a", "status": "ok", "structure": "GTV", "structure_file": "a/rtstruct.dcm",
             "series_uid": "1.2.3", "evaluations": 10, "seconds": 1.0},
            {"case": "b", "status": "failed", "error": "b/rtstruct.dcm: no structure named 'GTV'",
             "structure": "GTV", "structure_file": "b/rtstruct.dcm", "series_uid": None}]
    path = report.write_report(tmp_path, rows, "forward", ["peak"], provenance=cohort.PROVENANCE_COLUMNS)
    table = path.read_text().split("<h2>Statistics of every case</h2>")[1].split("</table>")[0]
    header = [cell.split("</th>")[0] for cell in table.split("<th>")[1:]]
    assert header == ["case", "status", "series_uid", "structure", "structure_file", "evaluations", "seconds", "peak"]
    assert '<td class="text">1.2.3</td><td class="text">GTV</td><td class="text">a/rtstruct.dcm</td><td>10</td>' in table
    assert '<td class="text">failed</td><td class="text"></td><td class="text">GTV</td>' in table  # no series read
    plain = report.write_report(tmp_path, [dict(rows[0], structure=None, structure_file=None, series_uid=None)],
                                "forward", ["peak"], provenance=cohort.PROVENANCE_COLUMNS).read_text()
    assert "series_uid" not in plain and "structure" not in plain  # masks given as files: no empty columns

