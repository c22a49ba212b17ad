"""The skips a machine without some device takes are ones `.ci/run` accepts: it fails on any other reason (so that a
broken import cannot hide a suite behind a green run), and a reason worded otherwise failed CI on a Mac (mps)."""

import re
from pathlib import Path

TESTS = Path(__file__).parent


def test_every_skip_reason_in_the_suite_is_one_ci_accepts():
    accepted = re.search(r"grep -vE ': \((.*)\)\$'", (TESTS.parent / ".ci" / "run").read_text())[1]
    reasons = [
        reason
        for path in TESTS.rglob("test_*.py")
        for line in path.read_text().splitlines()
        if "importorskip" not in line  # a missing dev dependency must fail CI
        for reason in re.findall(r'(?:pytest\.skip\(|reason=)f?"([^"]+)"', line)
    ]
    assert len(reasons) > 3 and [reason for reason in reasons if not re.fullmatch(accepted, reason)] == []
