"""Every registered single-model method through the service: POST /v1/jobs, a real worker, the stored result."""

from __future__ import annotations

import pytest

from pruning.registry import METHODS

# Every test here runs real workers or jobs: seconds to minutes each.
pytestmark = pytest.mark.slow

SINGLE_MODEL_METHODS = sorted(name for name, info in METHODS.items() if not info.produces_cohort)


@pytest.mark.slow
@pytest.mark.parametrize("method", SINGLE_MODEL_METHODS)
def test_every_method_prunes_a_tiny_job_in_the_worker(embedded_stack, method):
    stack = embedded_stack
    job = stack.submit(method=method, finetune_epochs=1)
    done = stack.wait_state(job["id"], ("succeeded", "failed", "cancelled"), timeout_s=300)
    assert done["state"] == "succeeded", done["error"]
    report = done["report"]
    assert report["method"] == method
    assert 0 < report["pruned"]["macs"] <= 0.5 * report["dense"]["macs"]
    (subnet,) = stack.client.get(f"/v1/jobs/{job['id']}/subnets", headers=stack.headers).json()
    assert {a["format"] for a in subnet["artifacts"]} == {"onnx", "safetensors", "arch"}


def test_the_api_refuses_bad_parameters_of_every_method_naming_the_field(embedded_stack):
    for method in SINGLE_MODEL_METHODS:
        r = embedded_stack.client.post("/v1/jobs", headers=embedded_stack.headers,
                                       json={"method": method, "arch": "resnet20", "dataset": "synthetic:4x16",
                                             "budget": {"kind": "flops", "value": 0.5}, "params": {"round_to": 0}})
        assert r.status_code == 422 and "round_to" in r.text, (method, r.text)
