"""Torch-free validation of uploaded safetensors files against an architecture.

The API process never imports torch: the file's header is parsed here (it is JSON), its tensors are
checked for NaN/Inf with numpy through a memory map, and the architecture's expected state-dict
layout comes from service.engine_info (a cached subprocess). Nothing in the file is executed.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

MAX_HEADER_BYTES = 100 * 1024 * 1024
# safetensors dtype -> (bytes per element, numpy dtype for the finite check or None, is floating point)
DTYPES: dict[str, tuple[int, str | None, bool]] = {
    "F64": (8, "<f8", True), "F32": (4, "<f4", True), "F16": (2, "<f2", True), "BF16": (2, None, True),
    "I64": (8, None, False), "I32": (4, None, False), "I16": (2, None, False), "I8": (1, None, False),
    "U8": (1, None, False), "BOOL": (1, None, False),
}
FINITE_CHUNK_ELEMS = 4 * 1024 * 1024


class WeightsRejected(ValueError):
    """The file is not acceptable weights for the architecture; the message says why."""


def read_header(path: str | Path) -> dict[str, dict]:
    """Parse and check the safetensors header: tensor name -> {dtype, shape, data_offsets}."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsRejected("not a safetensors file: shorter than its 8-byte header length")
        n = int.from_bytes(head, "little")
        if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise WeightsRejected("not a safetensors file (a pickle or torch.save file is not accepted; "
                                  "save with safetensors.torch.save_file)")
        raw = f.read(n)
    header = _parse_header(raw)
    _check_metadata(header.pop("__metadata__", None))
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        _check_entry(name, info)
        begin, end = info["data_offsets"]
        itemsize = DTYPES[info["dtype"]][0]
        if end - begin != math.prod(info["shape"]) * itemsize:
            raise WeightsRejected(f"tensor {name!r}: data size does not match its shape and dtype")
        if end > data_len:
            raise WeightsRejected(f"file is truncated: tensor {name!r} ends past the end of the file")
        spans.append((begin, end))
    spans.sort()
    pos = 0
    for begin, end in spans:
        if begin != pos:
            raise WeightsRejected("malformed safetensors file: tensor data overlaps or has holes")
        pos = end
    if pos != data_len:
        raise WeightsRejected("malformed safetensors file: trailing bytes after the tensor data")
    return header


def _refuse_constant(literal: str) -> None:
    raise WeightsRejected(f"not a safetensors file: its header holds {literal}, which strict JSON (and so "
                          "safetensors) does not allow")


def _parse_header(raw: bytes) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except WeightsRejected:
        raise
    except RecursionError:
        raise WeightsRejected("not a safetensors file: its header is JSON nested too deeply") from None
    except ValueError as exc:  # not UTF-8, not JSON, or an integer too long to convert
        raise WeightsRejected(f"not a safetensors file: its header is not valid JSON ({str(exc)[:120]})") from None
    if not isinstance(header, dict):
        raise WeightsRejected("not a safetensors file: its header is not a JSON object")
    return header


def _check_metadata(metadata: object) -> None:
    # safetensors loads __metadata__ only as a map of strings to strings; anything else makes the file unloadable.
    if metadata is None:
        return
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WeightsRejected("__metadata__ must map names to strings (safetensors cannot load anything else); "
                              "save with safetensors.torch.save_file(..., metadata={'key': 'text'})")


def _check_entry(name: str, info: object) -> None:
    if not isinstance(info, dict):
        raise WeightsRejected(f"tensor {name!r}: header entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPES:
        raise WeightsRejected(f"tensor {name!r}: dtype {dtype!r} is not supported ({', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise WeightsRejected(f"tensor {name!r}: shape must be a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise WeightsRejected(f"tensor {name!r}: data_offsets must be two increasing integers")


def check_finite(path: str | Path, header: dict[str, dict]) -> None:
    """Raise WeightsRejected naming the first floating-point tensor holding NaN or Inf."""
    data_start = 8 + int.from_bytes(Path(path).open("rb").read(8), "little")
    for name, info in header.items():
        itemsize, np_dtype, is_float = DTYPES[info["dtype"]]
        count = math.prod(info["shape"])
        if not is_float or count == 0:
            continue
        begin = data_start + info["data_offsets"][0]
        view_dtype = np_dtype or "<u2"
        arr = np.memmap(path, dtype=view_dtype, mode="r", offset=begin, shape=(count,))
        for start in range(0, count, FINITE_CHUNK_ELEMS):
            chunk = np.asarray(arr[start:start + FINITE_CHUNK_ELEMS])
            # bfloat16: all-ones exponent bits mean Inf or NaN.
            bad = ((chunk >> 7) & 0xFF) == 0xFF if np_dtype is None else ~np.isfinite(chunk)
            if bad.any():
                raise WeightsRejected(f"tensor {name!r} contains NaN or Inf")
        del arr


def check_against(header: dict[str, dict], expected: dict[str, dict]) -> None:
    """Raise WeightsRejected unless names, shapes and float-ness match the architecture's state dict."""
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    if missing or extra:
        raise WeightsRejected(f"weights do not match the architecture: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}")
    for key, ref in expected.items():
        got = header[key]
        if list(got["shape"]) != list(ref["shape"]):
            raise WeightsRejected(f"{key}: shape {tuple(got['shape'])} but the architecture needs "
                                  f"{tuple(ref['shape'])}")
        if DTYPES[got["dtype"]][2] != ref["is_float"]:
            raise WeightsRejected(f"{key}: dtype {got['dtype']} but the architecture needs "
                                  f"{'a float' if ref['is_float'] else 'an integer'} dtype")


def validate_file(path: str | Path, arch: str, num_classes: int, in_channels: int) -> dict[str, dict]:
    """Full check of an uploaded weights file; returns its header."""
    from service.engine_info import expected_state

    header = read_header(path)
    check_against(header, expected_state(arch, num_classes, in_channels))
    check_finite(path, header)
    return header
