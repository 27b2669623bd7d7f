"""deploy/lambda: the SAM template passes cfn-lint and says what the backend relies on; the build packs a
self-contained handler with ffmpeg."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cfnlint.decode import decode

from renderer.lambda_backend import LambdaBackendConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY = REPO_ROOT / "deploy" / "lambda"
TEMPLATE = DEPLOY / "template.yaml"
CFN_LINT = Path(sys.executable).with_name("cfn-lint")


def cfn_lint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CFN_LINT), str(path)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    decoded, problems = decode(str(TEMPLATE))
    assert not problems, problems
    assert decoded is not None
    return decoded


def test_template_passes_cfn_lint() -> None:
    result = cfn_lint(TEMPLATE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cfn_lint_really_checks_the_serverless_resources(tmp_path: Path) -> None:
    broken = tmp_path / "template.yaml"
    broken.write_text(TEMPLATE.read_text().replace("!GetAtt RenderFunction.Arn", "!GetAtt RenderFunktion.Arn"))
    result = cfn_lint(broken)
    assert result.returncode != 0
    assert "RenderFunktion" in result.stdout


def test_function_matches_what_the_backend_assumes(template: dict[str, Any]) -> None:
    function = template["Resources"]["RenderFunction"]
    assert function["Type"] == "AWS::Serverless::Function"
    props = function["Properties"]
    assert props["Timeout"] == 900
    # The backend's HTTP read timeout must outlast the function, or botocore gives up before Lambda answers.
    assert LambdaBackendConfig("f", "b").read_timeout_seconds > props["Timeout"]
    assert LambdaBackendConfig("f", "b").timeout_seconds == props["Timeout"]
    assert template["Parameters"]["MemorySize"]["Default"] >= 3008
    assert props["EphemeralStorage"]["Size"] == {"Ref": "EphemeralStorageSize"}
    assert props["Architectures"] == ["x86_64"]
    assert props["EventInvokeConfig"]["MaximumRetryAttempts"] == 0
    module_name, _, attr = props["Handler"].rpartition(".")
    assert callable(getattr(importlib.import_module(module_name), attr))
    assert props["Environment"]["Variables"]["RENDER_BUCKET"] == {"Ref": "RenderBucket"}


def test_function_role_reads_sources_and_writes_only_under_the_renders_prefix(template: dict[str, Any]) -> None:
    policies = template["Resources"]["RenderFunctionRole"]["Properties"]["Policies"]
    statements = [s for policy in policies for s in policy["PolicyDocument"]["Statement"]]
    assert all(s["Effect"] == "Allow" for s in statements)
    s3_statements = [s for s in statements if any(a.startswith("s3:") for a in _actions(s))]
    by_sid = {s["Sid"]: s for s in s3_statements}
    assert _actions(by_sid["ReadSources"]) == ["s3:GetObject"]
    for statement in s3_statements:
        actions = _actions(statement)
        assert not any("*" in action for action in actions)
        if {"s3:PutObject", "s3:DeleteObject"} & set(actions):
            resource = statement["Resource"]["Fn::Sub"]
            assert resource.startswith("${RenderBucket.Arn}/${RendersPrefix}"), statement
        if "s3:ListBucket" in actions:
            assert statement["Condition"]["StringLike"]["s3:prefix"]["Fn::Sub"].startswith("${RendersPrefix}")
    log_actions = {a for s in statements for a in _actions(s) if a.startswith("logs:")}
    assert log_actions <= {"logs:CreateLogStream", "logs:PutLogEvents"}


def test_parts_of_abandoned_renders_expire(template: dict[str, Any]) -> None:
    rules = template["Resources"]["RenderBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]
    parts = next(rule for rule in rules if rule["Id"] == "expire-render-parts")
    assert parts["Prefix"] == {"Fn::Sub": "${RendersPrefix}_parts/"}
    assert parts["ExpirationInDays"] == 1


def _actions(statement: dict[str, Any]) -> list[str]:
    actions = statement["Action"]
    return [actions] if isinstance(actions, str) else list(actions)


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64", reason="packs Linux x86_64 ffmpeg")
def test_build_stages_handler_project_and_ffmpeg(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "build.py"), "--from-env", "--no-zip", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    staging = tmp_path / "package"
    assert (staging / "renderer" / "lambda_handler.py").is_file()
    assert (staging / "exportapi" / "renderer" / "v1" / "renderer_pb2.py").is_file()
    assert (staging / "ffmpeg" / "__init__.py").is_file()  # ffmpeg-python
    assert not list(staging.rglob("__pycache__"))
    [binary] = (staging / "imageio_ffmpeg" / "binaries").glob("ffmpeg-linux-x86_64*")
    assert os.access(binary, os.X_OK)
    # The packed ffmpeg is found by imageio-ffmpeg from the package alone, as on Lambda.
    probe = subprocess.run(
        [sys.executable, "-I", "-c",
         "import sys; sys.path.insert(0, sys.argv[1]); import imageio_ffmpeg; print(imageio_ffmpeg.get_ffmpeg_exe())",
         str(staging)],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip().startswith(str(staging))
