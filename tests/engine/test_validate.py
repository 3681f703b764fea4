"""The validation child process: one JSON line, exit code 0, whether the model is good or not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.engine.conftest import small_cnn
from worker.engine import budget, models, validate
from worker.engine.errors import SpecError
from worker.engine.export import save_safetensors

REPO_ROOT = Path(__file__).resolve().parents[2]


def _run(path: Path, fmt: str, arch_json: str) -> dict:
    command = [sys.executable, "-m", "worker.engine.validate", "--format", fmt, "--arch-json", arch_json, str(path)]
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert len(lines) == 1, completed.stdout
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("validate") / "m.safetensors"
    save_safetensors(models.build_model(small_cnn(8)), path)
    return path


def test_good_model(weights: Path) -> None:
    arch = small_cnn(8)
    result = _run(weights, "safetensors", arch.model_dump_json())
    assert result == {"ok": True, "param_count": models.param_count(models.build_model(arch)), "num_classes": 10,
                      "activations_per_sample": budget.estimate(arch).activations_per_sample}


def test_state_dict_and_a_truncated_file(weights: Path, tmp_path: Path) -> None:
    arch = small_cnn(8)
    state_dict = tmp_path / "m.pt"
    torch.save(models.build_model(arch).state_dict(), state_dict)
    assert validate.validate(state_dict, "state_dict", arch.model_dump_json())["ok"] is True
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(weights.read_bytes()[:-4])
    result = validate.validate(truncated, "safetensors", arch.model_dump_json())
    assert result["ok"] is False and "not a valid safetensors file" in result["error"]


def test_mismatched_weights(weights: Path) -> None:
    result = _run(weights, "safetensors", small_cnn(8, num_classes=4).model_dump_json())
    assert result["ok"] is False and "the spec says num_classes=4" in result["error"]


def test_invalid_spec_and_missing_file(weights: Path, tmp_path: Path) -> None:
    bad_spec = validate.validate(weights, "safetensors", json.dumps({"arch": "nope", "input": {"image_size": 8}}))
    assert bad_spec["ok"] is False and "unknown architecture 'nope'" in bad_spec["error"]
    missing = validate.validate(tmp_path / "absent.pt", "state_dict", small_cnn(8).model_dump_json())
    assert missing["ok"] is False and "absent.pt" in missing["error"]


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(5, 10)), "does not run on 1x8x8 inputs"),
        (torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 7)), r"outputs shape \[1, 7\]"),
    ],
)
def test_model_that_does_not_work_at_the_input_size(model: torch.nn.Module, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        budget.measure(model.to("meta"), small_cnn(8))
