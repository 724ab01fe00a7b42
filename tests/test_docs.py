"""The documentation site: a strict ``mkdocs build`` and the Python examples of the guides.

* ``mkdocs build --strict`` must succeed without a single warning (broken links, pages missing
  from the nav, API reference objects that do not resolve, ...);
* every ```` ```python ```` block of the pages listed in ``EXECUTED_PAGES`` is executed, in page
  order, in one namespace per page, offline, in a temporary folder. A block preceded by a line
  ``<!-- docs-test: skip (reason) -->`` is not run (network, GPUs, downloaded files).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SKIP_MARK = "<!-- docs-test: skip"

#: Pages whose Python blocks are complete, runnable programs (fast, offline, CPU).
EXECUTED_PAGES = [
    "index.md",
    "getting-started.md",
    "concepts/lsq.md",
    "concepts/profiles.md",
    "concepts/detr-family.md",
    "concepts/calibration.md",
    "concepts/distillation-overview.md",
    "concepts/deploy-profile.md",
    "how-to/quantize-your-detector.md",
    "how-to/train-on-coco.md",
    "how-to/convert-release-checkpoints.md",
    "how-to/push-to-hub.md",
]

#: One API reference page per public package.
REFERENCE_PAGES = {
    "reference/qdetr.md": "qdetr",
    "reference/quant.md": "qdetr.quant",
    "reference/distill.md": "qdetr.distill",
    "reference/models.md": "qdetr.models",
    "reference/zoo.md": "qdetr.zoo",
    "reference/data.md": "qdetr.data",
    "reference/engine.md": "qdetr.engine",
    "reference/ops.md": "qdetr.ops",
    "reference/export.md": "qdetr.export",
}

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[ \t]*$")


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """``(line number, code, skipped)`` for every fenced ``python`` block of a markdown text."""
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match or not match["lang"]:
            i += 1
            continue
        indent, lang, start = match["indent"], match["lang"], i
        body = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            line = lines[i]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            i += 1
        i += 1
        if lang == "python":
            previous = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            blocks.append((start + 1, "\n".join(body) + "\n", previous.startswith(SKIP_MARK)))
    return blocks


def test_python_blocks_parser_handles_indented_and_skipped_blocks():
    text = "intro\n\n<!-- docs-test: skip (network) -->\n```python\nx = 1\n```\n\n- item:\n\n    ```python\n    y = 2\n    ```\n"
    assert python_blocks(text) == [(4, "x = 1\n", True), (10, "y = 2\n", False)]


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs is not installed")
def test_mkdocs_build_is_strict_and_warning_free(tmp_path):
    pytest.importorskip("mkdocstrings")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-5000:]
    assert "WARNING" not in log, log[-5000:]
    ids_by_page = {}
    for page, module in REFERENCE_PAGES.items():
        html = (tmp_path / "site" / page.removesuffix(".md") / "index.html").read_text(encoding="utf-8")
        ids_by_page[page] = set(re.findall(r'id="([^"]+)"', html))
        assert module in ids_by_page[page], f"{page} does not render {module}"
    all_ids = set().union(*ids_by_page.values())
    # Every public name of every package is documented: on its package's page, or (for a function that
    # shares its name with its module, e.g. qdetr.quant.calibrate) under its defining path.
    undocumented = []
    for page, module in REFERENCE_PAGES.items():
        package = importlib.import_module(module)
        for name in package.__all__:
            if name.startswith("_"):
                continue
            obj = getattr(package, name)
            defined_at = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
            if f"{module}.{name}" not in ids_by_page[page] and defined_at not in all_ids:
                undocumented.append(f"{module}.{name}")
    assert not undocumented, f"missing from the API reference: {undocumented}"


def test_reference_pages_point_at_the_packages():
    for page, module in REFERENCE_PAGES.items():
        assert f"::: {module}\n" in (DOCS / page).read_text(encoding="utf-8"), page


@pytest.mark.parametrize("page", EXECUTED_PAGES)
def test_python_examples_of_the_guides_run(page, tmp_path, monkeypatch):
    blocks = python_blocks((DOCS / page).read_text(encoding="utf-8"))
    runnable = [(line, code) for line, code, skipped in blocks if not skipped]
    assert runnable, f"{page} has no runnable python block; remove it from EXECUTED_PAGES"
    if any("transformers" in code for _, code in runnable):
        pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QDETR_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("QDETR_CACHE", str(tmp_path / "cache"))
    namespace: dict = {"__name__": f"docs_{Path(page).stem.replace('-', '_')}"}
    for line, code in runnable:
        try:
            exec(compile(code, f"{page}:{line}", "exec"), namespace)  # noqa: S102 - our own documentation
        except Exception as error:  # noqa: BLE001 - report which block failed
            raise AssertionError(f"docs/{page}, block at line {line} failed: {type(error).__name__}: {error}") from error
