"""Builds the Lambda artifact: deploy/lambda/build/lambda.zip.

The zip holds the handler (renderer.lambda_handler.handler) with the project's renderer package, gen/, and
the runtime dependencies the Lambda Python runtime lacks: ffmpeg-python (+ future), protobuf, and the
imageio-ffmpeg wheel with its Linux x86_64 ffmpeg binary. boto3 comes with the runtime.

    python deploy/lambda/build.py                 # dependencies: pip, for the Lambda platform (manylinux x86_64,
                                                  # CPython 3.11), whatever machine builds it
    python deploy/lambda/build.py --from-env      # dependencies: copied from this interpreter's installed
                                                  # distributions (offline; needs Linux x86_64 CPython 3.11)
    python deploy/lambda/build.py --no-zip        # stop at the staging directory (build/package)
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
LAMBDA_PYTHON = "3.11"  # template.yaml: Runtime python3.11
LAMBDA_PLATFORM = "manylinux2014_x86_64"  # template.yaml: Architectures x86_64
RUNTIME_REQUIREMENTS = ("ffmpeg-python", "imageio-ffmpeg", "protobuf")
PROJECT_PACKAGES = ((REPO_ROOT / "renderer", "renderer"), (REPO_ROOT / "gen" / "exportapi", "exportapi"))
# Fixed timestamp: the same sources make the same zip (and SAM skips an unchanged upload).
ZIP_DATE = (2020, 1, 1, 0, 0, 0)


def _ignore(_directory: str, names: list[str]) -> set[str]:
    return {name for name in names if name == "__pycache__" or name.endswith((".pyc", ".pyo"))}


def copy_project(staging: Path) -> None:
    for source, name in PROJECT_PACKAGES:
        shutil.copytree(source, staging / name, ignore=_ignore)


def install_with_pip(staging: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(staging),
         "--platform", LAMBDA_PLATFORM, "--implementation", "cp", "--python-version", LAMBDA_PYTHON,
         "--only-binary=:all:", *RUNTIME_REQUIREMENTS],
        check=True,
    )


def _requirement_names(dist: metadata.Distribution) -> list[str]:
    names = []
    for requirement in dist.requires or []:
        if "extra ==" in requirement:
            continue
        names.append(re.split(r"[\s;<>=!~\[(]", requirement.strip(), maxsplit=1)[0])
    return names


def copy_from_env(staging: Path) -> None:
    """Copies the installed files of the runtime requirements and what they require."""
    if (sys.platform, platform.machine(), f"{sys.version_info[0]}.{sys.version_info[1]}") != (
        "linux", "x86_64", LAMBDA_PYTHON
    ):
        raise SystemExit(f"--from-env needs Linux x86_64 CPython {LAMBDA_PYTHON}; use the pip mode instead")
    pending, seen = list(RUNTIME_REQUIREMENTS), set()
    while pending:
        name = pending.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        dist = metadata.distribution(name)
        for file in dist.files or []:
            if file.parts[0].endswith((".dist-info", ".egg-info")) or ".." in file.parts or "__pycache__" in file.parts:
                continue
            source = Path(str(dist.locate_file(file)))
            if not source.is_file():
                continue
            target = staging / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        pending += _requirement_names(dist)


def check_ffmpeg(staging: Path) -> Path:
    binaries = sorted((staging / "imageio_ffmpeg" / "binaries").glob("ffmpeg-linux-x86_64*"))
    if not binaries:
        raise SystemExit("the imageio-ffmpeg Linux x86_64 binary is missing from the package")
    for binary in binaries:
        binary.chmod(0o755)
    return binaries[0]


def write_zip(staging: Path, zip_path: Path) -> None:
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    partial = zip_path.with_suffix(".zip.partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo(path.relative_to(staging).as_posix(), date_time=ZIP_DATE)
            info.external_attr = ((0o755 if os.access(path, os.X_OK) else 0o644) | 0o100000) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            with path.open("rb") as source, archive.open(info, "w") as target:
                shutil.copyfileobj(source, target, 1024 * 1024)
    partial.replace(zip_path)


def build(out: Path, *, from_env: bool, make_zip: bool) -> Path:
    staging = out / "package"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    copy_project(staging)
    (copy_from_env if from_env else install_with_pip)(staging)
    check_ffmpeg(staging)
    if not make_zip:
        return staging
    zip_path = out / "lambda.zip"
    write_zip(staging, zip_path)
    return zip_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "build", help="output directory (deploy/lambda/build)")
    parser.add_argument("--from-env", action="store_true", help="copy dependencies from this interpreter")
    parser.add_argument("--no-zip", action="store_true", help="stop at the staging directory")
    args = parser.parse_args(argv)
    result = build(args.out.resolve(), from_env=args.from_env, make_zip=not args.no_zip)
    files = [result] if result.is_file() else [p for p in result.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    print(f"{result} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
