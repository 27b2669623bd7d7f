"""lambda_local speaks the Lambda Invoke API, and the backend's invoke client copes with what Lambda does:
function errors, timeouts, throttling. A trivial probe handler stands in for the render function here."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aioboto3
import pytest
from botocore.exceptions import ClientError

from renderer.domain import RenderError
from renderer.lambda_backend import (
    LambdaBackendConfig,
    LambdaFunctionError,
    LambdaInvoker,
    LambdaThrottled,
    backoff_delay,
    lambda_client_config,
)
from renderer.lambda_local import LocalLambdaSettings, function_name_from
from tests.support.lambda_env import (
    PROBE_HANDLER,
    LambdaEnv,
    fake_aws_credentials,
    lambda_environment,
    lambda_local_process,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
async def env() -> AsyncIterator[LambdaEnv]:
    async with lambda_environment(
        functions={"probe": PROBE_HANDLER, "slow": PROBE_HANDLER}, timeouts={"slow": 1}, workers=2
    ) as lambda_env:
        yield lambda_env


@pytest.fixture(autouse=True)
async def clean_switches(env: LambdaEnv) -> None:
    await env.configure(throttle_next=0, max_concurrency=None, reset_stats=True)


def config_for(env: LambdaEnv, function: str = "probe", **overrides: Any) -> LambdaBackendConfig:
    settings: dict[str, Any] = {"throttle_base_delay_seconds": 0.01, "throttle_max_delay_seconds": 0.05}
    settings.update(overrides)
    return LambdaBackendConfig(function_name=function, bucket=env.bucket, endpoint_url=env.lambda_endpoint,
                               s3_endpoint_url=env.s3_endpoint, **settings)


async def invoke(env: LambdaEnv, event: dict[str, Any], function: str = "probe", **overrides: Any) -> Any:
    config = config_for(env, function, **overrides)
    async with aioboto3.Session().client(
        "lambda", endpoint_url=env.lambda_endpoint, config=lambda_client_config(config)
    ) as client:
        return await LambdaInvoker(client, config).invoke(event)


async def raw_invoke(env: LambdaEnv, function: str, event: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """boto3's view of one invoke, no retries, no interpretation."""
    config = config_for(env, function)
    async with aioboto3.Session().client(
        "lambda", endpoint_url=env.lambda_endpoint, config=lambda_client_config(config)
    ) as client:
        response = await client.invoke(FunctionName=function, Payload=json.dumps(event).encode(), **kwargs)
        response["Body"] = await response["Payload"].read()
        return response


async def test_request_response_returns_the_handlers_json(env: LambdaEnv) -> None:
    response = await raw_invoke(env, "probe", {"op": "echo", "value": [1, "two"]})
    assert response["StatusCode"] == 200
    assert "FunctionError" not in response
    body = json.loads(response["Body"])
    assert body["event"] == {"op": "echo", "value": [1, "two"]}
    assert body["function"] == "probe"
    assert 0 < body["remaining_ms"] <= 900_000


async def test_function_arn_and_qualifier_name_the_same_function(env: LambdaEnv) -> None:
    arn = "arn:aws:lambda:us-east-1:123456789012:function:probe"
    response = await raw_invoke(env, arn, {"op": "echo"})
    assert json.loads(response["Body"])["function"] == "probe"
    assert function_name_from("probe:live") == "probe"
    assert function_name_from(arn + ":7") == "probe"


async def test_unknown_function_is_resource_not_found(env: LambdaEnv) -> None:
    with pytest.raises(ClientError) as caught:
        await raw_invoke(env, "no-such-function", {})
    assert caught.value.response["Error"]["Code"] == "ResourceNotFoundException"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    with pytest.raises(RenderError, match="ResourceNotFoundException"):
        await invoke(env, {}, function="no-such-function")


async def test_handler_exception_is_an_unhandled_function_error(env: LambdaEnv) -> None:
    response = await raw_invoke(env, "probe", {"op": "fail", "message": "bad frame 7"})
    assert response["StatusCode"] == 200
    assert response["FunctionError"] == "Unhandled"
    body = json.loads(response["Body"])
    assert body["errorType"] == "ValueError"
    assert body["errorMessage"] == "bad frame 7"
    assert isinstance(body["stackTrace"], list)
    with pytest.raises(LambdaFunctionError, match="ValueError: bad frame 7"):
        await invoke(env, {"op": "fail", "message": "bad frame 7"})


