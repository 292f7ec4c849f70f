"""The console in a real headless Chromium against the real stack (API over HTTP, a worker, the embedded broker):
sign in, submit a tiny job from the form, watch it succeed live, download its ONNX and check the hash, open a cohort
and its plot; another tenant's key sees none of it."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import select

from service.auth import hash_key
from service.db import session_scope
from service.models import ApiKey, Artifact, Device, Job, Predictor, Subnet
from service.storage import ArtifactStore
from tests.service.browser import Browser, LiveStack, live_stack, need_browser, start_browser

pytestmark = pytest.mark.slow

# (resolution, accuracy, MACs, (predicted, measured) ms on the seeded device)
COHORT = [(16, 0.95, 900_000, (10.0, 10.4)), (12, 0.93, 500_000, (6.0, 6.2)), (16, 0.90, 600_000, (7.0, None)),
          (12, 0.85, 300_000, (3.0, None))]


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[LiveStack]:
    need_browser()
    yield from live_stack(tmp_path_factory.mktemp("console"))


@pytest.fixture(scope="module")
def browser(stack, tmp_path_factory) -> Iterator[Browser]:
    b = start_browser(stack.url, tmp_path_factory.mktemp("downloads"))
    try:
        b.open()
        yield b
    finally:
        b.driver.quit()


def seed_cohort(stack: LiveStack, tenant: str) -> tuple[int, dict[int, str]]:
    """A finished ofa job of the tenant with COHORT's members on a device, and an ONNX file per member: (job id,
    sha256 per member). Written straight to the database and the store, as a cohort worker would leave them."""
    store = ArtifactStore(stack.settings.artifact_dir)
    hashes = {}
    with session_scope(stack.database_url) as s:
        tenant_id = s.scalar(select(ApiKey.tenant_id).where(ApiKey.key_hash == hash_key(stack.keys[tenant])))
        device = Device(tenant_id=tenant_id, name="phone", spec={"name": "phone", "runtime": "onnxruntime",
                        "provider": "cpu", "threads": 1, "batch": 1, "resolutions": [], "precision": "fp32",
                        "channel_multiple": 1}, queue="profile.phone")
        request = {"method": "ofa", "arch": "resnet20", "dataset": "synthetic:4x16"}
        job = Job(tenant_id=tenant_id, state="succeeded", method="ofa", arch="resnet20", dataset="synthetic:4x16",
                  budget_kind="flops", budget_value=0.5, epochs=1, params={}, request=request, request_hash="seed",
                  progress=1.0, report={"members": [{"id": i} for i in range(len(COHORT))]})
        s.add_all([device, job])
        s.flush()
        for member, (resolution, accuracy, macs, ms) in enumerate(COHORT):
            subnet = Subnet(job_id=job.id, member=member, arch_json={"arch": "resnet20"}, resolution=resolution,
                            widths={"conv1": 16 - member, "layer1.0.conv1": 8 + member}, macs=macs,
                            params=1000 - member, accuracy=accuracy,
                            latency={str(device.id): {"predicted_ms": ms[0], "measured_ms": ms[1]}})
            s.add(subnet)
            s.flush()
            src = stack.settings.home / f"member-{member}.onnx"
            src.write_bytes(f"onnx bytes of member {member}".encode() * 50)
            stored = store.put_file(src, f"test/cohort/{job.id}/{member}/model.onnx")
            s.add(Artifact(subnet_id=subnet.id, format="onnx", path=stored.path, sha256=stored.sha256,
                           size_bytes=stored.size_bytes))
            hashes[member] = stored.sha256
        return job.id, hashes


def seed_predictor(stack: LiveStack, device_name: str) -> int:
    """A ready predictor on the tenant's device with held-out metrics and points, as the profile task stores them."""
    held = {"predicted_ms": [1.0, 2.1, 2.9, 4.2], "measured_ms": [1.1, 2.0, 3.0, 4.0], "resolution": [16] * 4}
    metrics = {"test": {"absolute_ms": {"n": 4, "mape": 4.6, "within_5": 0.75, "within_10": 1.0, "spearman": 1.0}},
               "held_out": held}
    with session_scope(stack.database_url) as s:
        device = s.scalar(select(Device).where(Device.name == device_name))
        predictor = Predictor(device_id=device.id, arch="resnet20", resolution=16, samples_requested=20,
                              state="ready", metrics=metrics, reference_ms=4.1)
        s.add(predictor)
        s.flush()
        return predictor.id


