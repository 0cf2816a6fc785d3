"""The fenced code blocks of README.md, by section: what `tests/test_readme.py` runs against the
demo server and where `.ci/run` takes its test command from. Standard library only (`.ci/run`
calls it before anything is installed): `python3 tests/readme_blocks.py test-command` prints the
quick start's test command."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Block:
    section: str  # the `## ` heading it sits under
    lang: str  # "bash", "python", ...
    code: str


def readme_blocks(text: str | None = None) -> list[Block]:
    """Every fenced block of the README in order, with its section."""
    text = README.read_text(encoding="utf-8") if text is None else text
    blocks: list[Block] = []
    for part in re.split(r"^## ", text, flags=re.MULTILINE)[1:]:
        heading, _, body = part.partition("\n")
        blocks += [Block(heading.strip(), m.group(1), m.group(2)) for m in _FENCE.finditer(body)]
    return blocks


def readme_test_command(blocks: list[Block]) -> str:
    """The quick start's test command: its one bash block that runs pytest."""
    found = [b.code.strip() for b in blocks
             if b.section == "Quick start" and b.lang == "bash" and "pytest" in b.code]
    if len(found) != 1:
        raise SystemExit(f"README.md: expected one test command in the quick start, found {found}")
    return found[0]


if __name__ == "__main__":
    if sys.argv[1:] != ["test-command"]:
        raise SystemExit("usage: python3 tests/readme_blocks.py test-command")
    print(readme_test_command(readme_blocks()))
