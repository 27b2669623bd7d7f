"""deploy/lambda: the SAM template passes cfn-lint and says what the backend relies on; the build packs a
self-contained handler with ffmpeg."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import pytest
from cfnlint.decode import decode

from renderer.lambda_backend import LambdaBackendConfig
from tests.support.lambda_env import fake_aws_credentials, moto_s3_server

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
        if "s3:ListBucket" in actions:  # listing only under a prefix: the renders', or the sources' (404s)
            prefix = statement["Condition"]["StringLike"]["s3:prefix"]["Fn::Sub"]
            sources = statement["Sid"] == "SeeMissingSources"
            assert prefix.startswith("${SourcePrefix}" if sources else "${RendersPrefix}")
    assert _actions(by_sid["SeeMissingSources"]) == ["s3:ListBucket"]
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


# What the Lambda Python runtime brings besides the standard library.
LAMBDA_RUNTIME_MODULES = ("boto3", "botocore", "s3transfer", "jmespath", "dateutil", "urllib3", "six")
linux_x86_64 = pytest.mark.skipif(
    sys.platform != "linux" or os.uname().machine != "x86_64", reason="packs Linux x86_64 ffmpeg"
)


@pytest.fixture(scope="module")
def staging(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lambda-build")
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "build.py"), "--from-env", "--no-zip", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return out / "package"


@linux_x86_64
def test_build_stages_handler_project_and_ffmpeg(staging: Path) -> None:
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


@linux_x86_64
def test_the_packed_handler_renders_with_only_the_lambda_runtime_beside_it(staging: Path, tmp_path: Path) -> None:
    """The staged package alone (plus what the Lambda runtime provides), in an isolated interpreter, renders
    and uploads: nothing comes from the repo or the project's virtualenv."""
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    for name in LAMBDA_RUNTIME_MODULES:
        module = importlib.import_module(name)
        source = Path(module.__file__ or "")
        source = source.parent if source.name == "__init__.py" else source
        (runtime / source.name).symlink_to(source)
    event = {
        "action": "render", "export_id": "packed-1", "format": "mp4",
        "composition": {"width": 160, "height": 120, "fps": 10, "duration_seconds": 1.0, "background": "navy",
                        "clips": [{"source": "testsrc:", "start": 0, "trim_start": 0, "duration": 1.0}],
                        "texts": [{"text": "packed", "start": 0, "end": 1.0, "x": 8, "y": 8, "font_size": 16,
                                   "color": "white"}],
                        "audio": [{"source": "sine:440", "start": 0, "volume": 0.5}]},
    }
    script = (
        "import json, sys\n"
        "sys.path[:0] = sys.argv[1:3]\n"
        "import renderer.lambda_handler as h, imageio_ffmpeg, ffmpeg\n"
        "for module in (h, imageio_ffmpeg, ffmpeg):\n"
        "    assert module.__file__.startswith(sys.argv[1]), module.__file__\n"
        "print(json.dumps(h.handler(json.loads(sys.argv[3]), None)))\n"
    )
    with moto_s3_server() as endpoint, fake_aws_credentials() as aws_env:
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="packed")
        env = {**aws_env, "PATH": "/usr/bin:/bin", "AWS_ENDPOINT_URL_S3": endpoint, "RENDER_BUCKET": "packed"}
        result = subprocess.run(
            [sys.executable, "-I", "-S", "-c", script, str(staging), str(runtime), json.dumps(event)],
            capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        answer = json.loads(result.stdout.strip().splitlines()[-1])
        assert (answer["bucket"], answer["key"], answer["frames"]) == ("packed", "renders/packed-1.mp4", 10)
        head = s3.head_object(Bucket="packed", Key="renders/packed-1.mp4")
        assert head["ContentLength"] == answer["size"] > 0
        assert head["ContentType"] == "video/mp4"
