"""benchmarks/RESULTS.md: each benchmark script owns one `## <name>` section of it."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = ("# Benchmark results\n\nMeasured numbers for the side-by-side benchmarks in this "
          "folder; each section is written by its benchmark script.\n\n")


def replace_section(section: str, body: str, path: Path = RESULTS) -> None:
    """Put `body` (which starts with the `section` heading) in place of that section of
    `path`, or append it when the file has no such section yet."""
    text = path.read_text() if path.exists() else HEADER
    start = text.find(section + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + body
    else:
        end = text.find("\n## ", start + len(section))
        text = text[:start] + body + ("\n" + text[end + 1:] if end >= 0 else "")
    path.write_text(text)