async def test_event_invocation_is_accepted_and_runs_with_the_callers_environment(env: LambdaEnv) -> None:
    response = await raw_invoke(
        env, "probe", {"op": "s3_put", "bucket": env.bucket, "key": "probe/event.txt", "body": "hello"},
        InvocationType="Event",
    )
    assert response["StatusCode"] == 202
    assert response["Body"] == b""
    s3 = env.s3_client()
    for _ in range(100):  # the event runs after the 202
        listed = s3.list_objects_v2(Bucket=env.bucket, Prefix="probe/event.txt")
        if listed.get("KeyCount"):
            break
        await asyncio.sleep(0.05)
    assert s3.get_object(Bucket=env.bucket, Key="probe/event.txt")["Body"].read() == b"hello"


async def test_dry_run_runs_nothing(env: LambdaEnv) -> None:
    response = await raw_invoke(env, "probe", {"op": "fail"}, InvocationType="DryRun")
    assert response["StatusCode"] == 204
    assert (await env.state())["stats"]["invocations"] == {}


async def test_timeout_kills_the_worker_and_answers_like_lambda(env: LambdaEnv) -> None:
    response = await raw_invoke(env, "slow", {"op": "sleep", "seconds": 60})
    assert response["FunctionError"] == "Unhandled"
    assert "Task timed out after 1.00 seconds" in json.loads(response["Body"])["errorMessage"]
    with pytest.raises(LambdaFunctionError, match="timed out"):
        await invoke(env, {"op": "sleep", "seconds": 60}, function="slow")
    # The killed workers were replaced: both slots serve again.
    answers = await asyncio.gather(*(invoke(env, {"op": "sleep", "seconds": 0.2}) for _ in range(2)))
    assert len({answer["pid"] for answer in answers}) == 2
    assert (await env.state())["stats"]["timed_out"] == 2


