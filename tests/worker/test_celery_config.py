"""The Celery settings that a job's isolation rests on."""

from __future__ import annotations

from pathlib import Path

from core.broker import make_celery
from core.settings import Settings


def test_each_job_runs_in_a_fresh_child_unless_configured_otherwise(tmp_path: Path) -> None:
    # The kill, cancel and time-limit fault tests count on it: a job's process ends with the job.
    assert make_celery(Settings(data_dir=tmp_path)).conf.worker_max_tasks_per_child == 1
    unlimited = make_celery(Settings(data_dir=tmp_path, jobs_per_child=0))
    assert unlimited.conf.worker_max_tasks_per_child is None
