"""Renderer settings that cannot work are refused when the renderer starts, naming the variable, before any
render is reserved: not at the first render, after metering has counted it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from renderer.config import ConfigError, RendererConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
LAMBDA = {"LAMBDA_FUNCTION_NAME": "export-render"}


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
