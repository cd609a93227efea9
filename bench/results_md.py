"""Write one benchmark's section of bench/RESULTS.md, leaving the others alone."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(heading: str, section: str) -> None:
    """Replace the section that starts with `heading` (up to the next "## "), or append it."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    # The heading's whole line: "## GPU" must not match "## GPU plan ...".
    pattern = re.compile("^" + re.escape(heading) + r"$.*?(?=\n## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    RESULTS.write_text(text)


def publish(heading: str, section: str, started: float) -> None:
    """Print a benchmark's section (and how long it took), then record it in RESULTS.md."""
    print(section)
    print(f"(bench took {time.perf_counter() - started:.0f} s)", file=sys.stderr)
    write_section(heading, section)
