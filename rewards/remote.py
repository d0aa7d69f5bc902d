"""``RemoteReward``: a reward scored by a ``flowalign rewards serve`` server (``get_reward("remote:http://...")``).

Images travel as base64 ``.npy`` float32 (exact: remote scores equal local ones) or PNG (8-bit, smaller).
Transport errors, 408/429 and 5xx are retried with exponential backoff ``min(max_backoff, backoff·2^k)`` (±10 %
jitter); other 4xx are raised at once with the server's message (sending the same request again cannot help);
after the last attempt a ``RemoteRewardError`` says how many attempts were made and what the last error was.
Gradients do not cross HTTP: a remote reward is never differentiable.

Several replicas (``remote:http://a:8000,http://b:8000`` or ``urls=[...]``): requests go round-robin; a failed
attempt (transport error or a retryable status) fails over at once to the next replica, and the backoff sleep comes
only after a whole round of replicas has failed. A replica that dropped a connection is skipped for ``cooldown``
seconds (unless every replica is down). Each request gets exactly one answer and the calls are sequential, so the
scores come back in order, one per row; a replica that dies mid-run loses nothing (its request is re-sent).
"""

from __future__ import annotations

import base64
import io
import os
import random
import socket
import threading
import time
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from flowalign.rewards.base import REWARDS, Reward

TOKEN_ENV = "FLOWALIGN_REWARD_TOKEN"
RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class RemoteRewardError(RuntimeError):
    """The server refused the request (``status`` set) or could not be reached after all retries."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def encode_images(images: Tensor, encoding: str = "npy") -> dict[str, Any]:
    """``B,C,H,W``/``B,T,C,H,W`` float [0,1] -> the server's ``images`` field (``npy`` float32 or ``png``)."""
    x = images.detach().cpu()
    if encoding == "npy":
        buf = io.BytesIO()
        np.save(buf, x.float().numpy(), allow_pickle=False)
        return {"format": "npy", "data": base64.b64encode(buf.getvalue()).decode("ascii")}
    if encoding == "png":
        from PIL import Image

        def png(frame: Tensor) -> str:
            a = (frame * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
            buf = io.BytesIO()
            Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buf, format="PNG")
            return base64.b64encode(buf.getvalue()).decode("ascii")

        data = [[png(f) for f in v] for v in x] if x.ndim == 5 else [png(f) for f in x]
        return {"format": "png", "data": data}
    raise ValueError(f"encoding must be 'npy' or 'png', got {encoding!r}")


