"""Minutes per test folder from a run's JUnit XML (launch/test.sh writes test-results/junit.xml).

    python launch/test_times.py [test-results/junit.xml] [--slowest N]

Each test's time includes its share of fixture set-up (pytest books a fixture's set-up on the first test
that needs it), so a folder's minutes are what removing the folder would save.
"""

from __future__ import annotations

import argparse
import collections
import sys
import xml.etree.ElementTree as ET


def folder_of(classname: str) -> str:
    # classname is the dotted module path, e.g. tests.dist.test_export or tests.unit.test_data.TestX
    parts = classname.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "tests" else parts[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("junit", nargs="?", default="test-results/junit.xml")
    p.add_argument("--slowest", type=int, default=0, help="also list the N slowest tests")
    a = p.parse_args(argv)
    try:
        root = ET.parse(a.junit).getroot()
    except (OSError, ET.ParseError) as e:
        p.error(f"{a.junit}: {e.strerror if isinstance(e, OSError) else e} (launch/test.sh writes it on every run)")
    per_folder: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    cases = []
    for case in root.iter("testcase"):
        t = float(case.get("time", 0))
        folder = folder_of(case.get("classname", ""))
        per_folder[folder][0] += t
        per_folder[folder][1] += 1
        cases.append((t, f"{case.get('classname')}::{case.get('name')}"))
    total = sum(t for t, _ in cases)
    print("| folder | tests | minutes |")
    print("|---|---:|---:|")
    for folder, (t, n) in sorted(per_folder.items(), key=lambda kv: -kv[1][0]):
        print(f"| {folder} | {n} | {t / 60:.1f} |")
    print(f"| all | {len(cases)} | {total / 60:.1f} |")
    for t, name in sorted(cases, reverse=True)[:a.slowest]:
        print(f"{t:8.1f}s  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