def seed_latency_job(stack: LiveStack, tenant: str) -> int:
    """A finished latency-budget job whose report has what the finisher records (as pipeline.run_prune writes it)."""
    report = {"dense": {"macs": 40_550_000, "params": 272_474, "accuracy": 0.9777},
              "pruned": {"macs": 1_370_000, "params": 7_800, "accuracy": 0.7658}, "finisher_channels_removed": 3,
              "epochs": {"dense": 5, "finetune": 5, "recovery": 1},
              "latency_ms": {"dense": {"predicted": 0.655, "measured": 0.635},
                             "pruned": {"predicted": 0.331, "measured": 0.36, "drift_corrected": 0.323,
                                        "ratio_to_dense": 0.487, "readings_ms": [0.321, 0.323, 0.326],
                                        "finisher_readings_ms": [0.318, 0.33], "slow_retries": 1}}}
    with session_scope(stack.database_url) as s:
        tenant_id = s.scalar(select(ApiKey.tenant_id).where(ApiKey.key_hash == hash_key(stack.keys[tenant])))
        job = Job(tenant_id=tenant_id, state="succeeded", method="l1", arch="resnet20", dataset="builtin:digits",
                  budget_kind="flops", budget_value=0.5, epochs=5, params={}, request={}, request_hash="seed",
                  progress=1.0, report=report)
        s.add(job)
        s.flush()
        return job.id


def fill_form(b: Browser, values: dict[str, str]) -> None:
    from selenium.webdriver.support.ui import Select

    for name, value in values.items():
        el = b.find(f'[name="{name}"]')
        if el.tag_name == "select":
            Select(el).select_by_value(value)
        else:
            el.clear()
            el.send_keys(value)


def test_validation_errors_land_on_their_fields(stack, browser):
    b = browser
    b.sign_in(stack.keys["alice"])
    b.go("#/submit")
    fill_form(b, {"method": "l1", "dataset": "synthetic:4x16", "budget.value": "2"})
    b.find("#submit").click()
    assert "fraction" in b.text('[data-field="budget"].invalid > .field-error')
    assert b.text("#form-errors") == "Fix the fields marked below."
    fill_form(b, {"budget.value": "0.5", "params.round_to": "0"})
    b.find("#submit").click()
    assert "greater than or equal to 1" in b.text('[data-field="params.round_to"].invalid .field-error')
    assert not b.first('[data-field="budget"].invalid')
    fill_form(b, {"params.round_to": "1", "arch": "resnet9000"})
    b.find("#submit").click()
    # The first architecture check starts the API's archspec subprocess (torch), seconds on a loaded machine.
    assert "resnet9000" in b.text('[data-field="arch"].invalid .field-error', timeout_s=60)
    assert httpx.get(f"{stack.url}/v1/jobs", headers={"Authorization": f"Bearer {stack.keys['alice']}"}
                     ).json()["total"] == 0


def test_submit_watch_download(stack, browser):
    b = browser
    b.sign_in(stack.keys["alice"])
    b.go("#/submit")
    fill_form(b, {"method": "l1", "arch": "resnet20", "dataset": "synthetic:4x16", "budget.kind": "flops",
                  "budget.value": "0.5", "epochs": "1", "batch_size": "32"})
    b.find("#submit").click()
    url = b.wait(lambda: "#/jobs/" in (u := b.driver.current_url) and u, 10, "the job page")
    job_id = int(url.rpartition("#/jobs/")[2])
    # Live: the page is never reloaded (the marker survives), so what it shows came from the event stream.
    b.driver.execute_script("window.notReloaded = true")
    seen = set()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        # One script reads both: the badge is repainted on every state event, so a held element could go stale.
        line, state = b.driver.execute_script("return [document.querySelector('#live-line')?.textContent, "
                                              "document.querySelector('.row .state')?.dataset.state]")
        seen.add(line or "")
        if state in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.1)
    assert state == "succeeded", b.page_text()
    assert b.driver.execute_script("return window.notReloaded") is True
    assert b.find("#stage-trail").get_attribute("data-stages").split()[:3] == ["dense", "prune", "finetune"]
    assert any(0 < int(line.rpartition(" ")[2].rstrip("%") or 0) < 100 for line in seen), seen  # seen in progress
    b.find("#report [data-row=pruned]")
    b.find('[data-download="member-0:onnx"]').click()
    result = b.find("#download-result")
    api = httpx.get(f"{stack.url}/v1/jobs/{job_id}/subnets", headers={"Authorization": f"Bearer {stack.keys['alice']}"})
    expected = next(a["sha256"] for a in api.json()[0]["artifacts"] if a["format"] == "onnx")
    path = b.downloaded(result.get_attribute("data-name"))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == expected == result.get_attribute("data-sha256")
    assert result.get_attribute("data-ok") == "true"
    b.screenshot("console-job.png")

    b.go("#/jobs")
    row = b.find(f"tr[data-job='{job_id}']")
    assert "succeeded" in row.text and "l1" in row.text


