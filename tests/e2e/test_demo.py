"""The README's first command, as a newcomer runs it: `condenser demo --json` on the embedded default
(it starts `condenser serve`, which starts a real Celery worker)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.storage import sha256_file
from tests.conftest import DigitsTeacher
from tests.support import REPO

pytestmark = pytest.mark.slow


def test_demo_distills_a_ten_times_smaller_student_and_checks_the_download(tmp_path: Path,
                                                                          digits_teacher: DigitsTeacher) -> None:
    env = {name: value for name, value in os.environ.items() if not name.startswith("CONDENSER_")}
    env["CONDENSER_DATA_DIR"] = str(tmp_path / "data")
    # The teacher a previous demo would have left: the session's, trained by the same recipe function the
    # demo calls (tests/engine/test_recipes.py checks its accuracy), instead of training it a second time.
    (tmp_path / "data" / "demo").mkdir(parents=True)
    shutil.copyfile(digits_teacher.safetensors, tmp_path / "data" / "demo" / "teacher.safetensors")
    result = subprocess.run([sys.executable, "-m", "app.cli", "demo", "--json"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "reusing the teacher" in result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["student_params"] * 10 <= summary["teacher_params"]
    assert summary["student_accuracy"] >= 0.96
    assert summary["downloaded_student_accuracy"] == pytest.approx(summary["student_accuracy"], abs=1e-9)
    assert sha256_file(Path(summary["artifact_path"])) == summary["artifact_sha256"]
