"""Jobs: a launched command's state lives on disk (status, exit code, log, stop) whichever process asks."""

from __future__ import annotations

import time

import psutil
import pytest

pytest.importorskip("pandas", reason="the board's tables are pandas frames: pip install 'tunelab[board]'")

from tunelab.board import jobs  # noqa: E402


def _wait(job: jobs.Job, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while jobs.is_running(job):
        assert time.monotonic() < deadline, jobs.log_tail(job)
        time.sleep(0.2)
    return jobs.status(job)


def test_a_failing_run_reports_its_exit_status_and_log(tmp_path):
    raw = {"method": {"name": "prompt_tuning"}, "model": {"name": "tiny"}, "data": {"task": "no_such_task"}}
    job = jobs.start_job(tmp_path, raw, "broken run")
    assert job.name == "broken-run" and job.kind == "run"
    assert _wait(job) == "failed (exit status 2)"
    assert "no_such_task" in jobs.log_tail(job)
    again = jobs.get_job(tmp_path, job.id)  # as a fresh board process would read it
    assert again.command == job.command and jobs.status(again) == "failed (exit status 2)"
    table = jobs.progress(again)
    assert list(table["status"]) == ["not run"] and list(table["step"]) == ["0/100"]


def test_stop_ends_the_whole_process_group(tmp_path):
    grid = {"name": "long", "model": {"name": "tiny"}, "data": {"max_eval": 2, "max_train": 4},
            "train": {"steps": 100000, "batch_size": 2}, "methods": [{"name": "prompt_tuning", "num_virtual_tokens": 2}],
            "tasks": ["date_format"], "seeds": [0]}
    job = jobs.start_job(tmp_path, grid, "long")
    assert [c["steps"] for c in job.cells] == [100000] and job.store == tmp_path.resolve() / "long" / "results.sqlite"
    deadline = time.monotonic() + 120
    while not jobs.loss_curves(job).shape[0]:  # wait until the cell trains and logs steps
        assert jobs.is_running(job) and time.monotonic() < deadline, jobs.log_tail(job)
        time.sleep(0.5)
    assert jobs.progress(job)["status"].tolist() == ["running"]
    assert not jobs.loss_curves(job, only_running=True).empty
    group = [p for p in psutil.process_iter() if _pgid(p) == job.pid]
    assert len(group) >= 2  # the grid process and its cell process (and the fork server)
    jobs.stop_job(tmp_path, job)
    assert jobs.status(jobs.get_job(tmp_path, job.id)) == "stopped"
    psutil.wait_procs(group, timeout=20)
    assert not [p for p in group if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _pgid(process: psutil.Process) -> int | None:
    import os

    try:
        return os.getpgid(process.pid)
    except (ProcessLookupError, PermissionError):
        return None


def test_list_jobs_skips_broken_state(tmp_path):
    folder = jobs.jobs_dir(tmp_path) / "x"
    folder.mkdir(parents=True)
    (folder / "job.json").write_text("{not json")
    assert jobs.list_jobs(tmp_path) == []
    with pytest.raises(Exception, match="no job"):
        jobs.get_job(tmp_path, "x")