def test_cancel_from_the_job_page(stack, browser):
    b = browser
    b.sign_in(stack.keys["alice"])
    b.go("#/submit")
    fill_form(b, {"method": "l1", "arch": "resnet20", "dataset": "synthetic:4x16", "budget.value": "0.5",
                  "epochs": "50", "batch_size": "8"})
    b.find("#submit").click()
    b.find("#cancel").click()
    b.wait(lambda: b.driver.execute_script("return document.querySelector('.row .state')?.dataset.state")
           == "cancelled", 60, "the job to be cancelled")
    assert not b.first("#cancel")


def test_latency_report(stack, browser):
    b = browser
    job_id = seed_latency_job(stack, "alice")
    b.sign_in(stack.keys["alice"])
    b.go(f"#/jobs/{job_id}")
    pruned = b.find("#report [data-row=pruned]").text.split()
    assert pruned[:8] == ["pruned", "1.37", "M", "7.8", "k", "76.58%", "0.331", "ms"]
    assert pruned[8:] == ["0.323", "ms"]  # the drift-corrected reading the job was judged by
    readings = b.text("#readings")
    assert "0.3210, 0.3230, 0.3260" in readings and "0.3180, 0.3300" in readings and "retries 1" in readings


def test_cohort_plot_hover_and_download(stack, browser):
    b = browser
    job_id, hashes = seed_cohort(stack, "alice")
    b.sign_in(stack.keys["alice"])
    b.go(f"#/jobs/{job_id}/cohort")
    b.find("[data-plot]:not([data-plot=macs]) svg")
    points = b.all("[data-plot]:not([data-plot=macs]) circle.pt")
    assert len(points) == len(COHORT)
    assert len(b.all("[data-plot]:not([data-plot=macs]) circle.pt.front")) == 3  # member 2 is dominated
    from selenium.webdriver.common.action_chains import ActionChains

    member = next(p for p in points if p.get_attribute("data-key") == "1")
    ActionChains(b.driver).move_to_element(member).perform()
    tip = b.wait(lambda: (t := b.first(".tooltip")) and t.is_displayed() and t.text, 5, "the tooltip")
    assert "member 1 @ 12 px" in tip and "93.00%" in tip and "500.0 k" in tip
    assert "measured 6.20 ms, predicted 6.00 ms" in tip and "conv1 15" in tip
    if b.screenshot_folder():  # the README's picture: the tooltip of the top member covers no other point
        ActionChains(b.driver).move_to_element(next(p for p in points if p.get_attribute("data-key") == "0")).perform()
        b.screenshot("console-cohort.png", "#cohort-plots")
    member.click()
    b.find("#member-details[data-member='1'] [data-download='member-1:onnx']").click()
    result = b.find("#download-result")
    assert result.get_attribute("data-sha256") == hashes[1]
    path = b.downloaded(result.get_attribute("data-name"))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == hashes[1]
    assert b.find("[data-plot]:not([data-plot=macs]) circle.pt.selected[data-key='1']")


def test_devices_page_registers_and_plots_held_out_points(stack, browser):
    b = browser
    b.sign_in(stack.keys["alice"])
    b.go("#/devices")
    fill_form(b, {"name": "edge-box", "threads": "2", "resolutions": "16, 32", "latency_budget_ms": "1.5"})
    b.find("#register-device button[type=submit]").click()
    card = b.find("[data-device='edge-box']")
    assert "2 thread(s)" in card.text and "resolutions 16, 32" in card.text and "1.50 ms" in card.text
    fill_form(b, {"name": "edge-box"})
    b.find("#register-device button[type=submit]").click()
    assert "already exists" in b.text("#register-device .error")
    predictor = seed_predictor(stack, "edge-box")
    b.go("#/jobs")
    b.go("#/devices")
    row = b.find(f"[data-device='edge-box'] tr[data-predictor='{predictor}']")
    assert "MAPE 4.60%" in row.text and "ready" in row.text
    assert len(b.all("[data-device='edge-box'] svg.plot circle.pt")) == 4
    assert b.first("[data-device='edge-box'] svg.plot line.diag")


def test_another_tenant_sees_none_of_it(stack, browser):
    b = browser
    alice = {"Authorization": f"Bearer {stack.keys['alice']}"}
    jobs = httpx.get(f"{stack.url}/v1/jobs", headers=alice).json()["items"]
    assert jobs, "runs after the tests that made alice's jobs"
    b.sign_in(stack.keys["bob"])
    b.go("#/jobs")
    assert b.text("#no-jobs") == "No jobs yet."
    for job in jobs:
        for fragment in (f"#/jobs/{job['id']}", f"#/jobs/{job['id']}/cohort"):
            b.go(fragment)
            message = f"job {job['id']} not found"  # the API's words, as for an id that does not exist
            b.wait(lambda m=message: (e := b.first(".error")) and e.text == m, 10, message)
    b.go("#/devices")
    assert b.text("#no-devices") == "No devices yet."
    b.find("#signout").click()
    b.find("#api-key")
    assert b.driver.execute_script("return sessionStorage.getItem('latprune.apiKey')") is None
