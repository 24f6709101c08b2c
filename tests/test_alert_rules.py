"""The alert rules in manifests/base/alerts/, checked with Prometheus's own promtool.

- `promtool check rules` accepts the plain rules file and the PrometheusRule's groups;
- `promtool test rules` runs the unit tests beside them, in which each alert fires on one synthetic
  server and stays silent on another (under the threshold, over it for less than `for:`, or moving
  the harmless way), and each test here checks that every alert has both;
- the PrometheusRule holds exactly the plain file's groups (run this file as a script to regenerate
  it), and the drift thresholds are the server's own (serving/drift.py DRIFT_THRESHOLDS);
- no PrometheusRule CRD is vendored (none in ../shared/crds), so `prometheus_rule_errors` checks its
  structure against a schema written here from the Prometheus Operator's API (monitoring.coreos.com/v1):
  tests/test_manifests.py applies it to the rendered manifests.

Debian's `prometheus` package ships promtool; `make test` installs it when it is missing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ALERTS = Path(__file__).resolve().parents[1] / "manifests" / "base" / "alerts"
RULES_FILE = ALERTS / "shopvision-alerts.rules.yaml"
UNIT_TESTS = ALERTS / "shopvision-alerts.test.yaml"
PROMETHEUS_RULE = ALERTS / "prometheusrule.yaml"
HEADER = """\
# The prediction server's alerts for the Prometheus Operator (kube-prometheus-stack): the groups of
# shopvision-alerts.rules.yaml, which is the file to edit (and to load into a plain Prometheus);
# tests/test_alert_rules.py fails when the two differ. Regenerate this file after an edit with
#   .venv/bin/python tests/test_alert_rules.py
# A Prometheus picks it up when its ruleSelector matches these labels (docs/cluster.md).
"""
METADATA = {
    "name": "shopvision-serving",
    "labels": {"app.kubernetes.io/name": "shopvision-serving", "app.kubernetes.io/component": "alerts"},
}
DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
PROMETHEUS_RULE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": {"type": "string", "pattern": DURATION},
                            "limit": {"type": "integer"},
                            "partial_response_strategy": {"type": "string"},
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["expr"],
                                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                    "additionalProperties": False,
                                    "properties": {
                                        "alert": {"type": "string"},
                                        "record": {"type": "string"},
                                        "expr": {"type": ["string", "integer"]},
                                        "for": {"type": "string", "pattern": DURATION},
                                        "keep_firing_for": {"type": "string", "pattern": DURATION},
                                        "labels": _STRINGS,
                                        "annotations": _STRINGS,
                                    },
                                },
                            },
                        },
                    },
                }
            },
        },
    },
}


def prometheus_rule_errors(obj: dict) -> list[str]:
    """What is wrong with a PrometheusRule object, by the schema above (the CRD is not vendored)."""
    validator = jsonschema.Draft7Validator(PROMETHEUS_RULE_SCHEMA)
    where = f"PrometheusRule/{obj.get('metadata', {}).get('name')}"
    return [
        f"{where}: {'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)
    ]


def rendered_prometheus_rule(groups: dict) -> str:
    body = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": METADATA,
        "spec": groups,
    }
    return HEADER + yaml.safe_dump(body, sort_keys=False, width=100)


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is needed: apt-get install prometheus (make test installs it when missing)")
    return found


def run_promtool(*args: str, cwd: Path = ALERTS) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def rules() -> dict:
    return yaml.safe_load(RULES_FILE.read_text())


def alerts() -> dict[str, dict]:
    return {rule["alert"]: rule for group in rules()["groups"] for rule in group["rules"] if "alert" in rule}


def test_promtool_accepts_the_rules_file_and_the_prometheus_rule(tmp_path):
    done = run_promtool("check", "rules", str(RULES_FILE))
    assert done.returncode == 0, done.stdout + done.stderr
    spec = yaml.safe_load(PROMETHEUS_RULE.read_text())["spec"]
    (tmp_path / "from-prometheusrule.yaml").write_text(yaml.safe_dump(spec))
    done = run_promtool("check", "rules", str(tmp_path / "from-prometheusrule.yaml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 5 rules found" in done.stdout


def test_promtool_unit_tests_pass():
    done = run_promtool("test", "rules", UNIT_TESTS.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_unit_tests_would_catch_a_changed_threshold(tmp_path):
    """The unit tests are not vacuous: the same tests fail on rules with a threshold moved."""
    changed = RULES_FILE.read_text().replace('statistic="category"} > 0.15', 'statistic="category"} > 0.25')
    assert changed != RULES_FILE.read_text()
    (tmp_path / RULES_FILE.name).write_text(changed)
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    done = run_promtool("test", "rules", UNIT_TESTS.name, cwd=tmp_path)
    assert done.returncode != 0 and "ShopvisionCategoryDrift" in done.stdout + done.stderr


def test_every_alert_has_a_unit_test_firing_and_one_not_firing():
    tests = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    for name, rule in alerts().items():
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case["exp_alerts"] for case in mine), f"{name} is never shown firing"
        assert any(not case["exp_alerts"] for case in mine), f"{name} is never shown silent"
        assert rule["labels"]["severity"] in ("info", "warning", "critical")
        assert rule["for"] and {"summary", "description"} <= set(rule["annotations"])
    # each firing case also leaves a series beside it silent: only one alert is expected
    for case in cases:
        assert len(case["exp_alerts"]) <= 1


def test_drift_thresholds_are_the_servers():
    from shopvision.serving.drift import DRIFT_THRESHOLDS, STATISTICS

    found = {}
    for rule in alerts().values():
        for statistic, value in re.findall(
            r'shopvision_drift_score\{statistic="(\w+)"\} > ([0-9.]+)', rule["expr"]
        ):
            found[statistic] = float(value)
    assert found == DRIFT_THRESHOLDS and set(found) == set(STATISTICS)


def test_the_prometheus_rule_holds_exactly_the_rules_file():
    assert PROMETHEUS_RULE.read_text() == rendered_prometheus_rule(rules()), (
        "prometheusrule.yaml is stale: run .venv/bin/python tests/test_alert_rules.py"
    )
    obj = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert obj["spec"] == rules()
    assert prometheus_rule_errors(obj) == []


def test_the_structure_check_catches_a_broken_prometheus_rule():
    obj = yaml.safe_load(PROMETHEUS_RULE.read_text())
    obj["spec"]["groups"][0]["rules"][0]["for"] = "half an hour"
    obj["spec"]["groups"][0]["rules"][1]["severity"] = "warning"  # belongs under labels
    del obj["spec"]["groups"][0]["rules"][2]["expr"]
    problems = prometheus_rule_errors(obj)
    assert len(problems) == 3, problems


if __name__ == "__main__":  # regenerate prometheusrule.yaml from the rules file
    PROMETHEUS_RULE.write_text(rendered_prometheus_rule(rules()))
    print(f"wrote {PROMETHEUS_RULE}", file=sys.stderr)
