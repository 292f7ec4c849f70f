"""Python client of the latprune API (httpx): what the CLI verbs use, so nobody writes curl by hand.

    from service.client import Client
    client = Client("http://127.0.0.1:8000", api_key)
    job = client.submit({"method": "l1", "arch": "resnet20", "dataset": "builtin:digits",
                         "budget": {"kind": "flops", "value": 0.5}})
    for event in client.events(job["id"]): ...
    client.download(job["id"], device="laptop", dest="model.onnx")
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

CLIENT_FILE = "client.json"


class ApiError(Exception):
    """The API answered with an error status; `detail` is its message."""

    def __init__(self, status: int, detail: Any):
        self.status, self.detail = status, detail
        super().__init__(f"{status}: {_detail_text(detail)}")


def _detail_text(detail: Any) -> str:
    if isinstance(detail, list):  # FastAPI validation errors: name the fields
        return "; ".join(f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail)
    return str(detail)


@dataclass
class Event:
    """One server-sent event of a job: id (None for the final 'end'), kind and data."""

    id: int | None
    kind: str
    data: dict


def save_client_config(home: Path, url: str, api_key: str) -> Path:
    """Remember the API URL and key for the CLI (file readable by its owner only)."""
    path = home / CLIENT_FILE
    home.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url, "api_key": api_key}, f)
    return path


def load_client_config(home: Path) -> dict:
    """The saved {url, api_key}, or {}."""
    path = home / CLIENT_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


class Client:
    """Typed calls to the latprune API; every error status raises ApiError with the server's message."""

    def __init__(self, base_url: str, api_key: str | None, timeout_s: float = 60.0,
                 transport: httpx.BaseTransport | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s,
                                 transport=transport)

    @classmethod
    def from_settings(cls, settings) -> Client:  # noqa: ANN001 - service.settings.Settings
        """A client for the configured API: LATPRUNE_API_URL/KEY, else what `latprune up` saved."""
        saved = load_client_config(settings.home)
        url = settings.api_url if "LATPRUNE_API_URL" in os.environ else saved.get("url", settings.api_url)
        return cls(url, settings.api_key or saved.get("api_key"))

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs) -> Any:
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ApiError(response.status_code, detail)
        return response.json() if response.content else None

    def health(self) -> dict:
        return self._call("GET", "/healthz")

    def methods(self) -> list[dict]:
        return self._call("GET", "/v1/methods")

    def create_device(self, **spec: Any) -> dict:
        return self._call("POST", "/v1/devices", json=spec)

    def devices(self) -> list[dict]:
        return self._call("GET", "/v1/devices")

    def device(self, device_id: int) -> dict:
        return self._call("GET", f"/v1/devices/{device_id}")

    def find_device(self, ref: str | int) -> dict:
        """A device by id or name."""
        for device in self.devices():
            if str(device["id"]) == str(ref) or device["name"] == ref:
                return device
        raise ApiError(404, f"device {ref} not found")

    def profile(self, device_id: int, arch: str, resolution: int | None = None, samples: int = 200) -> dict:
        body = {"arch": arch, "samples": samples, **({"resolution": resolution} if resolution else {})}
        return self._call("POST", f"/v1/devices/{device_id}/profile", json=body)

    def predictors(self, device_id: int) -> list[dict]:
        return self._call("GET", f"/v1/devices/{device_id}/predictors")

    def upload_model(self, path: str | Path, arch: str, num_classes: int = 10, in_channels: int = 3,
                     name: str = "") -> dict:
        with open(path, "rb") as f:
            return self._call("POST", "/v1/models", files={"weights": (Path(path).name, f)},
                              data={"arch": arch, "num_classes": str(num_classes),
                                    "in_channels": str(in_channels), "name": name})

    def submit(self, job: dict, idempotency_key: str | None = None) -> dict:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", "/v1/jobs", json=job, headers=headers)

    def jobs(self, state: str | None = None, limit: int = 50, offset: int = 0) -> dict:
        params: dict[str, Any] = {"limit": limit, "offset": offset, **({"state": state} if state else {})}
        return self._call("GET", "/v1/jobs", params=params)

    def job(self, job_id: int) -> dict:
        return self._call("GET", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: int) -> dict:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel")

    def subnets(self, job_id: int) -> list[dict]:
        return self._call("GET", f"/v1/jobs/{job_id}/subnets")

    def events(self, job_id: int, after: int = 0, follow: bool = True) -> Iterator[Event]:
        """The job's progress as server-sent events, until it ends (resumes after a dropped connection)."""
        last = after
        while True:
            params = {"after": last, "follow": str(follow).lower()}
            with self.http.stream("GET", f"/v1/jobs/{job_id}/events", params=params,
                                  timeout=httpx.Timeout(60.0, read=None)) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ApiError(response.status_code, response.json().get("detail"))
                fields: dict[str, str] = {}
                try:
                    for line in response.iter_lines():
                        if line:
                            key, _, value = line.partition(": ")
                            fields[key] = value
                            continue
                        if "event" not in fields:
                            fields = {}
                            continue
                        event = Event(int(fields["id"]) if "id" in fields else None, fields["event"],
                                      json.loads(fields.get("data") or "{}"))
                        fields = {}
                        if event.id is not None:
                            last = event.id
                        yield event
                        if event.kind == "end":
                            return
                except httpx.RemoteProtocolError:
                    continue
            if not follow:
                return

    def download(self, job_id: int, device: str | int, dest: str | Path | None = None, fmt: str = "onnx",
                 latency_ms: float | None = None, over_budget: str = "refuse") -> tuple[Path, dict[str, str]]:
        """Save the checkpoint that suits the device; the SHA-256 from the server is checked. With over_budget
        "fastest", a job with no subnet within the budget gives its fastest (headers["x-over-budget"] says so)."""
        params: dict[str, Any] = {"device": str(device), "format": fmt, "over_budget": over_budget}
        if latency_ms is not None:
            params["latency_ms"] = latency_ms
        with self.http.stream("GET", f"/v1/jobs/{job_id}/checkpoint", params=params) as response:
            if response.status_code >= 400:
                response.read()
                raise ApiError(response.status_code, response.json().get("detail"))
            name = response.headers.get("content-disposition", "").partition("filename=")[2].strip('"')
            path = Path(dest) if dest else Path(name or f"job{job_id}.{fmt}")
            if path.is_dir():
                path = path / (name or f"job{job_id}.{fmt}")
            tmp = path.with_name(path.name + ".part")
            digest = hashlib.sha256()
            with open(tmp, "wb") as f:
                for chunk in response.iter_bytes():
                    digest.update(chunk)
                    f.write(chunk)
            expected = response.headers.get("x-checkpoint-sha256")
            if expected and digest.hexdigest() != expected:
                tmp.unlink(missing_ok=True)
                raise ApiError(502, f"download corrupted: sha256 {digest.hexdigest()} != {expected}")
            tmp.replace(path)
            return path, dict(response.headers)
