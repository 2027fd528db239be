"""`make help` stays true: it lists every target the Makefile defines; variables reach the CLI."""

import re
import subprocess

from conftest import ROOT


def test_make_help_lists_every_target():
    targets = re.findall(r"^([a-zA-Z][a-zA-Z_-]*):", (ROOT / "Makefile").read_text(), flags=re.M)
    out = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    listed = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert set(targets) == listed
    assert subprocess.run(["make", "-s"], cwd=ROOT, capture_output=True, text=True).stdout == out  # default


def test_precision_reaches_every_run_target_as_a_recorded_argument():
    for target in ("run-next", "run-specific", "run-all"):
        cmd = ["make", "-n", target, "MODEL=gpt_demo", "PRECISION=bf16-true", "ARGS=--train.max_tokens=64"]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
        assert "--args='--precision=bf16-true --train.max_tokens=64'" in out, out
