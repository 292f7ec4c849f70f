"""Cohort jobs in the worker: one subnet row + artifacts per member, stored as members finish, kept across restarts."""

from __future__ import annotations

import pytest
import torch
from sqlalchemy import func, select

from pruning.budget import Budget
from pruning.pipeline import PruneRequest
from pruning.train import Cancelled
from service.auth import create_key
from service.db import dispose_engines, session_factory, session_scope
from service.migrate import upgrade
from service.models import Artifact, Device, Job, Predictor, Subnet
from service.storage import ArtifactStore
from workers.cohort_job import DevicePredictors, run_cohort_job

PARAMS = {"budgets": [0.6, 0.3], "resolutions": [16, 12], "recalibration_batches": 1}


def save_random_predictor(store: ArtifactStore, rel: str, name: str, resolutions: list[int]) -> None:
    """An untrained LPNet for resnet20 (4 classes) at `resolutions`: predictions are arbitrary but deterministic."""
    from latency.device import DeviceSpec, current_fingerprint
    from latency.lpnet import LPNet, PredictorMeta, WidthFeatures, save_predictor
    from latency.predictors import cost_models

    spec = DeviceSpec(name=name)
    models = cost_models("resnet20", resolutions, 4, 3)
    torch.manual_seed(0)
    net = LPNet(WidthFeatures.from_cost_models([models[r] for r in resolutions], resolutions), hidden=[8])
    net.reference_ms.fill_(2.0)
    first = models[resolutions[0]]
    meta = PredictorMeta(arch="resnet20", device=spec, fingerprint=current_fingerprint(spec), resolutions=resolutions,
                         group_sizes=[int(s) for s in first.group_sizes.tolist()], n_layers=len(first.layers),
                         target="log_ratio", hidden=[8], reference_ms=[2.0] * len(resolutions), training_samples=0,
                         validation_samples=0)
    save_predictor(net, meta, store.resolve(rel))


