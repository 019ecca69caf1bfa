"""The HTML report renders in a real browser (headless Chromium) and every embedded image decodes."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute('data-check', `images=${imgs.length} loaded=${ok} tables=${document.querySelectorAll('table').length} width=${document.body.scrollWidth}`);
});
</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("needs headless Chromium (Debian: apt-get install -y chromium)")


def test_report_renders_and_images_load(tiny_report, tmp_path):
    browser = _chromium()
    page = tmp_path / "page.html"
    page.write_text(tiny_report.report_html.read_text().replace("</body>", CHECK + "</body>"))
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120)
    found = re.search(r'data-check="images=(\d+) loaded=(\d+) tables=(\d+) width=(\d+)"', result.stdout)
    assert found, f"no render result from chromium: {result.stderr[-2000:]}"
    images, loaded, tables, width = map(int, found.groups())
    assert images == loaded == 5
    assert tables >= 3 and width > 0
