"""Fault injection (issue 22): hostile inputs against the servers and the reward API, each answered with a clear
refusal and none able to corrupt state or exhaust memory.

Organised in sections, one per item of the issue; each section is self-contained (its own helpers and fixtures)
so other items can add theirs. Everything is bounded in time and memory and talks to loopback only.

* Item 4 -- reward server: a hostile corpus interleaved with valid requests against a server in a subprocess
  (peak RSS from ``/proc/<pid>/status`` ``VmHWM``), request smuggling, slowloris, 16-bit/RGBA conversions.
* Item 5 -- label server: forged requests (CSRF, foreign Origin/Host, missing or wrong session token).
* Item 6 -- reward API: shape/dtype/range at ``Reward.__call__``, non-finite scores and weights, JPEG options.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

import flowalign.rewards as R

REPO = Path(__file__).resolve().parents[1]


# =====================================================================================================================
# Item 4: reward server
# =====================================================================================================================
def png_bytes(w: int, h: int, depth: int = 8, ctype: int = 2, raw: bytes | None = None,
              idat: bytes | None = None) -> bytes:
    """A PNG written by hand (PNG spec 5.3/11.2): any IHDR, filter 0 rows of ``raw`` (zeros by default); ``idat``
    replaces the compressed data (a "huge header, tiny body" image)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    if idat is None:
        row = w * {0: 1, 2: 3, 4: 2, 6: 4}[ctype] * depth // 8
        raw = raw if raw is not None else bytes(row * h)
        idat = zlib.compress(b"".join(b"\x00" + raw[i * row:(i + 1) * row] for i in range(h)), 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def npy_header_only(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    """A .npy header announcing ``shape`` with no data behind it."""
    from numpy.lib import format as npf

    buf = io.BytesIO()
    npf.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def npy_field(arr: np.ndarray) -> dict:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return {"format": "npy", "data": b64(buf.getvalue())}


SERVER_SCRIPT = textwrap.dedent("""
    import importlib.util, inspect, json, os, sys
    import torch
    torch.set_num_threads(1)
    path = os.environ.get("FAULTS_SERVER_MODULE")
    if path:  # an older server.py (the "before" measurement of the report)
        spec = importlib.util.spec_from_file_location("server_under_test", path)
        mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    else:
        import flowalign.rewards.server as mod
    opts = json.loads(sys.argv[1])
    known = set(inspect.signature(mod.RewardServer).parameters) | set(inspect.signature(mod.create_app).parameters)
    srv = mod.RewardServer("brightness", **{k: v for k, v in opts.items() if k in known})
    print(srv.url, flush=True)
    sys.stdin.read()  # until the test closes our stdin
    srv.stop()
""")

# The limits of the corpus server: small, so the test is cheap, but the hostile requests exceed them many times.
CORPUS_LIMITS = {"max_image_pixels": 1 << 20, "max_payload_bytes": 2 << 20, "header_timeout": 1.5,
                 "body_timeout": 3.0, "timeout": 30.0, "lifetime": 300, "max_batch": 8}
RSS_BOUND_MB = 150  # peak RSS over the warmed-up idle server; decoding one many-PNG request would take >= 560 MB


def _rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def _reset_peak_rss(pid: int) -> int:
    """Reset ``VmHWM`` to the current RSS (``clear_refs`` 5, Linux >= 4.0) and return the baseline in kB: the later
    ``VmHWM`` is then the peak of the corpus alone, not of the server's start-up. Without permission the baseline
    is the start-up peak (a weaker check, never a false alarm)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return _rss_kb(pid, "VmRSS")
    except OSError:
        return _rss_kb(pid, "VmHWM")


@pytest.fixture(scope="module")
def corpus_server(tmp_path_factory):
    """``brightness`` served by a subprocess (its own RSS), bound to 127.0.0.1 on a free port."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc for the RSS measurement")
    log = (tmp_path_factory.mktemp("srv") / "server.log").open("w")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT, json.dumps(CORPUS_LIMITS)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=log, env=env, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), f"server did not start: {url!r}"
        yield proc, url
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _raw_http(url: str, data: bytes, read_s: float = 5.0) -> bytes:
    """Send raw bytes on one connection and read until the server closes it (or ``read_s`` passes)."""
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=read_s) as s:
        s.sendall(data)
        out, deadline = b"", time.monotonic() + read_s
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                return out + b"<closed>"
            out += chunk
        return out


