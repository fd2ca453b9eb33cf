"""The ``mindspeed-cp groups --format html`` page rendered in real headless Chromium.

The page comes from the real command; Chromium loads it from a file and we read back the DOM after its
scripts ran (``--dump-dom``). A probe script appended to a copy of the page reports what the browser
actually rendered: computed colours and boxes of every cell, the legend swatches, and whether hovering a
cell highlights exactly its group. A screenshot is kept at test-artifacts/groups.png.
"""

import html
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from collections import defaultdict

import pytest

from mindspeed_cp.topology import rank_layout
from tests.conftest import ARTIFACTS, ROOT

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (apt-get install chromium); CI installs it"
)

# Runs in the page after its own script; writes what the browser rendered into <pre id="probe">.
PROBE = """<script>
(function () {
  var out = {sections: [], cells: [], legend: [], hover: {}};
  document.querySelectorAll('section.kind').forEach(function (s) { out.sections.push(s.dataset.kind); });
  document.querySelectorAll('td.cell').forEach(function (td) {
    var r = td.getBoundingClientRect(), row = td.parentElement;
    out.cells.push({kind: td.dataset.kind, rank: +td.dataset.rank, group: +td.dataset.group,
                    bg: getComputedStyle(td).backgroundColor, text: td.innerText.replace(/\\s+/g, ' ').trim(),
                    node: Array.prototype.indexOf.call(row.parentElement.children, row),
                    device: Array.prototype.indexOf.call(row.children, td) - 1,
                    x: r.left, y: r.top, w: r.width, h: r.height});
  });
  document.querySelectorAll('ul.legend').forEach(function (ul) {
    ul.querySelectorAll('li').forEach(function (li) {
      out.legend.push({kind: ul.dataset.kind, group: +li.dataset.group, ranks: li.dataset.ranks,
                       bg: getComputedStyle(li.querySelector('.swatch')).backgroundColor});
    });
  });
  document.querySelectorAll('section.kind').forEach(function (s) {
    var cell = s.querySelector('td.cell');
    cell.dispatchEvent(new MouseEvent('mouseover', {bubbles: true}));
    out.hover[s.dataset.kind] = {group: +cell.dataset.group, dimmed: s.classList.contains('hl'),
      on: Array.prototype.map.call(s.querySelectorAll('td.cell.on'), function (c) { return +c.dataset.rank; })};
    s.dispatchEvent(new MouseEvent('mouseleave'));
  });
  var pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script>"""


