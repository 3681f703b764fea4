"""Pipelines end to end on two real worker processes, PostgreSQL and Redis: distill -> prune -> quantize (and a
second quantization beside the first, fanned out), every stage's model usable alone in a new job, lineage back
to the upload, a stage that misses its gate stopping the pipeline, and a worker killed in stage 2 resuming stage 2.

One service for the module: its two workers' start-up is most of what a pipeline of tiny models costs. Jobs train
for an epoch or two on digits; their job-level acceptance gate is off (max_accuracy_drop_pts null, as in
test_compress_e2e): what is under test is how the stages chain, not how good seconds of training can be."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SmallCnnFiles
from tests.e2e.test_distill_e2e import download
from tests.faults.test_faults import assert_resumed_from_checkpoint
from tests.harness import Service, running_service
from tests.support import wait_for

pytestmark = pytest.mark.slow

ENDED = ("succeeded", "failed", "canceled")
NO_JOB_GATE = {"max_accuracy_drop_pts": None}
DISTILL = {"kind": "distill", "student": {"arch": "small_cnn", "kwargs": {"width": 8, "depth": 2}}, "epochs": 3,
           "batch_size": 32, "lr": 0.01}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, small_cnn_files: SmallCnnFiles) -> Iterator[Service]:
    with running_service(tmp_path_factory.mktemp("pipelines"), "distributed") as running:
        # Two workers, one job each at a time: fanned-out stages run on separate processes.
        for _ in range(2):
            running.start_worker(OMP_NUM_THREADS="1")
        yield running


@pytest.fixture(scope="module")
def teacher(service: Service, small_cnn_files: SmallCnnFiles) -> str:
    return service.upload_teacher(small_cnn_files.safetensors, small_cnn_files.spec)


@pytest.fixture(scope="module")
def chain(service: Service, teacher: str) -> dict[str, Any]:
    """distill -> prune -> quantize, plus a dynamic quantization of the pruned model beside the static one."""
    pipeline = submit_pipeline(service, {
        "name": "digits chain", "model": teacher, "dataset": "digits", "seed": 1,
        "stages": [
            {**DISTILL, **NO_JOB_GATE, "gate": {"max_accuracy_drop_pts": 60, "against": "input"}},
            {"kind": "prune", "channel_ratio": 0.5, "epochs": 1, "batch_size": 32, **NO_JOB_GATE,
             "gate": {"max_accuracy_drop_pts": 60, "against": "previous"}},
            {"kind": "quantize", "method": "static", "calibration_samples": 64, **NO_JOB_GATE},
            {"name": "quantize-dynamic", "kind": "quantize", "after": "prune", "method": "dynamic", **NO_JOB_GATE},
        ]})
    return wait_pipeline(service, pipeline["id"], timeout=600)


def submit_pipeline(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    response = service.client.post("/v1/pipelines", headers=service.headers, json=body)
    assert response.status_code == 201, response.text
    return response.json()


def get_pipeline(service: Service, pipeline_id: str) -> dict[str, Any]:
    response = service.client.get(f"/v1/pipelines/{pipeline_id}", headers=service.headers)
    assert response.status_code == 200, response.text
    return response.json()


def wait_pipeline(service: Service, pipeline_id: str, timeout: float) -> dict[str, Any]:
    try:
        return wait_for(lambda: (p := get_pipeline(service, pipeline_id))["status"] in ENDED and p, timeout,
                        interval=0.5, what=f"pipeline {pipeline_id} to end")
    except AssertionError as error:
        raise AssertionError(f"{error}: {get_pipeline(service, pipeline_id)}\n{service.worker_logs()}") from None


def stages_by_name(pipeline: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {stage["name"]: stage for stage in pipeline["stages"]}


def model(service: Service, model_id: str) -> dict[str, Any]:
    response = service.client.get(f"/v1/models/{model_id}", headers=service.headers)
    assert response.status_code == 200, response.text
    return response.json()


def test_chain_runs_every_stage_and_each_result_is_a_model(service: Service, teacher: str,
                                                           chain: dict[str, Any]) -> None:
    assert chain["status"] == "succeeded", (chain["error"], [(s["name"], s["status"], s["error"])
                                                             for s in chain["stages"]])
    stages = stages_by_name(chain)
    assert [stage["status"] for stage in chain["stages"]] == ["succeeded"] * 4
    assert chain["final_model"] == stages["quantize-dynamic"]["model_id"]
    kinds = {name: model(service, stage["model_id"]) for name, stage in stages.items()}
    assert kinds["distill"]["precision"] == kinds["prune"]["precision"] == "float32"
    assert kinds["quantize"]["precision"] == "int8" and kinds["quantize"]["format"] == "onnx"
    assert kinds["prune"]["pruned_shapes"], "a structured prune records its layers' new shapes"
    for name, stage in stages.items():
        job = service.api_job(stage["job_id"])
        assert job["pipeline_id"] == chain["id"] and job["stage"] == name
        # The model's file is the artifact users download.
        assert kinds[name]["sha256"] in {artifact["sha256"] for artifact in job["artifacts"]}
        assert kinds[name]["source_job_id"] == stage["job_id"]
    # Each stage ran on the model of the stage it comes after.
    assert service.api_job(stages["prune"]["job_id"])["model"] == stages["distill"]["model_id"]
    for name in ("quantize", "quantize-dynamic"):
        assert service.api_job(stages[name]["job_id"])["model"] == stages["prune"]["model_id"]


def test_fanned_out_stages_ran_at_once_on_separate_workers(service: Service, chain: dict[str, Any]) -> None:
    """Each worker runs one job at a time: two jobs running at once ran on the two workers."""
    stages = stages_by_name(chain)
    jobs = [service.job(stages[name]["job_id"]) for name in ("quantize", "quantize-dynamic")]
    first, second = sorted(jobs, key=lambda job: job.started_at)
    assert second.started_at < first.finished_at, "the second quantization waited for the first"


def test_lineage_goes_back_to_the_upload(service: Service, teacher: str, chain: dict[str, Any]) -> None:
    response = service.client.get(f"/v1/models/{chain['stages'][2]['model_id']}/lineage", headers=service.headers)
    assert response.status_code == 200, response.text
    lineage = response.json()
    assert lineage["root"] == teacher
    steps = lineage["chain"]
    assert [step["made_by"]["kind"] if step["made_by"] else None for step in steps] == \
        ["quantize", "prune", "distill", None]
    assert steps[-1]["model"]["id"] == teacher and steps[-1]["model"]["origin"] == "upload"
    for step, parent in itertools.pairwise(steps):
        job = step["made_by"]
        assert job["inputs"]["model"] == {"id": parent["model"]["id"], "sha256": parent["model"]["sha256"]}
        assert job["inputs"]["dataset"] == {"builtin": "digits"}
        assert job["spec"]["seed"] == 1 and job["engine"]["libraries"]["torch"]


def test_each_stage_model_is_usable_alone_and_int8_is_refused(service: Service, chain: dict[str, Any],
                                                              tmp_path: Path) -> None:
    stages = stages_by_name(chain)
    student, pruned, int8 = (stages[name]["model_id"] for name in ("distill", "prune", "quantize"))
    # The student's downloaded weights and spec, uploaded as they are (a round trip), then quantized; the pruned
    # model (a stage's model by id) pruned again.
    files = {artifact["kind"]: artifact for artifact in service.api_job(stages["distill"]["job_id"])["artifacts"]}
    weights = tmp_path / "student.safetensors"
    weights.write_bytes(download(service, files["student_safetensors"]))
    reuploaded = service.upload_teacher(weights, json.loads(download(service, files["student_arch_spec"])))
    assert model(service, reuploaded)["sha256"] == model(service, student)["sha256"]
    jobs = [service.submit({"kind": "quantize", "model": reuploaded, "dataset": "digits", "method": "dynamic",
                            **NO_JOB_GATE}),
            service.submit({"kind": "prune", "model": pruned, "dataset": "digits", "channel_ratio": 0.1,
                            "epochs": 1, **NO_JOB_GATE})]
    for job_id in jobs:
        job = service.wait_status(job_id, ENDED, timeout=300)
        assert job.status == "succeeded", job.error
    twice = model(service, _output(service, jobs[1]))
    assert set(twice["pruned_shapes"]) >= set(model(service, pruned)["pruned_shapes"]), \
        "pruned again, the record still covers the first pruning's layers"
    for body, field in (({"kind": "quantize", "model": int8}, "model"), ({"kind": "prune", "model": int8,
                                                                           "channel_ratio": 0.5}, "model"),
                        ({"kind": "distill", "teacher": int8, "student": {"arch": "small_cnn"}}, "teacher")):
        response = service.client.post("/v1/jobs", headers=service.headers, json={**body, "dataset": "digits"})
        assert response.status_code == 422, response.text
        message = response.json()["detail"]
        assert f"{field} {int8} is an int8 model" in message and pruned in message


def _output(service: Service, job_id: str) -> str:
    """The model a job registered (the lineage of its job's result)."""
    from core.db.session import session_scope
    from core.lineage import output_model

    with session_scope() as session:
        result = output_model(session, job_id)
        assert result is not None, f"{job_id} registered no model"
        return result.id


def test_report_lays_the_stages_side_by_side(service: Service, chain: dict[str, Any]) -> None:
    response = service.client.get(f"/v1/pipelines/{chain['id']}/report", headers=service.headers)
    assert response.status_code == 200, response.text
    report = response.json()
    assert [row["stage"] for row in report["rows"]] == ["input", "distill", "prune", "quantize", "quantize-dynamic"]
    assert report["rows"][0]["accuracy"] == pytest.approx(chain["input_accuracy"])
    assert set(report["rows"][3]["formats"]) == {"torchscript", "onnx", "pt2"}
    assert report["rows"][2]["macs"] < report["rows"][1]["macs"], "the pruned model does less work"
    assert report["final_model_lineage"][0]["model"]["id"] == chain["final_model"]
    markdown = service.client.get(f"/v1/pipelines/{chain['id']}/report",
                                  headers={**service.headers, "Accept": "text/markdown"})
    assert markdown.headers["content-type"].startswith("text/markdown")
    assert markdown.text == report["table_markdown"] and markdown.text.count("\n") == 2 + len(report["rows"])


def test_a_missed_gate_stops_the_pipeline_and_keeps_earlier_models(service: Service, chain: dict[str, Any]) -> None:
    student = stages_by_name(chain)["distill"]["model_id"]
    # A quarter of the channels gone and no fine-tuning, yet not a point lost: a gate no pruning meets (here the
    # pruned model keeps about half its accuracy, well above chance).
    pipeline = wait_pipeline(service, submit_pipeline(service, {
        "model": student, "dataset": "digits", "stages": [
            {"kind": "prune", "channel_ratio": 0.1, "epochs": 0, **NO_JOB_GATE},
            {"name": "strict", "kind": "prune", "channel_ratio": 0.25, "epochs": 0, **NO_JOB_GATE,
             "gate": {"max_accuracy_drop_pts": 0, "against": "previous"}},
            {"kind": "quantize", "method": "dynamic"}]})["id"], timeout=300)
    assert pipeline["status"] == "failed"
    assert "stage 'strict' missed its gate" in pipeline["error"] and "the gate allows 0" in pipeline["error"]
    stages = stages_by_name(pipeline)
    assert stages["strict"]["gate_result"] and stages["quantize"]["status"] == "skipped"
    assert stages["quantize"]["job_id"] is None
    earlier = service.api_job(stages["prune"]["job_id"])
    weights = next(a for a in earlier["artifacts"] if a["kind"] == "pruned_safetensors")
    assert download(service, weights), "the earlier stage's files stay downloadable"
    assert model(service, stages["prune"]["model_id"])["source_job_id"] == earlier["id"]


def test_a_worker_killed_in_stage_two_resumes_stage_two(service: Service, chain: dict[str, Any]) -> None:
    student = stages_by_name(chain)["distill"]["model_id"]
    pipeline = submit_pipeline(service, {"model": student, "dataset": "digits", "stages": [
        {"kind": "prune", "channel_ratio": 0.1, "epochs": 0, **NO_JOB_GATE},
        {"name": "long", "kind": "prune", "channel_ratio": 0.25, "epochs": 6, **NO_JOB_GATE}]})
    stage_two = wait_for(lambda: stages_by_name(get_pipeline(service, pipeline["id"]))["long"]["job_id"],
                         timeout=300, interval=0.5, what="stage 'long' to start")
    service.wait_epoch(stage_two, 2, timeout=120)
    killed = [pid for worker in service.workers for pid in worker.kill_children()]
    assert killed, "no worker child was running stage 2"
    ended = wait_pipeline(service, pipeline["id"], timeout=300)
    assert ended["status"] == "succeeded", ended
    stages = stages_by_name(ended)
    assert service.job(stages["long"]["job_id"]).attempt == 2
    assert_resumed_from_checkpoint(service, stages["long"]["job_id"])
    assert service.job(stages["prune"]["job_id"]).attempt == 1, "the stage before was not run again"
