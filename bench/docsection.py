"""Write one benchmark's section of docs/benchmarks.md, leaving the other sections alone."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def write_section(heading: str, text: str, doc_path: Path = DOC) -> None:
    """Replace the section that starts with `heading` (a '## ' line) by `text`, or append it."""
    doc = doc_path.read_text() if doc_path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(doc):
        doc = pattern.sub(lambda _: text.rstrip() + "\n\n", doc)
    else:
        doc = doc.rstrip() + "\n\n" + text.rstrip() + "\n"
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    doc_path.write_text(doc)