async def test_timeout_also_kills_what_the_handler_started(env: LambdaEnv, tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    with pytest.raises(LambdaFunctionError, match="timed out"):
        await invoke(env, {"op": "child_sleep", "seconds": 60, "pid_file": str(pid_file)}, function="slow")
    child = int(pid_file.read_text())
    for _ in range(50):
        if not process_alive(child):
            break
        await asyncio.sleep(0.05)
    assert not process_alive(child)


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


async def test_timeout_can_be_changed_per_function_at_run_time(env: LambdaEnv) -> None:
    await env.configure(timeouts={"probe": 0.5})
    try:
        with pytest.raises(LambdaFunctionError, match=r"Task timed out after 0\.50 seconds"):
            await invoke(env, {"op": "sleep", "seconds": 30})
    finally:
        await env.configure(timeouts={"probe": 900})


async def test_a_crashed_worker_is_a_function_error_and_is_replaced(env: LambdaEnv) -> None:
    with pytest.raises(LambdaFunctionError, match=r"Runtime\.ExitError"):
        await invoke(env, {"op": "exit", "code": 3})
    assert (await invoke(env, {"op": "echo"}))["event"] == {"op": "echo"}


async def test_throttled_invocations_are_retried_until_lambda_runs_it_once(env: LambdaEnv) -> None:
    await env.configure(throttle_next=3)
    with pytest.raises(ClientError) as caught:  # without our retries, the caller sees Lambda's 429
        await raw_invoke(env, "probe", {"op": "echo"})
    assert caught.value.response["Error"]["Code"] == "TooManyRequestsException"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 429

    answer = await invoke(env, {"op": "echo", "n": 1})
    assert answer["event"] == {"op": "echo", "n": 1}
    stats = (await env.state())["stats"]
    assert stats["throttled"] == 3
    assert stats["invocations"] == {"probe": 1}


async def test_throttling_that_never_ends_fails_the_render(env: LambdaEnv) -> None:
    await env.configure(throttle_next=100)
    with pytest.raises(LambdaThrottled, match="throttled probe 3 times"):
        await invoke(env, {"op": "echo"}, throttle_retries=2)
    assert (await env.state())["stats"]["invocations"] == {}


async def test_concurrency_limit_throttles_the_excess_and_retries_get_through(env: LambdaEnv) -> None:
    await env.configure(max_concurrency=1)
    outcomes = await asyncio.gather(
        *(raw_invoke(env, "probe", {"op": "sleep", "seconds": 0.5}) for _ in range(2)), return_exceptions=True
    )
    throttled = [o for o in outcomes if isinstance(o, ClientError)]
    assert len(throttled) == 1
    assert throttled[0].response["Error"]["Code"] == "TooManyRequestsException"

    await env.configure(reset_stats=True)
    answers = await asyncio.gather(*(
        invoke(env, {"op": "sleep", "seconds": 0.3}, throttle_base_delay_seconds=0.1, throttle_max_delay_seconds=1)
        for _ in range(3)
    ))
    assert [answer["slept"] for answer in answers] == [0.3, 0.3, 0.3]
    stats = (await env.state())["stats"]
    assert stats["invocations"] == {"probe": 3}
    assert stats["peak_running"] == 1
    assert stats["throttled"] >= 1


async def test_a_read_timeout_is_never_retried_by_botocore(env: LambdaEnv) -> None:
    # The caller gives up before the function ends; a retry would run the render a second time.
    with pytest.raises(RenderError, match="no answer"):
        await invoke(env, {"op": "sleep", "seconds": 1.5}, timeout_seconds=0.4, read_timeout_margin_seconds=0)
    await asyncio.sleep(1.5)
    assert (await env.state())["stats"]["invocations"] == {"probe": 1}


def test_backoff_is_capped_exponential_with_full_jitter() -> None:
    assert backoff_delay(0, 0.25, 20, rng=lambda: 0.999) == pytest.approx(0.25, rel=0.01)
    assert backoff_delay(3, 0.25, 20, rng=lambda: 0.5) == pytest.approx(1.0)
    assert backoff_delay(30, 0.25, 20, rng=lambda: 1.0) == 20
    assert backoff_delay(5, 0.25, 20, rng=lambda: 0.0) == 0


async def test_admin_endpoint_rejects_bad_settings(env: LambdaEnv) -> None:
    request = urllib.request.Request(
        f"{env.lambda_endpoint}/_local/state", data=json.dumps({"throttle_next": -1}).encode(), method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        await asyncio.to_thread(urllib.request.urlopen, request, timeout=5)
    assert caught.value.code == 400
    assert (await env.state())["throttle_next"] == 0


async def test_stopping_lambda_local_stops_its_workers() -> None:
    with fake_aws_credentials():
        async with lambda_local_process({"probe": PROBE_HANDLER}, workers=1) as endpoint:
            env = LambdaEnv("", endpoint, "unused", "probe")
            pid = (await invoke(env, {"op": "echo"}))["pid"]
            assert process_alive(pid)
    assert not process_alive(pid)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("LAMBDA_LOCAL_LISTEN", "9001", "LAMBDA_LOCAL_LISTEN must be host:port"),
        ("LAMBDA_LOCAL_WORKERS", "0", "LAMBDA_LOCAL_WORKERS must be at least 1"),
        ("LAMBDA_LOCAL_FUNCTIONS", "render", "LAMBDA_LOCAL_FUNCTIONS: expected name=value"),
        ("LAMBDA_LOCAL_TIMEOUTS", "other=3", "unknown function 'other'"),
        ("LAMBDA_LOCAL_TIMEOUT_SECONDS", "-1", "LAMBDA_LOCAL_TIMEOUT_SECONDS must be positive"),
        ("LAMBDA_LOCAL_MAX_CONCURRENCY", "many", "LAMBDA_LOCAL_MAX_CONCURRENCY must be a number"),
    ],
)
def test_bad_settings_are_refused_naming_the_variable(variable: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        LocalLambdaSettings.from_env({variable: value})


def test_default_settings_serve_the_render_handler() -> None:
    settings = LocalLambdaSettings.from_env({"LAMBDA_FUNCTION_NAME": "renders", "LAMBDA_LOCAL_TIMEOUTS": "renders=5"})
    assert (settings.host, settings.port, settings.workers) == ("127.0.0.1", 9001, 2)
    [function] = settings.functions
    assert (function.name, function.handler, function.timeout_seconds) == (
        "renders", "renderer.lambda_handler:handler", 5.0
    )
