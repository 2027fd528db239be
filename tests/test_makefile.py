"""`make help` stays true: it lists every target the Makefile defines."""

import re
import subprocess

from conftest import ROOT


def test_make_help_lists_every_target():
    targets = re.findall(r"^([a-zA-Z][a-zA-Z_-]*):", (ROOT / "Makefile").read_text(), flags=re.M)
    out = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    listed = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert set(targets) == listed
    assert subprocess.run(["make", "-s"], cwd=ROOT, capture_output=True, text=True).stdout == out  # default
