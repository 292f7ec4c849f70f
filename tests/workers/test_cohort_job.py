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
    from latency.lpnet import LPNet, WidthFeatures
    from latency.lpnet_io import PredictorMeta, save_predictor
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


STUB_RATIO = 0.5


def _measure_stub(monkeypatch) -> list[tuple[int, ...]]:
    """LatencyModel's timing without timing: a model's median is its input's side length, its ratio to a
    reference STUB_RATIO; the shapes of the models timed (references included) are recorded."""
    import types

    import latency.backends as backends
    import latency.latency_model as latency_model

    shapes: list[tuple[int, ...]] = []

    class Runner:
        def __init__(self, model, spec, shape):  # noqa: ANN001
            self.shape = tuple(shape)
            shapes.append(self.shape)

    def measure(run, plan, reference=None, quiet=None):  # noqa: ANN001, ANN202
        assert reference is None or reference.shape == run.shape  # the dense model at the subnet's resolution
        return types.SimpleNamespace(sample=types.SimpleNamespace(median_ms=float(run.shape[-1])),
                                     ratio=STUB_RATIO if reference is not None else None, slow_retries=0)

    monkeypatch.setattr(backends, "TorchRunner", Runner)
    monkeypatch.setattr(latency_model, "measure", measure)
    return shapes


@pytest.mark.slow
def test_latency_cohort_waits_for_a_predictor_at_every_resolution(tmp_path, monkeypatch):
    from service.settings import Settings
    from workers.profile_job import run_measure, run_profile
    from workers.prune_job import AWAITING_PREDICTOR, run_job

    settings = Settings(home=tmp_path, broker_url="memory://", auto_profile_samples=12, progress_interval_s=0)
    upgrade(settings.database_url)
    with session_scope(settings.database_url) as s:
        _, key = create_key(s, "latency-cohort")
        device = Device(tenant_id=key.tenant_id, name="cpu", spec={"name": "cpu", "runtime": "torch"},
                        queue="profile.cpu")
        s.add(device)
        s.flush()
        params = {**PARAMS, "budgets": [1000.0, 500.0]}  # ms: every member fits
        budget = {"kind": "latency_ms", "value": 1000.0, "device_id": device.id}
        request = {"method": "ofa", "arch": "resnet20", "dataset": "synthetic:4x16", "epochs": 1,
                   "finetune_epochs": 1, "batch_size": 32, "params": params, "seed": 0, "budget": budget}
        job = Job(tenant_id=key.tenant_id, method="ofa", arch="resnet20", dataset="synthetic:4x16",
                  budget_kind="latency_ms", budget_value=1000.0, budget_device_id=device.id, epochs=1,
                  params=params, request=request, request_hash="x")
        s.add(job)
        s.flush()
        job_id, device_id = job.id, device.id
    sent: list = []
    assert run_job(settings, job_id, lambda *a: sent.append(a)) == "queued"
    assert [(task, queue) for task, _, queue in sent] == [("profile.run", "profile.cpu")] * 2
    with session_scope(settings.database_url) as s:
        by_resolution = {p.resolution: p.id for p in s.scalars(select(Predictor))}
    assert sorted(by_resolution) == [12, 16]

    # One resolution ready is not enough: the job goes back to waiting and nothing is profiled twice.
    assert run_profile(settings, by_resolution[16], lambda *a: sent.append(a)) == "ready"
    assert sent[-1] == ("prune.run", [job_id], "prune")
    assert run_job(settings, job_id, lambda *a: sent.append(a)) == "queued"
    with session_scope(settings.database_url) as s:
        job = s.get(Job, job_id)
        assert job.stage == AWAITING_PREDICTOR and job.attempts == 0
    assert sum(task == "profile.run" for task, _, _ in sent) == 2

    assert run_profile(settings, by_resolution[12], lambda *a: sent.append(a)) == "ready"
    state = run_job(settings, job_id, lambda *a: sent.append(a))
    with session_scope(settings.database_url) as s:
        assert state == "running", s.get(Job, job_id).error
    assert sent[-1] == ("profile.measure", [job_id, device_id], "profile.cpu")
    with session_scope(settings.database_url) as s:
        subnets = s.scalars(select(Subnet).where(Subnet.job_id == job_id)).all()
        assert {sub.resolution for sub in subnets} == {16, 12} and len(subnets) == 4
        assert all(sub.latency[str(device_id)]["predicted_ms"] > 0 for sub in subnets)

    shapes = _measure_stub(monkeypatch)
    assert run_measure(settings, job_id, device_id) == "succeeded"
    # Every subnet timed against the dense model at its own resolution, with that resolution's predictor.
    assert sorted(shape[-1] for shape in shapes) == [12] * 4 + [16] * 4
    with session_scope(settings.database_url) as s:
        assert s.get(Job, job_id).state == "succeeded"
        reference_ms = {p.resolution: p.reference_ms for p in s.scalars(select(Predictor))}
        assert reference_ms[12] != reference_ms[16]
        for sub in s.scalars(select(Subnet).where(Subnet.job_id == job_id)):
            entry = sub.latency[str(device_id)]
            assert entry["measured_ms"] == pytest.approx(STUB_RATIO * reference_ms[sub.resolution])
            assert entry["raw_ms"] == sub.resolution and entry["predicted_ms"] > 0
    dispose_engines()


