"""The README as a landing page: short, the two commands on top, no development log.

The docs site itself is checked by ``mkdocs build --strict`` in ``.ci/run``.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
COMMANDS = ('pip install -e . && dynact compare', 'pip install -e ".[dev]" && python -m pytest')


def test_readme_is_at_most_200_lines():
    assert len(README.splitlines()) <= 200


def test_readme_opens_with_the_two_commands():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert first_block is not None and first_block.start() < README.index("\n## ")
    lines = first_block.group(1).splitlines()
    assert [line.split("#")[0].strip() for line in lines] == list(COMMANDS)


def test_readme_names_no_commit():
    hashes = re.findall(r"`[0-9a-f]{7,40}`", README)
    assert not hashes, f"commit-like hashes in the README: {hashes}"
    assert not re.search(r"\bcommit(s|ted)?\b", README, re.I), "the README talks about commits"


def test_readme_links_point_at_files_that_exist():
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    missing = [t for t in targets if "://" not in t and not (ROOT / t).exists()]
    assert targets and not missing, missing
