"""The committed gen/ is exactly what protos/ generates: CI fails when someone edits one without the other."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_committed_gen_matches_protos(tmp_path: Path) -> None:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    # -o: never reinstall the venv from inside a test.
    command = ["make", "--no-print-directory", "-o", ".venv/.installed", "gen", f"GEN_DIR={tmp_path / 'gen'}"]
    result = subprocess.run(
        [*command, f"PY={sys.executable}"], cwd=REPO, env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    differences = _diff(filecmp.dircmp(REPO / "gen", tmp_path / "gen"))
    assert not differences, "gen/ is stale, run `make gen` and commit it: " + ", ".join(differences)


def _diff(comparison: filecmp.dircmp[str], prefix: str = "") -> list[str]:
    ignored = {"__pycache__"}
    found = [f"{prefix}{name} (only in gen/)" for name in comparison.left_only if name not in ignored]
    found += [f"{prefix}{name} (missing from gen/)" for name in comparison.right_only if name not in ignored]
    found += [f"{prefix}{name} (differs)" for name in comparison.diff_files]
    for name, sub in comparison.subdirs.items():
        if name not in ignored:
            found += _diff(sub, f"{prefix}{name}/")
    return found