@pytest.fixture
def world(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    store = ArtifactStore(tmp_path / "artifacts")
    with session_scope(url) as s:
        _, key = create_key(s, "cohort-tenant")
        tenant_id = key.tenant_id
        a = Device(tenant_id=tenant_id, name="cpu-a", spec={"name": "cpu-a"}, queue="profile.cpu-a")
        b = Device(tenant_id=tenant_id, name="cpu-b", spec={"name": "cpu-b"}, queue="profile.cpu-b")
        s.add_all([a, b])
        s.flush()
        save_random_predictor(store, "predictors/cpu-a-16", "cpu-a", [16])
        s.add(Predictor(device_id=a.id, arch="resnet20", resolution=16, samples_requested=10, state="ready",
                        path="predictors/cpu-a-16"))
        job = Job(tenant_id=tenant_id, method="ofa", arch="resnet20", dataset="synthetic:4x16", budget_kind="flops",
                  budget_value=0.5, epochs=1, params=PARAMS, request={}, request_hash="x", state="running")
        s.add(job)
        s.flush()
        ids = {"tenant": tenant_id, "job": job.id, "a": a.id, "b": b.id}
    yield url, store, ids
    dispose_engines()


def request() -> PruneRequest:
    return PruneRequest(arch="resnet20", dataset="synthetic:4x16", method="ofa", budget=Budget("flops", 0.5),
                        epochs=1, finetune_epochs=1, batch_size=32, params=PARAMS)


def counts(url):
    with session_scope(url) as s:
        return (s.scalar(select(func.count()).select_from(Subnet)),
                s.scalar(select(func.count()).select_from(Artifact)))


def test_members_are_stored_as_they_finish_and_survive_a_restart(world, tmp_path):
    url, store, ids = world
    sessions = session_factory(url)
    work = tmp_path / "work"
    exported = []

    def progress(event):
        if event.get("stage") == "export" and "member" in event:
            exported.append(event["member"])

    with pytest.raises(Cancelled):
        run_cohort_job(sessions, store, ids["tenant"], ids["job"], request(), work, progress=progress,
                       should_cancel=lambda: len(exported) >= 2)
    assert counts(url) == (2, 6)  # the two finished members are already visible
    with session_scope(url) as s:
        first = {sub.member: (sub.id, sub.latency) for sub in s.scalars(select(Subnet))}
        first_paths = sorted(a.path for a in s.scalars(select(Artifact)))

    report = run_cohort_job(sessions, store, ids["tenant"], ids["job"], request(), work)
    assert counts(url) == (4, 12)
    with session_scope(url) as s:
        subnets = {sub.member: sub for sub in s.scalars(select(Subnet).order_by(Subnet.member))}
        paths = sorted(a.path for a in s.scalars(select(Artifact)))
        for member, (subnet_id, latency) in first.items():
            assert subnets[member].id == subnet_id and subnets[member].latency == latency
        assert set(first_paths) <= set(paths)
        for m in report["members"]:
            sub = subnets[m["id"]]
            assert (sub.resolution, sub.macs, sub.params, sub.accuracy) == (m["resolution"], m["macs"], m["params"],
                                                                              m["accuracy"])
            assert sub.arch_json["resolution"] == m["resolution"]
            # cpu-a has a predictor at 16 px only; cpu-b has none.
            assert set(sub.latency) == ({str(ids["a"])} if m["resolution"] == 16 else set())
            assert sub.latency == m["latency_ms"]
            for a in s.scalars(select(Artifact).where(Artifact.subnet_id == sub.id)):
                assert store.verify(a.path, a.sha256)
    assert set(report["pareto"]) == {"macs", str(ids["a"]), str(ids["b"])}
    assert report["pareto"][str(ids["b"])] == []
    assert all("masks" not in m for m in report["members"])


def test_device_predictors_explain_what_is_missing(world):
    url, store, ids = world
    predictors = DevicePredictors(session_factory(url), store, ids["tenant"], "resnet20")
    assert predictors.device_ids == {"cpu-a": ids["a"], "cpu-b": ids["b"]}
    ratios = torch.ones(12)
    assert predictors.model("cpu-a", 16).predict_ms(ratios).item() > 0
    with pytest.raises(ValueError, match="no ready predictor for resnet20 at 12 px"):
        predictors.model("cpu-a", 12)
    with pytest.raises(ValueError, match="cpu-b"):
        predictors.factories()["cpu-b"](16)


def test_an_ofa_job_runs_end_to_end_in_the_worker(tmp_path):
    from service.settings import Settings
    from workers.prune_job import run_job

    settings = Settings(home=tmp_path, broker_url="memory://", progress_interval_s=0)
    upgrade(settings.database_url)
    request = {"method": "ofa", "arch": "resnet20", "dataset": "synthetic:4x16", "epochs": 1, "finetune_epochs": 1,
               "batch_size": 32, "params": PARAMS, "seed": 0, "budget": {"kind": "flops", "value": 0.5}}
    with session_scope(settings.database_url) as s:
        _, key = create_key(s, "worker-cohort")
        job = Job(tenant_id=key.tenant_id, method="ofa", arch="resnet20", dataset="synthetic:4x16",
                  budget_kind="flops", budget_value=0.5, epochs=1, params=PARAMS, request=request, request_hash="x")
        s.add(job)
        s.flush()
        job_id = job.id
    sent = []
    assert run_job(settings, job_id, lambda *a: sent.append(a)) == "succeeded"
    assert sent == []  # no budget device: nothing to re-measure
    assert counts(settings.database_url) == (4, 12)
    with session_scope(settings.database_url) as s:
        job = s.get(Job, job_id)
        assert [m["id"] for m in job.report["members"]] == [0, 1, 2, 3] and job.progress == 1.0
        assert {sub.resolution for sub in s.scalars(select(Subnet))} == {16, 12}
    dispose_engines()
