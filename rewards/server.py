"""HTTP reward server: ``flowalign rewards serve --reward pickscore --host 127.0.0.1 --port 8000``.

FastAPI on uvicorn (h11). Wire format (JSON only, never pickle), protocol 1:

``POST /score``  (``Authorization: Bearer <token>`` when the server has a token; ``Content-Type: application/json``)

    {"images": {"format": "npy", "data": "<base64 .npy>"},          # one array B,C,H,W or B,T,C,H,W,
                                                                      # float16/32/64 in [0,1], uint8 or uint16
     -- or --  {"format": "png", "data": ["<base64 png>", ...]},     # one PNG per image (video: list of lists)
     "prompts": ["...", ...], "metadata": [{...}, ...],               # optional, one per sample
     "completions": ["...", ...]}                                     # text rewards instead of images
    -> {"scores": [float, ...], "reward": "<name>"}

``GET /health`` -> ``{"status": "ok", "reward", "modality", "differentiable", "protocol"}`` (no token needed).
``GET /stats`` -> request/batch counters (token needed).

Every malformed request gets a 4xx with ``{"detail": "<message>"}``: 400 bad JSON/base64/PNG/NPY or a request with
both ``Transfer-Encoding`` and ``Content-Length`` (then the connection is closed, so nothing smuggled behind it is
served), 401 missing or wrong token, 408 body slower than ``body_timeout``, 413 payload over ``max_payload_bytes``
or images over ``max_image_pixels``, 415 not JSON, 422 wrong shapes/dtypes/NaN/range/counts/16-bit colour PNG or
an input the reward refuses. 500 is a reward failure, 504 a request over ``timeout``. NPY is read with
``allow_pickle=False``. Image conversions (16-bit, alpha composited on white) are documented in ``_decode``.

Memory bounds (the reward server must survive hostile clients):

* ``max_image_pixels`` (default 16 Mi pixels = 64 images of 512x512) is the pixel sum of a whole request (images x
  frames x H x W). It is checked on the PNG/NPY *headers*, before any pixel is decoded.
* ``max_inflight_pixels`` (default 2 x ``max_image_pixels``) bounds the decoded pixels of all requests in flight
  together (decoded, not yet scored): decoded images never take more than ``max_inflight_pixels x 3 x 4`` bytes.
* ``header_timeout`` (10 s): a connection whose request head is not complete within it is closed (slowloris);
  uvicorn closes idle keep-alive connections after ``timeout_keep_alive`` and h11 caps a head at 16 KiB.
  ``body_timeout`` (60 s) bounds reading the body (408).

Dynamic batching: concurrent requests whose inputs share a shape are merged into one reward call of up to
``max_batch`` samples, waiting at most ``batch_window_ms`` for more to arrive; the reward runs on one worker
thread (one model on one device). ``max_batch <= 1`` turns batching off (one reward call per request).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import json
import logging
import math
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from contextlib import asynccontextmanager
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from flowalign.rewards import _decode
from flowalign.rewards._decode import ImagePlan, RequestError
from flowalign.rewards._guards import PixelBudget, guarded_h11
from flowalign.rewards.base import Reward, get_reward

logger = logging.getLogger("flowalign.rewards.server")
PROTOCOL = 1
TOKEN_ENV = "FLOWALIGN_REWARD_TOKEN"


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# ----------------------------------------------------------------------------- payload decoding
def decode_images(obj: Any, max_pixels: int) -> torch.Tensor:
    """``{"format": "npy"|"png", "data": ...}`` -> float32 tensor ``B,C,H,W`` / ``B,T,C,H,W`` (validated; headers
    are read and the request's pixel sum checked against ``max_pixels`` before anything is decoded)."""
    return torch.from_numpy(_decode.decode_images(obj, max_pixels))


def _str_list(obj: Any, name: str, n: int | None) -> list[str] | None:
    if obj is None:
        return None
    if not isinstance(obj, list) or not all(isinstance(s, str) for s in obj):
        raise RequestError(422, f"{name} must be a list of strings")
    if n is not None and len(obj) != n:
        raise RequestError(422, f"got {n} samples but {len(obj)} {name}")
    return obj


@dataclass
class ScoreRequest:
    """One validated request: inputs (tensor or completions), prompts, metadata."""

    inputs: Any
    prompts: list[str]
    metadata: list[dict]
    n: int
    key: tuple
    future: asyncio.Future = field(default=None)  # type: ignore[assignment]


@dataclass
class PlannedRequest:
    """A request checked up to its image headers: ``pixels`` it will decode to, ``decode()`` -> ``ScoreRequest``."""

    plan: ImagePlan | None  # None for text rewards
    completions: list[str] | None
    prompts: list[str]
    metadata: list[dict]
    n: int

    @property
    def pixels(self) -> int:
        return self.plan.pixels if self.plan is not None else 0

    def decode(self) -> ScoreRequest:
        if self.plan is None:
            return ScoreRequest(self.completions, self.prompts, self.metadata, self.n, ("text",))
        x = torch.from_numpy(self.plan.decode())
        return ScoreRequest(x, self.prompts, self.metadata, self.n, ("image", tuple(x.shape[1:])))


def plan_request(body: dict, reward: Reward, max_pixels: int) -> PlannedRequest:
    """Validate a decoded JSON body against the reward's modality, reading image headers only (413 over the pixel
    budget here, before any decoding); raises ``RequestError``."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the JSON body must be an object, got {type(body).__name__}")
    unknown = set(body) - {"images", "prompts", "metadata", "completions", "answers"}
    if unknown:
        raise RequestError(422, f"unknown fields {sorted(unknown)}; allowed: images, prompts, metadata, "
                                "completions, answers")
    plan, completions = None, None
    if reward.modality == "text":
        completions = _str_list(body.get("completions"), "completions", None)
        if not completions:
            raise RequestError(422, f"reward {reward.name!r} is a text reward: send a non-empty 'completions' list")
        n = len(completions)
    else:
        if "images" not in body:
            raise RequestError(422, f"reward {reward.name!r} needs 'images'")
        plan = _decode.plan_images(body["images"], max_pixels)
        n, ndim = plan.shape[0], len(plan.shape)
        if reward.modality == "video" and ndim != 5:
            raise RequestError(422, f"reward {reward.name!r} scores videos B,T,C,H,W, got {plan.shape}")
        if reward.modality == "image" and ndim == 5 and not getattr(reward, "accepts_video", False):
            raise RequestError(422, f"reward {reward.name!r} scores images B,C,H,W, got {plan.shape}")
    prompts = _str_list(body.get("prompts"), "prompts", n) or [""] * n
    metadata = body.get("metadata")
    if metadata is None:
        metadata = [{} for _ in range(n)]
    if not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata):
        raise RequestError(422, "metadata must be a list of objects")
    if len(metadata) != n:
        raise RequestError(422, f"got {n} samples but {len(metadata)} metadata entries")
    answers = body.get("answers")
    if answers is not None:
        if not isinstance(answers, list) or len(answers) != n:
            raise RequestError(422, f"answers must be a list of {n} entries")
        metadata = [dict(m, answer=a) for m, a in zip(metadata, answers)]
    return PlannedRequest(plan, completions, prompts, metadata, n)


def parse_request(body: dict, reward: Reward, max_pixels: int) -> ScoreRequest:
    """``plan_request`` then decode: a validated ``ScoreRequest``; raises ``RequestError``."""
    return plan_request(body, reward, max_pixels).decode()


# ----------------------------------------------------------------------------- dynamic batching
class Batcher:
    """Merge concurrent requests of one input shape into reward calls of up to ``max_batch`` samples."""

    def __init__(self, reward: Reward, max_batch: int, window_s: float) -> None:
        self.reward, self.max_batch, self.window_s = reward, max_batch, window_s
        self.queue: asyncio.Queue[ScoreRequest] = asyncio.Queue()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="reward")  # one model, one device, one call at a time
        self.stats = {"requests": 0, "batches": 0, "samples": 0, "max_batch_seen": 0}
        self._carry: ScoreRequest | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def submit(self, req: ScoreRequest) -> torch.Tensor:
        req.future = asyncio.get_running_loop().create_future()
        await self.queue.put(req)
        return await req.future

    async def _next(self, timeout: float | None) -> ScoreRequest | None:
        if self._carry is not None:
            req, self._carry = self._carry, None
            return req
        if timeout is None:
            return await self.queue.get()
        try:
            return await asyncio.wait_for(self.queue.get(), timeout) if timeout > 0 else self.queue.get_nowait()
        except (asyncio.TimeoutError, asyncio.QueueEmpty):
            return None

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next(None)
            if first.future.done():  # cancelled (client timed out) before it ran
                continue
            batch, n = [first], first.n
            if self.max_batch > 1:
                deadline = loop.time() + self.window_s
                while n < self.max_batch:
                    nxt = await self._next(max(0.0, deadline - loop.time()))
                    if nxt is None:
                        break
                    if nxt.future.done():
                        continue
                    if nxt.key != first.key or n + nxt.n > self.max_batch:
                        self._carry = nxt
                        break
                    batch.append(nxt)
                    n += nxt.n
            try:
                await self._run(loop, batch)
            except Exception as e:  # never let the batching loop die: fail these requests, keep serving
                logger.exception("batch failed")
                for req in batch:
                    if not req.future.done():
                        req.future.set_exception(e)

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[ScoreRequest]) -> None:
        try:
            scores = await loop.run_in_executor(self.pool, self._call, batch)
        except Exception as e:
            if len(batch) > 1:  # isolate the failing request: score each alone
                for req in batch:
                    await self._run(loop, [req])
                return
            if not batch[0].future.done():
                batch[0].future.set_exception(e)
            return
        self.stats["requests"] += len(batch)
        self.stats["batches"] += 1
        self.stats["samples"] += sum(r.n for r in batch)
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], sum(r.n for r in batch))
        i = 0
        for req in batch:
            if not req.future.done():
                req.future.set_result(scores[i:i + req.n])
            i += req.n

    def _call(self, batch: list[ScoreRequest]) -> torch.Tensor:
        prompts = [p for r in batch for p in r.prompts]
        metadata = [m for r in batch for m in r.metadata]
        with torch.inference_mode():
            if self.reward.modality == "text":
                out = self.reward(prompts=prompts, metadata=metadata,
                                  completions=[c for r in batch for c in r.inputs])
            else:
                x = batch[0].inputs if len(batch) == 1 else torch.cat([r.inputs for r in batch])
                out = self.reward(x, prompts, metadata)
        return out.detach().float().cpu()


# ----------------------------------------------------------------------------- app
def create_app(reward: Reward | str, token: str | None = None, max_payload_bytes: int = 64 << 20,
               timeout: float = 120.0, max_batch: int = 64, batch_window_ms: float = 5.0,
               max_image_pixels: int = 16 << 20, max_inflight_pixels: int | None = None,
               body_timeout: float = 60.0):
    """The FastAPI app serving ``reward`` (see the module docstring for the protocol and the limits)."""
    reward = get_reward(reward) if isinstance(reward, str) else reward
    token = token or None  # an empty token means no token, never "accept an empty bearer"
    batcher = Batcher(reward, int(max_batch or 0), max(0.0, batch_window_ms) / 1000.0)
    budget = PixelBudget(max_inflight_pixels or 2 * max_image_pixels)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title=f"flowalign reward server ({reward.name})", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    app.state.budget = budget

    def err(status: int, message: str, close: bool = False) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
        if close:  # the body may be unread (or ambiguous): h11 then closes the connection after this response
            headers["Connection"] = "close"
        return JSONResponse({"detail": message}, status_code=status, headers=headers or None)

    @app.middleware("http")
    async def no_smuggling(request: Request, call_next):
        # RFC 9112 6.1: a request with both is a smuggling attempt (a proxy may frame it by Content-Length while
        # h11 frames it by chunks); refuse it and close, so the bytes behind it are never read as a request.
        if "transfer-encoding" in request.headers and "content-length" in request.headers:
            return err(400, "request has both Transfer-Encoding and Content-Length; refused, connection closed",
                       close=True)
        return await call_next(request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return err(exc.status_code, str(exc.detail) or "error")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return err(422, f"invalid request: {exc.errors()}")

    def authorized(request: Request) -> bool:
        if token is None:
            return True
        auth = request.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None:
            try:
                if int(length) > max_payload_bytes:
                    raise RequestError(413, f"payload of {int(length)} bytes is over the limit of "
                                            f"{max_payload_bytes} bytes")
            except ValueError:
                raise RequestError(400, "invalid Content-Length header") from None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_payload_bytes:
                raise RequestError(413, f"payload is over the limit of {max_payload_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def scored(planned: PlannedRequest) -> torch.Tensor:
        await budget.acquire(planned.pixels)
        try:
            req = await asyncio.to_thread(planned.decode)
            return await batcher.submit(req)
        finally:
            budget.release(planned.pixels)

    @app.get("/health")
    async def health():
        return {"status": "ok", "reward": reward.name, "modality": reward.modality,
                "differentiable": bool(reward.differentiable), "protocol": PROTOCOL}

    @app.get("/stats")
    async def stats(request: Request):
        if not authorized(request):
            return err(401, "missing or invalid token: send 'Authorization: Bearer <token>'")
        return dict(batcher.stats)

    @app.post("/score")
    async def score(request: Request):
        if not authorized(request):
            return err(401, "missing or invalid token: send 'Authorization: Bearer <token>'")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return err(415, f"Content-Type must be application/json (got {ctype or 'none'}); "
                            "this server never accepts pickle")
        try:
            start = time.monotonic()
            read_limit = min(timeout, body_timeout)
            try:
                raw = await asyncio.wait_for(read_body(request), read_limit)
            except asyncio.TimeoutError:
                raise RequestError(408, f"request body not received within {read_limit} s") from None
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, too deep
                raise RequestError(400, f"body is not valid JSON: {e}") from None
            del raw
            planned = await asyncio.to_thread(plan_request, body, reward, max_image_pixels)
            del body
            remaining = timeout - (time.monotonic() - start)
            try:
                scores = await asyncio.wait_for(scored(planned), max(remaining, 1e-3))
            except asyncio.TimeoutError:
                return err(504, f"scoring did not finish within {timeout} s")
        except RequestError as e:
            return err(e.status, e.message, close=e.status == 408)  # 413: uvicorn drains (discards) the rest
        except (ValueError, TypeError) as e:  # the reward's own input checks
            return err(422, f"reward {reward.name!r} rejected the input: {e}")
        except Exception as e:  # a reward failure is the server's problem, not the client's
            logger.exception("reward %s failed", reward.name)
            return err(500, f"reward {reward.name!r} failed: {type(e).__name__}: {e}")
        values = scores.tolist()
        if not all(math.isfinite(v) for v in values):
            return JSONResponse({"scores": [v if math.isfinite(v) else None for v in values],
                                 "reward": reward.name, "warning": "non-finite scores sent as null"})
        return {"scores": values, "reward": reward.name}

    return app


def _uvicorn_config(app: Any, log_level: str, header_timeout: float, timeout_keep_alive: int = 5) -> Any:
    import uvicorn

    return uvicorn.Config(app, log_level=log_level, lifespan="on", access_log=False,
                          http=guarded_h11(header_timeout), timeout_keep_alive=timeout_keep_alive)


def _check_exposure(host: str, token: str | None) -> None:
    if not token and not is_loopback(host):
        raise ValueError(f"refusing to serve on {host!r} without a token: pass token=... (or set ${TOKEN_ENV}); "
                         "only loopback addresses (127.0.0.1, ::1, localhost) may run without one")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv6 when the host has a colon; ``port=0`` picks a free one),
    inheritable so a uvicorn server (this one or the labelling server) can serve on it."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class RewardServer:
    """A running server in a background thread: ``.url``, ``.stop()``; a context manager. With ``lifetime`` it
    also stops itself after that many seconds (a safety net for tests and benchmarks)."""

    def __init__(self, reward: Reward | str, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 lifetime: float | None = None, log_level: str = "warning", header_timeout: float = 10.0,
                 **app_kwargs: Any) -> None:
        import uvicorn

        _check_exposure(host, token)
        self.app = create_app(reward, token=token, **app_kwargs)
        self.sock = bind_socket(host, port)
        self.port = self.sock.getsockname()[1]
        self.host = host
        h = f"[{host}]" if ":" in host else host
        self.url = f"http://{h}:{self.port}"
        self.server = uvicorn.Server(_uvicorn_config(self.app, log_level, header_timeout, timeout_keep_alive=30))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name=f"reward-server-{self.port}", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("reward server failed to start")
            time.sleep(0.01)
        self._timer = threading.Timer(lifetime, self.stop) if lifetime else None
        if self._timer:
            self._timer.daemon = True
            self._timer.start()

    @property
    def stats(self) -> dict:
        return dict(self.app.state.batcher.stats)

    def stop(self) -> None:
        self.server.should_exit = True
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout=30)
        if self._timer:
            self._timer.cancel()
        self.sock.close()

    def __enter__(self) -> "RewardServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_server(reward: Reward | str, host: str = "127.0.0.1", port: int = 0, **kwargs: Any) -> RewardServer:
    """Start a server in a background thread (``port=0`` picks a free port) and return its handle."""
    return RewardServer(reward, host=host, port=port, **kwargs)


def serve(reward: Reward | str, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          max_payload_bytes: int = 64 << 20, timeout: float = 120.0, max_batch: int = 64,
          batch_window_ms: float = 5.0, max_image_pixels: int = 16 << 20, log_level: str = "info",
          lifetime: float | None = None, max_inflight_pixels: int | None = None, header_timeout: float = 10.0,
          body_timeout: float = 60.0) -> None:
    """Serve ``reward`` until interrupted (or for ``lifetime`` seconds). A token is required unless ``host`` is
    loopback."""
    import uvicorn

    _check_exposure(host, token)
    app = create_app(reward, token=token, max_payload_bytes=max_payload_bytes, timeout=timeout,
                     max_batch=max_batch, batch_window_ms=batch_window_ms, max_image_pixels=max_image_pixels,
                     max_inflight_pixels=max_inflight_pixels, body_timeout=body_timeout)
    sock = bind_socket(host, port)
    logger.info("serving reward on http://%s:%d", host, sock.getsockname()[1])
    server = uvicorn.Server(_uvicorn_config(app, log_level, header_timeout))
    if lifetime:
        timer = threading.Timer(lifetime, lambda: setattr(server, "should_exit", True))
        timer.daemon = True
        timer.start()
    server.run(sockets=[sock])


def _parse_kv(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--arg expects key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``flowalign rewards serve``: serve one reward over HTTP."""
    p = argparse.ArgumentParser(prog="flowalign rewards serve", description=__doc__.split("\n")[0])
    p.add_argument("--reward", required=True, help="registered name, 'package.module:Attr', or built-in")
    p.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                   help="constructor argument of the reward (JSON values), e.g. --arg model=/ckpt/PickScore_v1")
    p.add_argument("--device", default=None, help="device of the reward model (default: cuda if available)")
    p.add_argument("--host", default="127.0.0.1", help="bind address; anything but loopback needs a token")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV), help=f"bearer token (default ${TOKEN_ENV})")
    p.add_argument("--max-payload-mb", type=float, default=64.0, help="largest request body")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout in seconds")
    p.add_argument("--max-batch", type=int, default=64, help="samples per merged reward call; <=1 disables batching")
    p.add_argument("--batch-window-ms", type=float, default=5.0, help="how long to wait for more requests")
    p.add_argument("--max-image-pixels", type=int, default=16 << 20,
                   help="pixel sum of one request (images x frames x H x W), checked on headers before decoding")
    p.add_argument("--max-inflight-pixels", type=int, default=None,
                   help="decoded pixels of all requests in flight (default 2 x --max-image-pixels)")
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds to send a whole request head")
    p.add_argument("--body-timeout", type=float, default=60.0, help="seconds to send the request body")
    p.add_argument("--log-level", default="info")
    p.add_argument("--lifetime", type=float, default=None, help="stop by itself after this many seconds")
    args = p.parse_args(list(argv) if argv is not None else None)
    try:
        _check_exposure(args.host, args.token)  # before loading a large model
    except ValueError as e:
        p.error(str(e))
    kwargs = _parse_kv(args.arg)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        reward = get_reward(args.reward, device=device, **kwargs)
    except TypeError:  # rewards without a device argument
        reward = get_reward(args.reward, **kwargs)
    try:
        serve(reward, host=args.host, port=args.port, token=args.token,
              max_payload_bytes=int(args.max_payload_mb * (1 << 20)), timeout=args.timeout,
              max_batch=args.max_batch, batch_window_ms=args.batch_window_ms, log_level=args.log_level,
              lifetime=args.lifetime, max_image_pixels=args.max_image_pixels,
              max_inflight_pixels=args.max_inflight_pixels, header_timeout=args.header_timeout,
              body_timeout=args.body_timeout)
    except ValueError as e:
        p.error(str(e))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
