"""What the local backend leaves in RENDER_OUTPUT_DIR over time: a crashed render's partial file, and finished
renders nobody deletes.

- `remove_partials`: at start-up, every `.<export_id>.<hex>.partial.<ext>` file untouched for longer than a
  render may go without writing (RENDER_STALL_SECONDS: a slower one is stopped). Jobs live in the renderer
  process, so such a file is what a killed render left; a fresh one may be another renderer's sharing the
  folder, and stays.
- `remove_expired`: finished renders (`<export_id>.<ext>`) last modified more than the retention ago, when
  RENDER_OUTPUT_RETENTION_HOURS is set (0, the default, keeps them: whoever collects the files may need them
  for as long as they like). Nothing else in the folder is touched.
"""

from __future__ import annotations

import asyncio
import logging
import re
import stat
import time
from pathlib import Path

from renderer.domain import OutputFormat

log = logging.getLogger(__name__)

_EXTENSIONS = "|".join(re.escape(fmt.value) for fmt in OutputFormat)
# The names LocalBackend gives (an export id: local_backend._SAFE_EXPORT_ID), and nothing else.
_FINISHED = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,127}}\.(?:{_EXTENSIONS})$")
_PARTIAL = re.compile(rf"^\.[A-Za-z0-9][A-Za-z0-9._-]{{0,127}}\.[0-9a-f]{{8}}\.partial\.(?:{_EXTENSIONS})$")
MAX_SWEEP_INTERVAL_SECONDS = 3600.0


def _remove(paths: list[Path]) -> int:
    removed = 0
    for path in paths:
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
        except OSError as error:
            log.warning("could not remove an old render file", extra={"path": str(path), "error": str(error)})
    return removed


def remove_partials(output_dir: Path, untouched_seconds: float) -> int:
    return _remove(_files_older_than(output_dir, _PARTIAL, untouched_seconds))


def remove_expired(output_dir: Path, retention_seconds: float) -> int:
    return _remove(_files_older_than(output_dir, _FINISHED, retention_seconds))


def _files_older_than(output_dir: Path, name: re.Pattern[str], seconds: float) -> list[Path]:
    """Regular files of `output_dir` named like `name`, last modified more than `seconds` ago."""
    if not output_dir.is_dir():
        return []
    cutoff = time.time() - seconds
    found = []
    for path in output_dir.iterdir():
        if not name.match(path.name):
            continue
        try:
            info = path.lstat()  # not followed: a link is not a render, whatever it points to
        except FileNotFoundError:
            continue
        if stat.S_ISREG(info.st_mode) and info.st_mtime < cutoff:
            found.append(path)
    return found


async def sweep_forever(output_dir: Path, retention_seconds: float) -> None:
    """Removes expired renders now, then every quarter of the retention (at most hourly)."""
    interval = min(retention_seconds / 4, MAX_SWEEP_INTERVAL_SECONDS)
    while True:
        try:
            removed = await asyncio.to_thread(remove_expired, output_dir, retention_seconds)
            if removed:
                log.info("expired renders removed", extra={"count": removed, "output_dir": str(output_dir)})
        except Exception:
            log.exception("render retention sweep failed")
        await asyncio.sleep(interval)
