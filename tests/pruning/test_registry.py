import subprocess
import sys

import pytest
from pydantic import ValidationError

from pruning.registry import METHODS, UnknownMethodError, get_method, load_runner


def test_unknown_method_lists_known():
    with pytest.raises(UnknownMethodError, match="known methods: .*l1"):
        get_method("l2-magic")


def test_params_are_validated_with_field_names():
    with pytest.raises(ValidationError, match="allocation"):
        get_method("l1").validate_params({"allocation": "sideways"})
    with pytest.raises(ValidationError, match="bogus"):
        get_method("l1").validate_params({"bogus": 1})
    assert get_method("l1").validate_params({"round_to": 8}).round_to == 8


def test_every_method_resolves_to_a_callable():
    for name in METHODS:
        assert callable(load_runner(name))
        assert get_method(name).params_schema()["type"] == "object"


def test_registry_does_not_import_torch():
    code = "import sys, pruning.registry as r; r.get_method('l1').params_schema(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
