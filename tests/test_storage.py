"""The run folder of train.py: a local folder or a URI (offline: no request is made), and which jobs take a URI."""

from __future__ import annotations

import json

import pytest

from acr.cli import parse_job_args
from acr.config import ConfigError
from acr.storage import RAY_SNAPSHOT, RunFolder
from acr.runtime.session import resume_point


def test_a_uri_run_folder_is_rays_storage_path_and_name():
    f = RunFolder("s3://my-bucket/runs/voc/?region=us-west-2")
    assert (f.parent, f.name, f.is_local) == ("my-bucket/runs", "voc", False)
    assert f.uri("summary.json") == "s3://my-bucket/runs/voc/summary.json"
    with pytest.raises(ValueError, match="s3://my-bucket\\?region=us-west-2: needs a folder under the bucket"):
        RunFolder("s3://my-bucket?region=us-west-2")
    with pytest.raises(ValueError, match="output folder nosuch://x/y"):
        RunFolder("nosuch://x/y")


def test_a_local_run_folder_and_its_resume_point(tmp_path):
    f = RunFolder(tmp_path / "run")
    assert (f.parent, f.name, f.is_local, f.uri()) == (str(tmp_path), "run", True, str(tmp_path / "run"))
    f.makedirs()
    assert resume_point(f) == (0, 0) and f.latest_checkpoint() is None
    # a checkpoint folder Ray has not recorded (e.g. an upload cut short) is never resumed from
    (tmp_path / "run" / "checkpoint_b").mkdir()
    (tmp_path / "run" / "checkpoint_b" / "progress.json").write_text(json.dumps({"epoch": 3, "step_in_epoch": 1}))
    assert resume_point(tmp_path / "run") == (0, 0)
    (tmp_path / "run" / "checkpoint_a").mkdir()
    (tmp_path / "run" / "checkpoint_a" / "progress.json").write_text(json.dumps({"epoch": 2, "step_in_epoch": 5}))
    f.write_text(RAY_SNAPSHOT, json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_a"}}))
    assert resume_point(tmp_path / "run") == (2, 5)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint_a", "checkpoint_b", RAY_SNAPSHOT]
    f.write_text(RAY_SNAPSHOT, "{not json")
    with pytest.raises(ValueError, match=f"{RAY_SNAPSHOT} is not valid JSON"):
        resume_point(f)


def test_only_the_jobs_that_write_a_uri_take_one(tmp_path):
    _, out, _ = parse_job_args("d", None, ["--output-dir", "s3://b/runs/x", "train.epochs=2"], uri_output=True)
    assert out == "s3://b/runs/x"
    _, out, args = parse_job_args("d", None, ["--output-dir", str(tmp_path / "x")], uri_output=True)
    assert out == tmp_path / "x" and args.output_dir == tmp_path / "x"
    with pytest.raises(ConfigError, match="the prepare_data job writes a local .* train.py, tune.py, "
                                          "pseudo_labels.py, segment.py and pipeline.py write to a URI"):
        parse_job_args("d", None, ["--output-dir", "s3://b/runs/x"], job="prepare_data")
