"""The alert rules load in Prometheus' own checker and pass their unit tests (promtool).

No servers needed: promtool evaluates dashboards/alerts.test.yml against synthetic series.
Under CI (CI=true) a missing promtool fails the test; elsewhere it skips.
"""
from __future__ import annotations

import subprocess

from tests.support.prometheus import DASHBOARDS, tool


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True, timeout=60, cwd=DASHBOARDS)


def test_alert_rules_are_valid() -> None:
    proc = promtool("check", "rules", "alerts.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_alert_has_unit_tests_and_they_pass() -> None:
    rules = (DASHBOARDS / "alerts.yml").read_text()
    tests = (DASHBOARDS / "alerts.test.yml").read_text()
    alerts = [line.split(":", 1)[1].strip() for line in rules.splitlines() if line.strip().startswith("- alert:")]
    assert len(alerts) >= 8
    cases: dict[str, set[str]] = {name: set() for name in alerts}
    lines = [line.strip() for line in tests.splitlines()]
    for i, line in enumerate(lines):  # "alertname: X" is followed by "exp_alerts: []" (silent) or "exp_alerts:" (firing)
        if line.startswith("alertname:"):
            name = line.split(":", 1)[1].strip()
            assert name in cases, f"alerts.test.yml tests an unknown alert {name}"
            cases[name].add("silent" if lines[i + 1] == "exp_alerts: []" else "firing")
    for name, seen in cases.items():
        assert seen == {"silent", "firing"}, f"{name}: alerts.test.yml must test it firing and not firing (has {seen or 'none'})"
    proc = promtool("test", "rules", "alerts.test.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
