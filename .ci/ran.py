"""Fail unless a JUnit report shows passed tests from each named test module.

A pass that silently skipped a whole module (a missing service, a broken fixture) would otherwise
look green.
"""

import sys
import xml.etree.ElementTree as ET
from collections import Counter

report, modules = sys.argv[1], sys.argv[2:]
passed: Counter[str] = Counter()
for case in ET.parse(report).getroot().iter("testcase"):  # noqa: S314 (our own pytest wrote it)
    if case.find("skipped") is None and case.find("failure") is None and case.find("error") is None:
        passed[case.get("classname", "").split(".")[-1]] += 1
print("passed per module:", ", ".join(f"{name} {passed[name]}" for name in modules))
missing = [name for name in modules if passed[name] == 0]
if missing:
    sys.exit(f"no test passed in {', '.join(missing)}")