def chromium(url, tmp_path, *extra):
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        *extra,
        url,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def make_page(tmp_path, args):
    path = tmp_path / "groups.html"
    res = subprocess.run(
        [sys.executable, "-m", "mindspeed_cp", "groups", *map(str, args), "--format", "html", "--output", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    return path


def render(tmp_path, page):
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = chromium(probed.as_uri(), tmp_path, "--dump-dom")
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, "probe did not run: " + dom[-500:]
    return json.loads(html.unescape(found.group(1)))


# (flags, world, tp, pp, cp, algo, ulysses, window, devices per node)
CASES = {
    "hybrid-double-ring": (
        [
            "--world-size",
            16,
            "--tp",
            2,
            "--cp",
            8,
            "--cp-algo",
            "hybrid_cp_algo",
            "--ulysses-degree-in-cp",
            2,
            "--cp-window-size",
            2,
        ],
        (16, 2, 1, 8, "hybrid_cp_algo", 2, 2),
        8,
    ),
    "ring-pp-partial-node": (
        ["--world-size", 12, "--tp", 2, "--pp", 2, "--cp", 3, "--cp-algo", "megatron_cp_algo"],
        (12, 2, 2, 3, "megatron_cp_algo", None, 1),
        8,
    ),
    "64-ranks-4-nodes": (
        ["--world-size", 64, "--cp", 4, "--cp-algo", "megatron_cp_algo", "--cp-window-size", 2, "--nodes", 4],
        (64, 1, 1, 4, "megatron_cp_algo", None, 2),
        16,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rendered_page_matches_rank_layout(case, tmp_path):
    args, shape, devices = CASES[case]
    layout = rank_layout(*shape)
    world = shape[0]
    page = make_page(tmp_path, args)

    source = page.read_text()  # self-contained: nothing to fetch
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)|<link|@import|url\(""", source, re.I)

    got = render(tmp_path, page)
    assert got["sections"] == list(layout)
    cells, legend = defaultdict(list), defaultdict(dict)
    for c in got["cells"]:
        cells[c["kind"]].append(c)
    for item in got["legend"]:
        legend[item["kind"]][item["group"]] = item

    for kind, groups in layout.items():
        kc = cells[kind]
        assert len(kc) == world, kind
        assert sorted(c["rank"] for c in kc) == list(range(world)), kind
        colour_of_group = {}
        for c in kc:
            assert c["rank"] in groups[c["group"]], (kind, c)
            assert (c["node"], c["device"]) == divmod(c["rank"], devices), (kind, c)
            assert c["text"] == f"{c['rank']} g{c['group']}", c
            assert c["w"] > 20 and c["h"] > 20, c  # actually laid out and visible
            assert colour_of_group.setdefault(c["group"], c["bg"]) == c["bg"], (kind, "one group, two colours")
        assert sorted(colour_of_group) == list(range(len(groups))), kind
        assert len(set(colour_of_group.values())) == len(groups), (kind, "two groups share a colour")
        assert all(bg not in ("rgba(0, 0, 0, 0)", "transparent") for bg in colour_of_group.values())
        # the grid: same node = same row, devices left to right
        for a in kc:
            for b in kc:
                if a["node"] == b["node"]:
                    assert abs(a["y"] - b["y"]) < 1
                    assert (a["device"] < b["device"]) == (a["x"] < b["x"] - 1) or a is b
                else:
                    assert (a["node"] < b["node"]) == (a["y"] < b["y"])
        # a legend per kind: every group, its ranks, the colour of its cells
        assert sorted(legend[kind]) == list(range(len(groups))), kind
        for g, item in legend[kind].items():
            assert item["ranks"] == " ".join(map(str, groups[g]))
            assert item["bg"] == colour_of_group[g], (kind, g)
        # hovering a cell highlights exactly its group
        hover = got["hover"][kind]
        assert hover["dimmed"] and sorted(hover["on"]) == sorted(groups[hover["group"]]), (kind, hover)


def test_page_as_shipped_and_screenshot(tmp_path):
    args, shape, devices = CASES["hybrid-double-ring"]
    page = make_page(tmp_path, args)
    dom = chromium(page.as_uri(), tmp_path, "--dump-dom")  # the page itself, scripts run, no probe
    layout = rank_layout(*shape)
    for kind, groups in layout.items():
        assert f'<section class="kind" id="kind-{kind}" data-kind="{kind}"' in dom
        cells = re.findall(
            rf'<td class="cell" data-kind="{kind}" data-rank="(\d+)" data-group="(\d+)" '
            r'style="background-color: ([^"]+)"',
            dom,
        )
        assert sorted((int(r), int(g)) for r, g, _ in cells) == sorted(
            (r, g) for g, ranks in enumerate(groups) for r in ranks
        )
    for text in (
        "all-reduce of activations",
        "gradient all-reduce",
        "point-to-point",
        "all-to-all",
        "send/recv",
        "share one sequence",
    ):
        assert text in dom
    assert "world 16 = TP 2 x CP 8 x DP 1 x PP 1" in dom

    os.makedirs(ARTIFACTS, exist_ok=True)
    shot = os.path.join(ARTIFACTS, "groups.png")
    if os.path.exists(shot):
        os.remove(shot)
    chromium(page.as_uri(), tmp_path, f"--screenshot={shot}", "--window-size=1600,1400")
    with open(shot, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", head[16:24]) == (1600, 1400)
    assert os.path.getsize(shot) > 50_000  # a blank page compresses to a few kB
