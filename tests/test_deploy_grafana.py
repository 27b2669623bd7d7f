"""deploy/grafana: the dashboard charts only metrics the code exports, its PromQL parses (promtool), its panels
do not overlap, and the provisioning files point at it.

The PromQL helpers here are shared with tests/test_deploy_prometheus.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from metering import metrics as metering_metrics
from renderer import metrics as renderer_metrics

GRAFANA_DIR = Path(__file__).resolve().parent.parent / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "export-metering.json"
PROVISIONING = GRAFANA_DIR / "provisioning"

# What promtool gets instead of Grafana's variables when it checks the syntax.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1d"}

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
}
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_NUMBER = re.compile(r"(?<![\w:])\d+(?:\.\d+)?(?:e[+-]?\d+)?(?:ms|[smhdwy])?(?![\w:])", re.IGNORECASE)
_IDENTIFIER = re.compile(r"(?<![\w:])[a-zA-Z_:][\w:]*(?![\w:])(?!\s*\()")
_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
        "atan2",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    }
)


def require_promtool() -> str:
    """promtool comes from deploy/tools/ensure_promtool.sh (make install). Missing in CI is a failure."""
    path = shutil.which("promtool")
    if path is None:
        message = "promtool not found: run deploy/tools/ensure_promtool.sh (Debian package 'prometheus')"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def exported_metric_names() -> frozenset[str]:
    """Every sample name the two metrics modules can expose, labelled series or not."""
    names: set[str] = set()
    for registry in (metering_metrics.REGISTRY, renderer_metrics.REGISTRY):
        for family in registry.collect():
            names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return frozenset(names)


def metric_names_in(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers left after removing strings, label matchers,
    ranges, grouping clauses, Grafana variables, numbers and durations, function calls and keywords."""
    text = _STRING.sub(" ", expr)
    for pattern in (_MATCHERS, _RANGES, _GROUPING, _VARIABLE, _NUMBER):
        text = pattern.sub(" ", text)
    return {name for name in _IDENTIFIER.findall(text) if name.lower() not in _KEYWORDS}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in panels() for target in panel["targets"]]


def test_the_parser_finds_metric_names_and_nothing_else() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (mode, le) (rate(renderer_render_seconds_bucket{outcome="succeeded",'
        ' mode=~"a|b"}[$__rate_interval]))) / on (mode) group_left sum without (instance) '
        "(metering_reservations_in_flight offset 1d) > bool 1e3 and absent(up)"
    )
    assert metric_names_in(expr) == {"renderer_render_seconds_bucket", "metering_reservations_in_flight", "up"}


def test_exported_names_include_suffixes_by_type() -> None:
    names = exported_metric_names()
    assert {"grpc_server_handled_total", "grpc_server_handling_seconds_bucket", "metering_database_up"} <= names
    assert {"renderer_render_seconds_count", "renderer_lambda_throttles_total"} <= names
    assert "metering_denials" not in names  # counters are exposed with _total


def test_every_expr_uses_only_exported_metrics() -> None:
    exported = exported_metric_names()
    for panel in panels():
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            used = metric_names_in(target["expr"])
            assert used, f"{panel['title']!r}: no metric in {target['expr']!r}"
            assert used <= exported, f"{panel['title']!r} uses unknown metrics {sorted(used - exported)}"


def test_every_expr_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query, with Grafana's variables replaced, as a recording rule."""
    rules = []
    for panel in panels():
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{panel['title']!r}: unknown Grafana variable in {expr!r}"
            rules.append({"record": f"dashboard:panel_{panel['id']}_{target['refId']}", "expr": expr})
    rule_file = tmp_path / "dashboard_rules.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [require_promtool(), "check", "rules", str(rule_file)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_dashboard_is_self_consistent() -> None:
    board = dashboard()
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    assert board["uid"] and board["timezone"] == "utc"  # "yesterday" is metering's UTC day
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    cells: dict[tuple[int, int], str] = {}
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, f"{panel['title']!r} is wider than the grid"
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]
    for panel in panels():
        assert panel["datasource"]["uid"] == "${datasource}"
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), f"{panel['title']!r}: refIds repeat"


def test_the_dashboard_covers_what_operators_asked_for() -> None:
    titles = " | ".join(panel["title"].lower() for panel in panels())
    for wanted in (
        "rpc rate",
        "rpc latency",
        "reservations in flight",
        "denials by tier",
        "exports by status",
        "render time p50 / p95",
        "outbox depth",
        "lambda invocations",
        "exports yesterday by format",
        "daily limit",
        "users near their daily limit",
    ):
        assert wanted in titles, f"no panel about {wanted!r}"
    yesterday = next(panel for panel in panels() if "yesterday" in panel["title"].lower())
    assert (yesterday["timeFrom"], yesterday["timeShift"]) == ("now/d", "1d/d")  # the whole previous day
    # Every export of the day once, whatever its outcome: the count GetStats and the CLI give.
    (expr,) = [target["expr"] for target in yesterday["targets"]]
    assert 'status="reserved"' in expr and "by (format)" in expr
    near = next(panel for panel in panels() if "users near" in panel["title"].lower())
    assert [target["expr"] for target in near["targets"]] == ["max by (tier) (metering_users_near_limit)"]


def test_provisioning_points_at_the_dashboard_directory() -> None:
    dashboards = yaml.safe_load((PROVISIONING / "dashboards" / "export-metering.yaml").read_text())
    (provider,) = dashboards["providers"]
    assert dashboards["apiVersion"] == 1 and provider["type"] == "file"
    assert provider["options"]["path"].endswith("/export-metering")
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())
    assert [source["type"] for source in datasources["datasources"]] == ["prometheus"]
