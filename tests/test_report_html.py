"""`report.html` rendering of the report's Markdown subset: tables, escaping, lists, embedded images."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
from PIL import Image

from mvtec_seg.report.html import markdown_to_html


def test_markdown_subset(tmp_path: Path) -> None:
    (tmp_path / "plots").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "plots" / "a.png")
    md = "\n".join(
        [
            "# Title <x>",
            "",
            "Runs: **3** under `out/a|b`.",
            "",
            "| category | unet / gt |",
            "|:---|---:|",
            "| a\\|b | 0.500 |",
            "",
            "![bars](plots/a.png)",
            "![gone](plots/missing.png)",
            "- note one",
            "- note two",
        ]
    )
    page = markdown_to_html(md, tmp_path)
    assert "<h1>Title &lt;x&gt;</h1>" in page
    assert "<p>Runs: <strong>3</strong> under <code>out/a|b</code>.</p>" in page
    assert "<tr><th>category</th><th class=num>unet / gt</th></tr>" in page
    assert "<tr><td>a|b</td><td class=num>0.500</td></tr>" in page
    data = (tmp_path / "plots" / "a.png").read_bytes()
    assert f'src="data:image/png;base64,{base64.b64encode(data).decode()}"' in page
    assert 'src="plots/missing.png"' in page  # unreadable: the relative link stays
    assert "<ul><li>note one</li><li>note two</li></ul>" in page
