"""Reward server and RemoteReward: remote == local, auth, 1,000 malformed requests answered with 4xx, dynamic
batching, retries with backoff. Every server binds 127.0.0.1 on a free port and stops itself (context manager,
plus a lifetime safety net)."""

from __future__ import annotations

import base64
import io
import json
import pickle
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

import flowalign.rewards as R
from flowalign.rewards import get_reward, tiny
from flowalign.rewards.remote import RemoteRewardError, encode_images
from flowalign.rewards.server import RewardServer, is_loopback, main, start_server

@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two OpenMP threads per
    process oversubscribe the cores and make these tests many times slower; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TOKEN = "test-token-123"
MAX_PAYLOAD = 256 * 1024


@pytest.fixture(scope="module")
def clip_reward(tmp_path_factory):
    return R.CLIPScore.from_pretrained(tiny.save_tiny_open_clip(tmp_path_factory.mktemp("oc")))


@pytest.fixture(scope="module")
def server(clip_reward):
    with start_server(clip_reward, token=TOKEN, max_payload_bytes=MAX_PAYLOAD, max_image_pixels=64 * 64 * 8,
                      timeout=60, max_batch=32, batch_window_ms=20, lifetime=600) as srv:
        yield srv


def rand_images(n: int, h: int = 20, w: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


PROMPTS = ["a red circle", "two blue squares", "a cat", "a dog", "", "a photo", "a red circle"]


def test_remote_equals_local(server, clip_reward):
    x = rand_images(7)
    local = clip_reward(x, PROMPTS)
    remote = R.RemoteReward(server.url, token=TOKEN)
    torch.testing.assert_close(remote(x, PROMPTS), local, atol=0, rtol=0)  # npy float32 is exact
    assert remote.info["reward"] == "clip_score"
    via_registry = get_reward(f"remote:{server.url}", token=TOKEN, encoding="png", batch_size=3)
    xq = (x * 255).round() / 255  # PNG carries 8 bits: equal on quantised images
    torch.testing.assert_close(via_registry(xq, PROMPTS), clip_reward(xq, PROMPTS), atol=1e-6, rtol=0)


def test_auth(server):
    x = encode_images(rand_images(1))
    body = {"images": x, "prompts": ["a"]}
    with httpx.Client() as c:
        assert c.get(server.url + "/health").json()["status"] == "ok"  # health needs no token
        r = c.post(server.url + "/score", json=body)
        assert r.status_code == 401 and "token" in r.json()["detail"]
        r = c.post(server.url + "/score", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        assert c.get(server.url + "/stats").status_code == 401
        r = c.post(server.url + "/score", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and len(r.json()["scores"]) == 1
    with pytest.raises(RemoteRewardError, match="401"):
        R.RemoteReward(server.url, token="wrong", modality="image")(rand_images(1), ["a"])


def test_token_required_beyond_loopback(clip_reward, monkeypatch):
    monkeypatch.delenv("FLOWALIGN_REWARD_TOKEN", raising=False)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    with pytest.raises(ValueError, match="without a token"):  # refused before binding anything
        start_server(clip_reward, host="0.0.0.0")
    with pytest.raises(ValueError, match="without a token"):
        start_server(clip_reward, host="0.0.0.0", token="")  # an empty token is no token
    with pytest.raises(SystemExit):  # the CLI refuses too, before binding
        main(["--reward", "brightness", "--host", "0.0.0.0"])
    with pytest.raises(SystemExit):
        main(["--reward", "brightness", "--host", "0.0.0.0", "--token", ""])


def _npy(arr: np.ndarray) -> dict:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return {"format": "npy", "data": base64.b64encode(buf.getvalue()).decode()}


def _malformed_requests() -> list[tuple[str, dict]]:
    """(name, httpx request kwargs) — each must be answered with a 4xx and a message."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    jh = {**auth, "Content-Type": "application/json"}
    good = rand_images(1).numpy()
    nan = good.copy()
    nan[0, 0, 0, 0] = np.nan
    inf = good.copy()
    inf[0, 1, 2, 3] = np.inf
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)  # a pickle inside an .npy
    pickled = pickle.dumps({"images": [b"\xff\xd8"], "meta_datas": [{}]})  # Flow-GRPO's old wire format

    def js(body) -> dict:
        return {"content": json.dumps(body).encode(), "headers": jh}

    return [
        ("bad json", {"content": b'{"images": [1, 2', "headers": jh}),
        ("not utf8", {"content": b"\xff\xfe\x00garbage", "headers": jh}),
        ("json array", js([1, 2, 3])),
        ("json string", js("hello")),
        ("pickle as octet-stream", {"content": pickled, "headers": {**auth, "Content-Type": "application/octet-stream"}}),
        ("pickle as json", {"content": pickled, "headers": jh}),
        ("no content type", {"content": b"{}", "headers": auth}),
        ("missing token", {"content": json.dumps({"images": _npy(good)}).encode(),
                           "headers": {"Content-Type": "application/json"}}),
        ("wrong token", {"content": json.dumps({"images": _npy(good)}).encode(),
                         "headers": {"Authorization": "Bearer nope", "Content-Type": "application/json"}}),
        ("huge payload", {"content": b"{" + b" " * (MAX_PAYLOAD + 10) + b"}", "headers": jh}),
        ("missing images", js({"prompts": ["a"]})),
        ("unknown field", js({"images": _npy(good), "evil": 1})),
        ("images not object", js({"images": [[0.1, 0.2]]})),
        ("bad format", js({"images": {"format": "pickle", "data": "AAAA"}})),
        ("bad base64", js({"images": {"format": "npy", "data": "!!!not base64!!!"}})),
        ("npy not npy", js({"images": {"format": "npy", "data": base64.b64encode(b"hello world").decode()}})),
        ("npy object array", js({"images": {"format": "npy", "data": base64.b64encode(obj.getvalue()).decode()}})),
        ("wrong ndim", js({"images": _npy(good[0])})),
        ("wrong channels", js({"images": _npy(np.zeros((1, 2, 8, 8), np.float32))})),
        ("empty batch", js({"images": _npy(np.zeros((0, 3, 8, 8), np.float32))})),
        ("nan", js({"images": _npy(nan)})),
        ("inf", js({"images": _npy(inf)})),
        ("out of range", js({"images": _npy(good * 3)})),
        ("bool dtype", js({"images": _npy(good > 0.5)})),
        ("too many pixels", js({"images": _npy(np.zeros((1, 3, 200, 200), np.uint8))})),
        ("prompt count", js({"images": _npy(good), "prompts": ["a", "b"]})),
        ("prompts not strings", js({"images": _npy(good), "prompts": [1]})),
        ("metadata not objects", js({"images": _npy(good), "metadata": ["x"]})),
        ("video to image reward", js({"images": _npy(np.zeros((1, 2, 3, 8, 8), np.float32))})),
        ("png not png", js({"images": {"format": "png", "data": [base64.b64encode(b"\x89PNG\r\n").decode()]}})),
        ("png empty list", js({"images": {"format": "png", "data": []}})),
        ("completions to image reward", js({"completions": ["x"]})),
        ("deep json", {"content": b"[" * 100000 + b"]" * 100000, "headers": jh}),
    ]


@pytest.mark.slow
def test_thousand_malformed_requests_then_still_correct(server, clip_reward):
    cases = _malformed_requests()
    plan = [cases[i % len(cases)] for i in range(1000)]
    counts: dict[str, int] = {}
    lock = threading.Lock()

    def send(client: httpx.Client, case) -> tuple[str, int, str]:
        name, kw = case
        r = client.post(server.url + "/score", **kw)
        try:
            detail = r.json().get("detail", "")
        except ValueError:
            detail = r.text
        return name, r.status_code, detail

    with httpx.Client(timeout=30) as client, ThreadPoolExecutor(8) as pool:
        for name, status, detail in pool.map(lambda c: send(client, c), plan):
            assert 400 <= status < 500, (name, status, detail)
            assert isinstance(detail, str) and len(detail) > 5, (name, detail)
            with lock:
                counts[name] = counts.get(name, 0) + 1
    assert sum(counts.values()) == 1000 and len(counts) == len(cases)
    # the server is still up and still right
    x = rand_images(5, seed=9)
    remote = R.RemoteReward(server.url, token=TOKEN)
    torch.testing.assert_close(remote(x, PROMPTS[:5]), clip_reward(x, PROMPTS[:5]), atol=0, rtol=0)


def test_specific_status_codes(server):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    cases = dict(_malformed_requests())
    with httpx.Client() as c:
        def status(name):
            return c.post(server.url + "/score", **cases[name]).status_code
        assert status("missing token") == 401
        assert status("huge payload") == 413
        assert status("too many pixels") == 413
        assert status("pickle as octet-stream") == 415
        assert status("bad json") == 400
        assert status("pickle as json") == 400
        assert status("npy object array") == 400
        assert status("nan") == 422
        assert status("wrong channels") == 422
        assert c.get(server.url + "/score", headers=auth).status_code == 405


def test_dynamic_batching_merges_concurrent_requests(server, clip_reward):
    before = server.stats
    x = rand_images(16, seed=3)
    prompts = [PROMPTS[i % 7] for i in range(16)]
    expected = clip_reward(x, prompts)
    remote = R.RemoteReward(server.url, token=TOKEN)
    barrier = threading.Barrier(8)

    def client(i: int) -> torch.Tensor:
        barrier.wait()
        return remote(x[2 * i : 2 * i + 2], prompts[2 * i : 2 * i + 2])

    with ThreadPoolExecutor(8) as pool:
        out = torch.cat(list(pool.map(client, range(8))))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    after = server.stats
    requests, batches = after["requests"] - before["requests"], after["batches"] - before["batches"]
    assert requests == 8 and batches < requests, after  # some requests shared a reward call
    assert after["max_batch_seen"] > 2


def test_batching_off_and_text_and_video(tmp_path):
    with start_server("math_verify", max_batch=0, lifetime=120) as srv:
        r = get_reward(f"remote:{srv.url}")
        s = r(completions=["\\boxed{1/2}", "\\boxed{3}"], answers=["0.5", "0.5"])
        assert s.tolist() == [1.0, 0.0] and r.modality == "text"
        assert srv.stats["batches"] == srv.stats["requests"] == 1
    pf = R.PerFrame("brightness")
    with start_server(pf, lifetime=120) as srv:
        v = torch.rand(2, 3, 3, 8, 8)
        for enc in ("npy", "png"):
            vq = (v * 255).round() / 255
            remote = R.RemoteReward(srv.url, encoding=enc)
            torch.testing.assert_close(remote(vq, ["a", "b"]), pf(vq, ["a", "b"]), atol=1e-6, rtol=0)


def test_timeout_is_504_and_server_survives():
    def slow(images, prompts, metadata):
        time.sleep(0.5)
        return images.mean(dim=(1, 2, 3))

    with start_server(R.FunctionReward(slow, name="slow"), timeout=0.1, lifetime=60) as srv:
        r = R.RemoteReward(srv.url, modality="image", retries=0)
        with pytest.raises(RemoteRewardError, match="504"):
            r(torch.rand(1, 3, 4, 4), ["a"])
        assert httpx.get(srv.url + "/health").status_code == 200


def test_client_retries_with_backoff_then_clear_error():
    calls = []

    def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(time.monotonic())
        if len(calls) < 3:
            return httpx.Response(503, json={"detail": "busy"})
        return httpx.Response(200, json={"scores": [0.25], "reward": "x"})

    r = R.RemoteReward("http://flaky.invalid", modality="image", retries=4, backoff=0.05,
                       transport=httpx.MockTransport(flaky))
    assert r(torch.rand(1, 3, 4, 4), ["a"]).tolist() == [0.25]
    assert len(calls) == 3
    gaps = np.diff(calls)
    assert gaps[0] >= 0.04 and gaps[1] >= 0.08  # 0.05, then 0.1 (±10 % jitter)

    calls.clear()
    bad = R.RemoteReward("http://x.invalid", modality="image", retries=5, backoff=0.01,
                         transport=httpx.MockTransport(lambda req: (calls.append(1),
                                                                    httpx.Response(422, json={"detail": "nope"}))[1]))
    with pytest.raises(RemoteRewardError, match="refused the request: HTTP 422: nope"):
        bad(torch.rand(1, 3, 4, 4), ["a"])
    assert len(calls) == 1  # client errors are not retried

    with start_server("brightness", lifetime=30) as srv:  # a real port, then closed: connection refused
        dead_url = srv.url
    dead = R.RemoteReward(dead_url, modality="image", retries=2, backoff=0.01)
    with pytest.raises(RemoteRewardError, match="failed after 3 attempts.*last error: Connect"):
        dead(torch.rand(1, 3, 4, 4), ["a"])


def test_server_handle_stops_itself():
    start = time.monotonic()
    srv = RewardServer("brightness", lifetime=8)
    assert httpx.get(srv.url + "/health", timeout=30).json()["reward"] == "brightness"
    srv.thread.join(timeout=60)
    assert not srv.thread.is_alive() and time.monotonic() - start >= 8
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/health", timeout=5)
