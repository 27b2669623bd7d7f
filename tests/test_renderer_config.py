"""Renderer settings that cannot work are refused when the renderer starts, naming the variable, before any
render is reserved: not at the first render, after metering has counted it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from renderer.config import ConfigError, RendererConfig
from renderer.lambda_backend import LambdaBackendConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
LAMBDA = {"LAMBDA_FUNCTION_NAME": "export-render", "AWS_REGION": "eu-west-1"}


@pytest.mark.parametrize("bucket", ["s3://renders", "renders/prefix", "Renders", "ab", "-renders", "a..b", "x" * 64])
def test_a_render_bucket_that_is_no_s3_bucket_name_is_refused(bucket: str) -> None:
    with pytest.raises(ConfigError, match=r"RENDER_BUCKET: .* is not an S3 bucket name"):
        RendererConfig.from_env({**LAMBDA, "RENDER_BUCKET": bucket})


def test_source_buckets_are_checked_too_and_good_names_pass() -> None:
    with pytest.raises(ConfigError, match=r"RENDER_SOURCE_BUCKETS: 's3://assets' is not an S3 bucket name"):
        RendererConfig.from_env({"RENDER_SOURCE_BUCKETS": "media, s3://assets"})
    config = RendererConfig.from_env({**LAMBDA, "RENDER_BUCKET": "renders.example-1", "RENDER_SOURCE_BUCKETS": "a1b"})
    assert config.lambda_settings is not None and config.lambda_settings.bucket == "renders.example-1"
    assert config.source_buckets == {"a1b"}


def test_lambda_needs_a_region_under_either_of_its_names_and_a_prefix_the_function_accepts() -> None:
    # botocore reads only AWS_DEFAULT_REGION: with AWS_REGION alone every Lambda render failed after reserving.
    lambda_only = {"LAMBDA_FUNCTION_NAME": "export-render", "RENDER_BUCKET": "renders"}
    with pytest.raises(ConfigError, match=r"no AWS region is: set AWS_REGION \(or AWS_DEFAULT_REGION\)"):
        RendererConfig.from_env(lambda_only)
    with pytest.raises(ConfigError, match=r"AWS_REGION: 's3://eu' is not an AWS region name"):
        RendererConfig.from_env({**lambda_only, "AWS_REGION": "s3://eu"})
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        settings = RendererConfig.from_env({**lambda_only, name: "ap-southeast-2"}).lambda_settings
        assert settings is not None and settings.region == "ap-southeast-2" and settings.key_prefix == "renders/"
    settings = RendererConfig.from_env({**LAMBDA, "RENDER_BUCKET": "renders", "RENDER_KEY_PREFIX": "exports/v2/"})
    assert settings.lambda_settings is not None
    backend = LambdaBackendConfig.from_settings(settings.lambda_settings)
    assert (backend.key_prefix, backend.region) == ("exports/v2/", "eu-west-1")
    for prefix in ("exports", "/exports/", "../x/", "a b/"):
        with pytest.raises(ConfigError, match="RENDER_KEY_PREFIX"):
            RendererConfig.from_env({**LAMBDA, "RENDER_BUCKET": "renders", "RENDER_KEY_PREFIX": prefix})


@pytest.mark.parametrize("variable", ["RENDER_OUTPUT_DIR", "RENDER_STATE_DIR"])
def test_a_directory_the_renderer_cannot_write_stops_the_start_with_exit_2(tmp_path: Path, variable: str) -> None:
    not_a_directory = tmp_path / "a-file"
    not_a_directory.write_text("")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RENDER", "METERING_"))}
    env.update(
        {
            "RENDERER_LISTEN": "127.0.0.1:0",
            "METERING_TARGET": "127.0.0.1:1",  # never called: the check comes first
            "RENDER_OUTPUT_DIR": str(tmp_path / "out"),
            "RENDER_STATE_DIR": str(tmp_path / "state"),
            variable: str(not_a_directory / "renders"),
        }
    )
    done = subprocess.run(
        [sys.executable, "-m", "renderer"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"renderer: configuration error: {variable}=" in done.stderr
    assert "not a directory the renderer can write to" in done.stderr and "Traceback" not in done.stderr


def test_lambda_sources_are_checked_against_the_functions_own_bucket_and_prefix() -> None:
    # Checked before reserving, with what the function's role may read: not RENDER_SOURCE_BUCKETS, which also
    # turns on s3:// sources for local renders.
    from renderer.domain import Clip, Composition, RenderMode
    from renderer.errors import SourceRefused
    from renderer.server import build_backends

    def composition(source: str) -> Composition:
        return Composition(width=160, height=120, fps=10, duration_seconds=1.0, clips=(Clip(source, 0, 0, 1.0),))

    env = {**LAMBDA, "RENDER_BUCKET": "renders", "RENDER_LAMBDA_SOURCE_BUCKETS": "media",
           "RENDER_LAMBDA_SOURCE_PREFIX": "sources/"}
    config = RendererConfig.from_env(env)
    assert config.source_buckets == frozenset()  # local renders still read no s3:// sources
    backend = build_backends(config)[RenderMode.LAMBDA]
    backend.check(composition("s3://media/sources/a.mp4"))
    with pytest.raises(SourceRefused, match="bucket 'other' is not allowed"):
        backend.check(composition("s3://other/sources/a.mp4"))
    with pytest.raises(SourceRefused, match="only keys under 'sources/'") as caught:
        backend.check(composition("s3://media/private/a.mp4"))
    assert caught.value.field == "composition.clips[0].source"
    older = {**LAMBDA, "RENDER_BUCKET": "r01", "RENDER_SOURCE_BUCKETS": "m01"}  # before the Lambda's own list
    fallback = build_backends(RendererConfig.from_env(older))
    with pytest.raises(SourceRefused, match="not allowed"):
        fallback[RenderMode.LAMBDA].check(composition("s3://other/a.mp4"))
    for name, value in (("RENDER_LAMBDA_SOURCE_BUCKETS", "s3://media"), ("RENDER_LAMBDA_SOURCE_PREFIX", "sources")):
        with pytest.raises(ConfigError, match=name):
            RendererConfig.from_env({**env, name: value})