def test_remeasure_on_a_torch_device_runs_each_subnet_at_its_own_resolution(tmp_path, monkeypatch):
    from pruning import zoo
    from pruning.surgery import export_onnx
    from service.settings import Settings
    from workers.profile_job import run_measure
    from workers.prune_job import MEASURING

    settings = Settings(home=tmp_path / "home", broker_url="memory://", progress_interval_s=0)
    upgrade(settings.database_url)
    store = ArtifactStore(settings.artifact_dir)
    model = zoo.build_model("resnet20", 4, 3).eval()
    with session_scope(settings.database_url) as s:
        _, key = create_key(s, "torch-device")
        device = Device(tenant_id=key.tenant_id, name="gpu-ish", spec={"name": "gpu-ish", "runtime": "torch"},
                        queue="profile.gpu-ish")
        s.add(device)
        s.flush()
        save_random_predictor(store, "predictors/torch-16", "gpu-ish", [16])  # the predictor knows 16 px only
        s.add(Predictor(device_id=device.id, arch="resnet20", resolution=16, samples_requested=10, state="ready",
                        path="predictors/torch-16"))
        job = Job(tenant_id=key.tenant_id, method="ofa", arch="resnet20", dataset="synthetic:4x16",
                  budget_kind="latency_ms", budget_value=5.0, budget_device_id=device.id, epochs=1, params=PARAMS,
                  request={}, request_hash="x", state="running", stage=MEASURING)
        s.add(job)
        s.flush()
        for member, resolution in enumerate((16, 12, 8)):
            folder = store.resolve(f"members/{member}")
            folder.mkdir(parents=True)
            # arch.json says nothing about the resolution: only the subnet row does.
            arch = {k: v for k, v in zoo.describe(model, "resnet20", 4, 3, resolution).items() if k != "resolution"}
            zoo.save_arch(arch, folder / "arch.json")
            export_onnx(model, folder / "model.onnx", (1, 3, resolution, resolution))
            subnet = Subnet(job_id=job.id, member=member, resolution=resolution, macs=1, params=1, accuracy=0.5,
                            arch_json=arch, widths={}, latency={})
            s.add(subnet)
            s.flush()
            for fmt, name in (("onnx", "model.onnx"), ("arch", "arch.json")):
                s.add(Artifact(subnet_id=subnet.id, format=fmt, path=f"members/{member}/{name}", sha256="-",
                               size_bytes=1))
        job_id, device_id = job.id, device.id
    shapes = _measure_stub(monkeypatch)
    assert run_measure(settings, job_id, device_id) == "succeeded"
    assert sorted(shape[-1] for shape in shapes) == [8, 12, 16, 16]  # 16 px also times the dense model
    with session_scope(settings.database_url) as s:
        job = s.get(Job, job_id)
        assert job.state == "succeeded" and not (job.report or {}).get("measure_error")
        reference_ms = 2.0  # save_random_predictor's dense reference
        for sub in s.scalars(select(Subnet).where(Subnet.job_id == job_id)):
            entry = sub.latency[str(device_id)]
            if sub.resolution == 16:  # the predictor's: timed against the dense model, as the finisher does
                assert entry["measured_ms"] == pytest.approx(STUB_RATIO * reference_ms) and entry["raw_ms"] == 16
            else:  # no dense reference at this resolution: the subnet's median alone
                assert entry["measured_ms"] == sub.resolution and entry["raw_ms"] is None
    dispose_engines()