def _hostile_corpus() -> list[tuple[str, dict, int]]:
    """(name, httpx kwargs, expected status): each must be refused with that status and a message."""
    jh = {"Content-Type": "application/json"}
    black_mp = png_bytes(1024, 1024)  # 1 Mi pixels, ~3 KB: at the per-request budget alone
    many = [b64(black_mp)] * 40  # 40 Mi pixels in ~170 KB: the memory bomb of the issue (per-image limit only)
    good = np.random.default_rng(0).random((2, 3, 16, 16), dtype=np.float32)
    nan = good.copy()
    nan[1, 2, 3, 4] = np.nan
    trunc_png = png_bytes(64, 64, raw=np.random.default_rng(1).integers(0, 255, 64 * 64 * 3, np.uint8).tobytes())
    buf = io.BytesIO()
    np.save(buf, good)
    trunc_npy = buf.getvalue()[:-100]

    def js(body) -> dict:
        return {"content": json.dumps(body).encode(), "headers": jh}

    return [
        ("many PNGs under the per-image limit", js({"images": {"format": "png", "data": many}}), 413),
        ("huge-dimension tiny PNG", js({"images": {"format": "png", "data": [b64(png_bytes(
            100_000, 100_000, idat=zlib.compress(b"\x00" * 1000)))]}}), 413),
        ("huge npy header, no data", js({"images": {"format": "npy", "data": b64(npy_header_only(
            (64, 3, 4096, 4096)))}}), 413),
        ("truncated PNG", js({"images": {"format": "png", "data": [b64(trunc_png[:len(trunc_png) // 2])]}}), 400),
        ("truncated npy", js({"images": {"format": "npy", "data": b64(trunc_npy)}}), 400),
        ("bad base64", js({"images": {"format": "png", "data": ["@@@not*base64"]}}), 400),
        ("int32 npy", js({"images": npy_field(np.zeros((1, 3, 8, 8), np.int32))}), 422),
        ("complex npy", js({"images": npy_field(np.zeros((1, 3, 8, 8), np.complex64))}), 422),
        ("bool npy", js({"images": npy_field(np.zeros((1, 3, 8, 8), bool))}), 422),
        ("B,H,W,C npy", js({"images": npy_field(np.zeros((1, 8, 8, 3), np.float32))}), 422),
        ("NaN npy", js({"images": npy_field(nan)}), 422),
        ("16-bit RGB PNG", js({"images": {"format": "png", "data": [b64(png_bytes(4, 4, depth=16))]}}), 422),
        ("truncated body", {"content": b'{"images": {"format": "npy", "da', "headers": jh}, 400),
    ]


def _smuggle(url: str) -> bytes:
    """POST with both Transfer-Encoding and Content-Length; a GET /health hides behind the chunked end."""
    behind = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    body = b"0\r\n\r\n" + behind
    req = (b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(body)) + body
    return _raw_http(url, req)


def _slowloris(url: str, n: int, wait_s: float) -> list[bool]:
    """Open ``n`` sockets that stop mid-header; after ``wait_s``, which of them has the server closed?"""
    host, port = url.split("//")[1].split(":")
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)), timeout=5)
        s.sendall(b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
        socks.append(s)
    time.sleep(wait_s)
    closed = []
    for s in socks:
        s.settimeout(0.5)
        try:
            closed.append(s.recv(1024) == b"")
        except socket.timeout:
            closed.append(False)
        except ConnectionResetError:
            closed.append(True)
        s.close()
    return closed


def test_hostile_corpus_bounded_rss_and_exact_answers(corpus_server):
    """Valid requests interleaved with the hostile corpus: every valid one is answered exactly (remote == local),
    every hostile one refused with its 4xx and a message, and the server's peak RSS grows by < RSS_BOUND_MB."""
    proc, url = corpus_server
    local = R.Brightness()
    rng = np.random.default_rng(42)
    valid = [rng.random((1 + i % 4, 3, 8 + i % 5, 12), dtype=np.float32) for i in range(24)]
    with httpx.Client(timeout=60) as c:  # warm up (imports, first batch), then take the baseline
        assert c.post(url + "/score", json={"images": npy_field(valid[0])}).status_code == 200
        base_kb = _reset_peak_rss(proc.pid)
        corpus = _hostile_corpus()
        plan = [("valid", i) for i in range(len(valid))] + [("hostile", i) for i in range(3 * len(corpus))]
        plan = [plan[i] for i in np.random.default_rng(7).permutation(len(plan))]

        def send(item):
            kind, i = item
            if kind == "valid":
                r = c.post(url + "/score", json={"images": npy_field(valid[i])})
                return kind, i, r.status_code, r.json()
            name, kw, _ = corpus[i % len(corpus)]
            r = c.post(url + "/score", **kw)
            return kind, i, r.status_code, r.json()

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(send, plan))
        smuggled = _smuggle(url)
    peak_mb = (_rss_kb(proc.pid, "VmHWM") - base_kb) / 1024
    print(f"reward server: idle RSS {base_kb / 1024:.0f} MB, peak growth under the corpus {peak_mb:.0f} MB")
    for kind, i, status, body in results:
        if kind == "valid":
            assert status == 200, body
            assert body["scores"] == local(torch.from_numpy(valid[i])).tolist()  # exact: npy float32
        else:
            name, _, want = corpus[i % len(corpus)]
            assert status == want and len(body["detail"]) > 10, (name, status, body)
    assert smuggled.count(b"HTTP/1.1 ") == 1 and smuggled.startswith(b"HTTP/1.1 400"), smuggled[:300]
    assert smuggled.endswith(b"<closed>") and b'"status":"ok"' not in smuggled  # the hidden GET never ran
    assert peak_mb < RSS_BOUND_MB, f"peak RSS grew by {peak_mb:.0f} MB over the idle {base_kb / 1024:.0f} MB"


def test_slowloris_sockets_are_closed_within_the_header_timeout(corpus_server):
    proc, url = corpus_server
    start = time.monotonic()
    closed = _slowloris(url, 6, CORPUS_LIMITS["header_timeout"] + 1.5)
    assert all(closed) and time.monotonic() - start < 10, closed
    with httpx.Client(timeout=10) as c:  # and the server still answers
        assert c.get(url + "/health").json()["status"] == "ok"


def test_stalled_body_gets_408_and_the_connection_closed(corpus_server):
    """Headers complete, body stops after 10 of 1000 bytes: 408 within ``body_timeout``, then the socket closes."""
    proc, url = corpus_server
    start = time.monotonic()
    out = _raw_http(url, b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"images\":", read_s=CORPUS_LIMITS["body_timeout"] + 5)
    took = time.monotonic() - start
    assert out.startswith(b"HTTP/1.1 408") and b"not received within 3.0 s" in out, out[:200]
    assert out.endswith(b"<closed>") and CORPUS_LIMITS["body_timeout"] - 0.5 < took < CORPUS_LIMITS["body_timeout"] + 4


def test_pixel_budget_holds_requests_until_decoded_pixels_are_released():
    """``max_inflight_pixels``: a request waits while the decoded pixels in flight plus its own exceed the total."""
    import asyncio

    from flowalign.rewards._guards import PixelBudget

    async def scenario() -> list[str]:
        budget, log = PixelBudget(100), []

        async def request(name: str, n: int, hold: float) -> None:
            await budget.acquire(n)
            log.append(f"+{name} {budget.used}")
            await asyncio.sleep(hold)
            budget.release(n)
            log.append(f"-{name} {budget.used}")

        await asyncio.gather(request("a", 60, 0.05), request("b", 60, 0.0), request("c", 30, 0.0))
        return log

    log = asyncio.run(scenario())
    assert log[:3] == ["+a 60", "+c 90", "-c 60"] and log[3:] == ["-a 0", "+b 60", "-b 0"], log
    assert max(int(e.split()[1]) for e in log) <= 100


def test_png_conversions_are_explicit_16bit_exact_alpha_on_white():
    """16-bit grey PNG -> v / 65535 exactly; RGBA / grey+alpha composited on white; 16-bit colour refused."""
    from flowalign.rewards._decode import RequestError, decode_images

    g16 = np.array([[0, 1, 30000, 65535]], dtype=">u2")
    out = decode_images({"format": "png", "data": [b64(png_bytes(4, 1, 16, 0, g16.tobytes()))]}, 100)
    assert out.shape == (1, 1, 1, 4) and out.dtype == np.float32
    assert out.ravel().tolist() == (g16.astype(np.float32) / np.float32(65535)).ravel().tolist()
    assert out.ravel()[1] > 0 and out.ravel()[2] != np.float32(117 / 255)  # not reduced to 8 bits
    rgba = np.array([[[200, 100, 0, 255], [200, 100, 0, 0], [0, 0, 0, 128]]], dtype=np.uint8)
    out = decode_images({"format": "png", "data": [b64(png_bytes(3, 1, 8, 6, rgba.tobytes()))]}, 100)[0]
    want = (np.float32(200) / np.float32(255), np.float32(100) / np.float32(255), np.float32(0))
    assert out.shape == (3, 1, 3) and tuple(out[:, 0, 0].tolist()) == want  # opaque: exactly c / 255
    assert out[:, 0, 1].tolist() == [1.0, 1.0, 1.0]  # fully transparent: white
    assert out[:, 0, 2].tolist() == [np.float32(255 * 127 / 65025)] * 3  # half black over white
    la = np.array([[[0, 0], [50, 255]]], dtype=np.uint8)
    out = decode_images({"format": "png", "data": [b64(png_bytes(2, 1, 8, 4, la.tobytes()))]}, 100)[0]
    assert out.shape == (1, 1, 2) and out.ravel().tolist() == [1.0, np.float32(50) / np.float32(255)]
    u16 = np.array([[[[0, 65535], [1, 2]]]], dtype=np.uint16).repeat(3, 1)
    assert decode_images(npy_field(u16), 100).ravel().tolist() == \
        (u16.astype(np.float32) / np.float32(65535)).ravel().tolist()
    for depth, ctype in ((16, 2), (16, 6), (16, 4)):
        with pytest.raises(RequestError, match="16-bit") as e:
            decode_images({"format": "png", "data": [b64(png_bytes(2, 2, depth, ctype))]}, 100)
        assert e.value.status == 422


def test_encode_failures_are_4xx_with_a_reason():
    """A 1x70000 image (over JPEG's 65,500 px side) and a 4-channel batch: 422 naming the limit, never a 500."""
    from flowalign.rewards.server import start_server

    with start_server("jpeg_compressibility", lifetime=60, max_image_pixels=1 << 20) as srv, httpx.Client() as c:
        r = c.post(srv.url + "/score", json={"images": npy_field(np.zeros((1, 3, 1, 70000), np.float32))})
        assert r.status_code == 422 and "65500" in r.json()["detail"], r.json()
        r = c.post(srv.url + "/score", json={"images": npy_field(np.zeros((1, 3, 8, 8), np.float32))})
        assert r.status_code == 200 and r.json()["scores"][0] < 0


# =====================================================================================================================
# Item 5: label server (CSRF, DNS rebinding, session token)
# =====================================================================================================================
@pytest.fixture
def label_server(tmp_path):
    from PIL import Image

    from flowalign import pairs as pf
    from flowalign.labeling import LabelServer

    rows = []
    for i in range(3):
        for side in "ab":
            colour = (40 * i, 0, 0) if side == "a" else (0, 0, 40 * i)
            Image.new("RGB", (8, 8), colour).save(tmp_path / f"{i}{side}.png")
        rows.append({"id": f"p{i}", "prompt": f"prompt {i}", "a": f"{i}a.png", "b": f"{i}b.png"})
    pf.append_queue(tmp_path, rows)
    with LabelServer(tmp_path, annotator="me") as server:
        yield server, tmp_path


def _forged_requests(url: str, session: str) -> list[tuple[str, str, str, dict]]:
    """(name, method, path, httpx kwargs): what a foreign page can make a browser send (plus a rebinding page)."""
    port = url.split(":")[2].split("/")[0]
    own = url.rstrip("/")
    body = json.dumps({"id": "p0", "choice": "a"}).encode()
    ok = {"Content-Type": "application/json", "X-Label-Session": session}
    return [
        ("text/plain CSRF (a no-preflight fetch)", "POST", "api/label",
         {"content": body, "headers": {**ok, "Content-Type": "text/plain"}}),
        ("form-encoded CSRF", "POST", "api/label",
         {"content": b"id=p0&choice=a", "headers": {**ok, "Content-Type": "application/x-www-form-urlencoded"}}),
        ("foreign Origin", "POST", "api/label", {"content": body, "headers": {**ok, "Origin": "http://evil.example"}}),
        ("foreign Origin, same host other port", "POST", "api/label",
         {"content": body, "headers": {**ok, "Origin": "http://127.0.0.1:1"}}),
        ("foreign Host (DNS rebinding)", "POST", "api/label",
         {"content": body, "headers": {**ok, "Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}}),
        ("foreign Host reads the page", "GET", "", {"headers": {"Host": f"evil.example:{port}"}}),
        ("foreign Host reads the state", "GET", "api/state", {"headers": {"Host": f"rebind.example:{port}"}}),
        ("missing session token", "POST", "api/label",
         {"content": body, "headers": {"Content-Type": "application/json", "Origin": own}}),
        ("wrong session token", "POST", "api/label", {"content": body, "headers": {**ok, "X-Label-Session": "guess"}}),
        ("undo, text/plain", "POST", "api/undo", {"content": b"{}", "headers": {**ok, "Content-Type": "text/plain"}}),
        ("undo, no token", "POST", "api/undo", {"content": b"{}", "headers": {"Content-Type": "application/json"}}),
    ]


def test_forged_label_requests_are_refused_and_change_nothing(label_server):
    from flowalign import pairs as pf

    server, folder = label_server
    with httpx.Client(timeout=10) as c:
        page = c.get(server.url)
        assert page.status_code == 200 and f'content="{server.session_token}"' in page.text  # the page embeds it
        session = {"X-Label-Session": server.session_token}
        assert c.post(server.url + "api/label", json={"id": "p1", "choice": "b"}, headers=session).status_code == 200
        before = (folder / pf.LABELS_FILE).read_bytes()
        for name, method, path, kw in _forged_requests(server.url, server.session_token):
            r = c.request(method, server.url + path, **kw)
            assert r.status_code in (403, 415), (name, r.status_code, r.text)
            assert len(r.json()["detail"]) > 10, name
            assert server.session_token not in r.text, name  # a rebinding page never learns the token
        assert (folder / pf.LABELS_FILE).read_bytes() == before  # no label forged, none undone
        # the real page's flow still works: same origin, JSON, the embedded token
        own = {"Origin": server.url.rstrip("/"), **session}
        s = c.post(server.url + "api/label", json={"id": "p0", "choice": "a"}, headers=own).json()
        assert s["progress"]["done"] == 2
        assert c.post(server.url + "api/undo", json={}, headers=own).json()["undone"] == "p0"
    assert {k: v.choice for k, v in pf.read_labels(folder / pf.LABELS_FILE).items()} == {"p1": "b"}


# =====================================================================================================================
# Item 6: reward API boundary
# =====================================================================================================================
def _plugin(values):
    return R.FunctionReward(lambda images, prompts, metadata: torch.tensor(values[: len(images)]), name="my_plugin")


API_CASES = [  # (name, call, exception type, message must contain)
    ("B,H,W,C to brightness", lambda: R.Brightness()(torch.rand(2, 8, 8, 3), ["a", "b"]), ValueError,
     "channels-last B,H,W,C"),
    ("B,T,H,W,C to per_frame", lambda: R.PerFrame("brightness")(torch.rand(1, 2, 8, 8, 3), ["a"]), ValueError,
     "channels-last B,T,H,W,C"),
    ("4 channels to jpeg", lambda: R.JpegCompressibility()(torch.rand(1, 4, 8, 8), ["a"]), ValueError,
     "1 or 3 channels"),
    ("2 channels to jpeg", lambda: R.JpegCompressibility()(torch.rand(1, 2, 8, 8), ["a"]), ValueError,
     "1 or 3 channels"),
    ("1x70000 to jpeg", lambda: R.JpegCompressibility()(torch.zeros(1, 3, 1, 70000), ["a"]), ValueError, "65500"),
    ("empty height", lambda: R.JpegCompressibility()(torch.zeros(1, 3, 0, 8), ["a"]), ValueError, "non-empty"),
    ("NaN pixels", lambda: R.Brightness()(torch.full((1, 3, 4, 4), float("nan")), ["a"]), ValueError, "NaN"),
    ("uint8 images", lambda: R.Brightness()(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), ["a"]), ValueError,
     "divide uint8"),
    ("plug-in returns NaN", lambda: _plugin([0.5, float("nan")])(torch.rand(2, 3, 4, 4), ["a", "b"]),
     R.NonFiniteRewardError, "'my_plugin' returned non-finite scores for samples [1]"),
    ("plug-in returns inf", lambda: _plugin([float("inf")])(torch.rand(1, 3, 4, 4), ["a"]),
     R.NonFiniteRewardError, "'my_plugin'"),
    ("Compose NaN weight", lambda: R.Compose({"brightness": float("nan")}), ValueError, "'brightness' is nan"),
    ("Compose inf weight", lambda: R.Compose({"redness": {"weight": float("inf")}}), ValueError, "'redness' is inf"),
    ("JPEG quality 500", lambda: R.JpegCompressibility(quality=500), ValueError, "[1, 100]"),
    ("JPEG quality 0", lambda: R.JpegIncompressibility(quality=0), ValueError, "[1, 100]"),
    ("JPEG divisor 0", lambda: R.JpegCompressibility(divisor=0), ValueError, "divisor"),
    ("colour out of range", lambda: R.ColorTarget(color=(2.0, 0.0, 0.0)), ValueError, "[0, 1]"),
    ("prompts as one string", lambda: R.Brightness()(torch.rand(5, 3, 4, 4), "a cat"), ValueError, "one string"),
    ("text reward without completions", lambda: R.MathVerify()(), ValueError, "completions=[str, ...]"),
    ("text reward given images", lambda: R.MathVerify()(torch.rand(1, 3, 4, 4)), ValueError, "text reward"),
    ("fewer answers than completions", lambda: R.MathVerify()(completions=["1", "2"], answers=["1"]), ValueError,
     "2 completions but 1 answers"),
]


@pytest.mark.parametrize("name,call,exc,msg", API_CASES, ids=[c[0] for c in API_CASES])
def test_reward_api_refuses_bad_inputs_with_named_errors(name, call, exc, msg):
    """Every case is refused at the API boundary with a flowalign message, never an error from inside PIL/numpy."""
    with pytest.raises(exc) as e:
        call()
    assert msg in str(e.value), str(e.value)
    assert type(e.value).__module__.split(".")[0] in ("builtins", "flowalign"), type(e.value)


def test_non_finite_plugin_behind_the_server_is_a_500_naming_it():
    from flowalign.rewards.server import start_server

    with start_server(_plugin([0.25, float("nan")]), lifetime=60) as srv, httpx.Client() as c:
        r = c.post(srv.url + "/score", json={"images": npy_field(np.zeros((2, 3, 4, 4), np.float32))})
        assert r.status_code == 500 and "'my_plugin' returned non-finite scores for samples [1]" in r.json()["detail"]
        r = c.post(srv.url + "/score", json={"images": npy_field(np.zeros((1, 3, 4, 4), np.float32))})
        assert r.json()["scores"] == [0.25]  # and it keeps serving


def test_reward_api_valid_inputs_still_score():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    lum = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).mean(dim=(-2, -1))
    torch.testing.assert_close(R.Brightness()(x, ["a", "b"]), lum, rtol=0, atol=0)
    assert R.Brightness()(x[:, :1], ["a", "b"]).tolist() == x[:, 0].mean(dim=(-2, -1)).tolist()  # grey
    assert R.Brightness()(torch.zeros(0, 3, 4, 4), []).shape == (0,)  # an empty batch is fine
    c = R.Compose({"brightness": 2.0, "redness": -1.0})
    assert torch.isfinite(c(x, ["a", "b"])).all()
    assert R.JpegCompressibility(quality=100)(x, ["a", "b"]).shape == (2,)


# =====================================================================================================================
# Items 1-3: validation at load, runs never mix, checkpoints verify themselves
# =====================================================================================================================
# The trainer's side of the fault injection lives in tests/test_faults_run.py (same rules: bounded, CPU, each case
# shown able to fail); a separate file keeps both under the 600-line limit.
