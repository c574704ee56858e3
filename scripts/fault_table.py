"""Re-run the issue-17 fault table: ``python scripts/fault_table.py [--fast]``.

Runs every ``test_row_NN_*`` in tests/test_faults.py (``--fast`` skips the two slow row-12 runs),
then prints one line per row (pass/fail, which tests) and the numbers the tests measured: time to
the config errors, time to exit after a hang, what a second run on a locked dir prints.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys

ROWS = {1: "two runs on one run dir", 2: "random bytes in a checkpoint / non-finite state",
        3: "truncated / garbage latest checkpoint", 4: "corrupt SFT-cache entry", 5: "annotation-cache swap / nesting",
        6: "fallback reference cached under Gemini's identity", 7: "annotator hang / timeout / base URL",
        8: "deeply nested <tool_call>", 9: "env thread that never returns", 10: "env.reward() NaN",
        11: "inf / huge learning rate", 12: "SIGTERM during SFT / exit code", 13: "late / misnamed config errors",
        14: "partial metrics.jsonl line", 15: "annotator counters after resume", 16: "all-equal float32 rewards"}


def main() -> int:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    row16 = "tests/test_advantages.py::test_exactly_equal_rewards_get_exactly_zero_advantage_and_count_as_zero_std"
    args = [sys.executable, "-m", "pytest", "tests/test_faults.py", row16, "-rA", "-s", "-p", "no:cacheprovider",
            "--timeout", "1200"]
    if "--fast" in sys.argv:
        args += ["-m", "not slow"]
    out = subprocess.run(args, cwd=repo, capture_output=True, text=True)
    results = collections.defaultdict(list)
    for status, name in re.findall(r"^(PASSED|FAILED|ERROR|SKIPPED) \S+::(test_\S+)", out.stdout, re.M):
        row = 16 if name.startswith("test_exactly_equal") else int(name.split("_")[2])
        results[row].append((name, status))
    print(f"{'row':>3}  {'result':6}  fault  [tests]")
    ok = True
    for row, what in ROWS.items():
        statuses = [s for _, s in results.get(row, [])]
        verdict = "PASS" if statuses and all(s == "PASSED" for s in statuses) else ("—" if not statuses else "FAIL")
        ok &= verdict != "FAIL"
        print(f"{row:>3}  {verdict:6}  {what}  [{len(statuses)} tests]")
    print("\nmeasured:")
    for line in out.stdout.splitlines():
        if re.search(r"second run on a locked dir|config errors from the CLI|hung (annotator|env)|SIGTERM (during|after)", line):
            print("  " + re.sub(r"^[.F]*", "", line.strip()))
    failed = [line for line in out.stdout.splitlines() if re.match(r"(FAILED|ERROR) \S+::", line)]
    tail = failed + (out.stdout.strip().splitlines()[-1:] if out.stdout.strip() else [])
    print("\n" + "\n".join(tail))
    return 0 if ok and out.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
