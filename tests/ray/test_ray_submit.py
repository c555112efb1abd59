"""launch/ray_submit.sh against a real local Ray head: a tiny SFT job through the Jobs API runs to the end with
2 Ray Train workers, and a `stage: eval` recipe runs on them too. A worker lost mid-run (Ray Train restarting
the group, the loop resuming from its checkpoint to the weights of the uninterrupted job) is proven across two
hosts by tests/multinode/test_ray.py::test_lost_worker_node_restarts_the_group_from_the_checkpoint."""

from __future__ import annotations

import uuid

import pytest

from tests.ray.jobs import SFT_STEPS, submit, train_steps, wait_job

pytestmark = pytest.mark.ray

JOB_TIMEOUT_S = 300


def test_head_listens_on_loopback_only(ray_head):
    import ipaddress

    sockets = ray_head.listening_sockets()
    assert int(ray_head.dashboard.rsplit(":", 1)[1]) in {port for _, port in sockets}
    assert len(sockets) >= 3  # GCS, raylet, dashboard (agents come up a little later)
    exposed = [(a, p) for a, p in sockets if not ipaddress.ip_address(a).is_loopback]
    assert not exposed, exposed


def test_submitted_job_completes(ray_head, tmp_path):
    """Alone proves: launch/ray_submit.sh runs SFT as a Ray job on a single-node cluster to its final/ model."""
    run_dir = tmp_path / "run"
    sid = f"ftdist-straight-{uuid.uuid4().hex[:8]}"
    r = submit(ray_head.env, run_dir, sid, wait=True, timeout=JOB_TIMEOUT_S)
    status = wait_job(ray_head.client(), sid, JOB_TIMEOUT_S)
    logs = ray_head.client().get_job_logs(sid)
    assert r.returncode == 0 and status == "SUCCEEDED", f"rc={r.returncode} {status}\n{r.stderr[-3000:]}\n{logs[-6000:]}"
    assert "sft on Ray: 2 worker(s) (CPU)" in logs
    assert train_steps(run_dir) == list(range(1, SFT_STEPS + 1))
    assert (run_dir / "final" / "config.json").exists() and list((run_dir / "final").glob("*.safetensors"))
    assert "resumed from" not in logs


def test_eval_recipe_runs_on_ray_workers(ray_head, tmp_path):
    """Alone proves: a `stage: eval` recipe runs on Ray Train workers, each evaluating its share of the rows.

    Submitted as training is; rank 0 writes the results of all 6 rows (perplexity of the bundled held-out
    conversations)."""
    import json

    from tests.helpers import write_recipe

    recipe = write_recipe(tmp_path / "eval.yaml", stage="eval", dist={"backend": "gloo"},
                          eval={"models": ["tiny=ftdist/tiny"], "suites": ["perplexity=ftdist/tiny-task/eval"],
                                "max_samples": 6, "batch_size": 2})
    sid = f"ftdist-eval-{uuid.uuid4().hex[:8]}"
    r = submit(ray_head.env, tmp_path / "run", sid, wait=True, recipe=str(recipe), overrides=[],
               timeout=JOB_TIMEOUT_S)
    status = wait_job(ray_head.client(), sid, JOB_TIMEOUT_S)
    logs = ray_head.client().get_job_logs(sid)
    assert r.returncode == 0 and status == "SUCCEEDED", f"rc={r.returncode} {status}\n{r.stderr[-3000:]}\n{logs[-6000:]}"
    assert "eval on Ray: 2 worker(s) (CPU)" in logs
    res = json.loads((tmp_path / "run" / "eval.json").read_text())["results"]["tiny"]["perplexity"]
    assert res["rows"] == 6 and res["perplexity"] > 1
