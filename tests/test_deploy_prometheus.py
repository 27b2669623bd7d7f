"""deploy/prometheus: the alert rules pass `promtool check rules`, their unit tests pass `promtool test rules`,
every alert has a test that fires and one that stays quiet, and the rules name only metrics the code exports."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from tests.test_deploy_grafana import dashboard_exprs, exported_metric_names, metric_names_in, require_promtool

PROMETHEUS_DIR = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
NEVER_TRUE = "vector(1) < 0"


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(ALERTS), cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", ALERTS_TEST.name, cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_quiet_case_and_a_firing_case() -> None:
    cases: dict[str, dict[str, int]] = {}
    for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for check in test["alert_rule_test"]:
            kind = "firing" if check.get("exp_alerts") else "quiet"
            counts = cases.setdefault(check["alertname"], {"firing": 0, "quiet": 0})
            counts[kind] += 1
    for rule in alert_rules():
        assert cases.get(rule["alert"], {}).get("firing", 0) >= 1, f"{rule['alert']} is never shown firing"
        assert cases.get(rule["alert"], {}).get("quiet", 0) >= 1, f"{rule['alert']} is never shown quiet"


def test_the_firing_cases_depend_on_each_alert_expression(tmp_path: Path) -> None:
    """Replace one alert's expression by one that is never true: its unit tests must then fail, naming it."""
    require_promtool()
    unit_tests = yaml.safe_load(ALERTS_TEST.read_text())
    document = yaml.safe_load(ALERTS.read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            original, rule["expr"] = rule["expr"], NEVER_TRUE
            (tmp_path / ALERTS.name).write_text(yaml.safe_dump(document, sort_keys=False))
            rule["expr"] = original
            # Only this alert's tests, to keep the run short.
            mine = [
                t for t in unit_tests["tests"] if any(c["alertname"] == rule["alert"] for c in t["alert_rule_test"])
            ]
            (tmp_path / ALERTS_TEST.name).write_text(yaml.safe_dump({**unit_tests, "tests": mine}, sort_keys=False))
            result = promtool("test", "rules", ALERTS_TEST.name, cwd=tmp_path)
            assert result.returncode != 0, f"the unit tests still pass with {rule['alert']} disabled"
            assert f"alertname: {rule['alert']}" in result.stdout + result.stderr


def test_rules_name_only_metrics_the_code_exports() -> None:
    exported = exported_metric_names()
    for rule in alert_rules():
        used = metric_names_in(rule["expr"])
        assert used, f"{rule['alert']}: no metric found in {rule['expr']!r}"
        assert used <= exported, f"{rule['alert']} uses unknown metrics {sorted(used - exported)}"


def test_every_exported_metric_is_alerted_on_or_charted() -> None:
    def family(name: str) -> str:
        for suffix in ("_bucket", "_count", "_sum"):
            name = name.removesuffix(suffix)
        return name

    used: set[str] = set()
    for expr in [rule["expr"] for rule in alert_rules()] + dashboard_exprs():
        used |= {family(name) for name in metric_names_in(expr)}
    exported = {family(name) for name in exported_metric_names() if not name.endswith("_created")}
    assert not exported - used, f"exported but neither charted nor alerted on: {sorted(exported - used)}"


def test_every_alert_links_to_its_runbook_section() -> None:
    readme = (PROMETHEUS_DIR.parent / "README.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in readme.splitlines()
        if line.startswith("#")
    }
    for rule in alert_rules():
        document, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert document == "deploy/README.md" and anchor in anchors, f"{rule['alert']}: no section {anchor!r}"