@REWARDS.register("remote")
class RemoteReward(Reward):
    """Client of a reward server: ``RemoteReward("http://host:8000", token=...)(images, prompts)``.

    ``url``: one URL, or several comma-separated (or ``urls=[...]``): replicas, module docstring;
    ``token`` defaults to ``$FLOWALIGN_REWARD_TOKEN``; ``retries`` extra attempts after the first (at least one
    attempt per replica); ``transport`` is an optional ``httpx`` transport (proxies, mocks in tests)."""

    name = "remote"
    differentiable = False

    def __init__(self, url: str | Sequence[str] | None = None, token: str | None = None, *,
                 urls: Sequence[str] | None = None, timeout: float = 120.0, retries: int = 5,
                 backoff: float = 0.5, max_backoff: float = 30.0, cooldown: float = 30.0, encoding: str = "npy",
                 batch_size: int | None = 64, modality: str | None = None,
                 device: str | torch.device = "cpu", transport: Any = None) -> None:
        import httpx

        super().__init__(device=device, batch_size=batch_size)
        given = [url] if isinstance(url, str) else list(url or [])
        self.urls = [u.strip().rstrip("/") for part in [*given, *(urls or [])] for u in part.split(",") if u.strip()]
        if not self.urls:
            raise ValueError("remote reward needs a URL: remote:http://host:port (several: comma-separated)")
        for u in self.urls:
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"remote reward URL must start with http:// or https://, got {u!r}")
        if encoding not in ("npy", "png"):
            raise ValueError(f"encoding must be 'npy' or 'png', got {encoding!r}")
        self.url = self.urls[0]
        self.cooldown = float(cooldown)
        self._lock = threading.Lock()  # scoring may run in the trainer's background reward thread
        self._next = 0  # round-robin position
        self._down_until = {u: 0.0 for u in self.urls}  # monotonic time until which a replica is skipped
        self.served = {u: 0 for u in self.urls}  # answered requests per replica
        self.failures = {u: 0 for u in self.urls}  # failed attempts per replica
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)
        self.retries, self.backoff, self.max_backoff = int(retries), float(backoff), float(max_backoff)
        self.encoding = encoding
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        if transport is None:  # no Nagle delay: small JSON requests otherwise wait ~40 ms for delayed ACKs
            transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        self.client = httpx.Client(timeout=timeout, headers=headers, transport=transport)
        self.info: dict[str, Any] | None = None
        if modality is not None:
            self.modality = modality  # type: ignore[misc]

    def _order(self) -> list[str]:
        """Replicas to try for one request: round-robin from the next one, replicas in cool-down last."""
        with self._lock:
            n, k = len(self.urls), self._next
            self._next = (k + 1) % n
        ring = [self.urls[(k + i) % n] for i in range(n)]
        now = time.monotonic()
        return [u for u in ring if self._down_until[u] <= now] + [u for u in ring if self._down_until[u] > now]

    def _request(self, method: str, path: str, **kwargs: Any) -> dict:
        import httpx

        order = self._order()
        attempts, last, n = max(self.retries + 1, len(order)), "", len(order)
        start = time.monotonic()
        for k in range(attempts):
            url = order[k % n]
            tag = f"{url}: " if n > 1 else ""  # which replica, when there are several
            try:
                r = self.client.request(method, url + path, **kwargs)
                if r.status_code < 400:
                    self.served[url] += 1
                    self._down_until[url] = 0.0
                    return r.json()
                try:
                    detail = r.json().get("detail", r.text)
                except ValueError:
                    detail = r.text
                last = f"{tag}HTTP {r.status_code}: {detail}"
                if r.status_code not in RETRY_STATUS:
                    raise RemoteRewardError(f"reward server {url} refused the request: HTTP {r.status_code}: "
                                            f"{detail}", r.status_code)
            except httpx.TransportError as e:
                last = f"{tag}{type(e).__name__}: {e}"
                self._down_until[url] = time.monotonic() + self.cooldown  # dead replica: skip it for a while
            self.failures[url] += 1
            if k + 1 < attempts and (k + 1) % n == 0:  # a whole round failed: back off before the next one
                delay = min(self.max_backoff, self.backoff * 2 ** ((k + 1) // n - 1))
                time.sleep(delay * random.uniform(0.9, 1.1))
        where = self.url if n == 1 else f"{n} replicas ({', '.join(self.urls)})"
        raise RemoteRewardError(f"reward server {where}{path} failed after {attempts} attempts "
                                f"({time.monotonic() - start:.1f} s); last error: {last}")

    def health(self) -> dict:
        """``GET /health`` (name, modality, differentiable of the served reward)."""
        self.info = self._request("GET", "/health")
        return self.info

    def __call__(self, images=None, prompts: Sequence[str] | None = None, metadata: Sequence[dict] | None = None,
                 **kwargs: Any) -> Tensor:
        if "modality" not in vars(self):
            self.modality = self.health()["modality"]  # type: ignore[misc]
        return super().__call__(images, prompts, metadata, **kwargs)

    def score(self, inputs: Any, prompts: list[str], metadata: list[dict]) -> Tensor:
        body: dict[str, Any] = {"prompts": prompts, "metadata": metadata}
        if self.modality == "text":
            body["completions"] = list(inputs)
        else:
            body["images"] = encode_images(inputs, self.encoding)
        out = self._request("POST", "/score", json=body)
        scores = [float("nan") if s is None else s for s in out["scores"]]
        return torch.tensor(scores, dtype=torch.float32)

    def close(self) -> None:
        self.client.close()

    def __repr__(self) -> str:
        urls = self.url if len(self.urls) == 1 else self.urls
        return f"RemoteReward(url={urls!r}, modality={getattr(self, 'modality', None)!r})"
