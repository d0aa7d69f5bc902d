"""Reward-server throughput: 8 concurrent HTTP clients vs calling the same reward locally on the same images,
with the server's dynamic batching on and off.

The reward is a CLIP score on a random-weight open_clip ViT-S-32 (the real architecture; weights saved to a
temporary folder and loaded through ``CLIPScore.from_pretrained``, as users load downloaded weights). The server
runs in its own process (``python -m flowalign.rewards.server``, loopback, token set), as it would next to a
trainer; each client thread owns a ``RemoteReward`` and sends ``--requests`` requests of ``--images`` images
(float32 NPY, so remote scores equal local ones). Modes, all over the same images:

* ``local``: one process calls the reward on the same ``--images``-sized chunks one after another (what a trainer
  without a server does);
* ``local_batched``: the reward on all images at once (the best a single local process can do);
* ``remote_batching_on`` / ``remote_batching_off``: the server with ``max_batch=32, batch_window_ms=5`` / ``max_batch=0``.

Each mode is timed ``--repeats`` times in interleaved (ABBA) order; the table shows median images/s and the
ratio to ``local``. Local reward and server use the same number of torch threads (``--threads``, default 1: on a
shared 2-core machine two OpenMP threads per process oversubscribe the cores and slow everything several-fold).
Results go to ``benchmarks/results/reward_server.json``.

    .venv/bin/python benchmarks/reward_server.py              # ViT-S-32, 8 clients x 2 requests x 4 images
    .venv/bin/python benchmarks/reward_server.py --model tiny  # seconds, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, interleaved, median, paired_ratio, write_json  # noqa: E402

from flowalign.rewards import CLIPScore, RemoteReward, tiny  # noqa: E402

TOKEN = "bench-token"


def save_model(kind: str, path: Path) -> Path:
    """A random-weight open_clip model in the hub folder layout."""
    if kind == "tiny":
        return tiny.save_tiny_open_clip(path)
    import open_clip

    cfg = open_clip.get_model_config(kind)
    if cfg is None:
        raise SystemExit(f"unknown open_clip model {kind!r}")
    return tiny.save_tiny_open_clip(path, cfg=cfg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, max_batch: int, window_ms: float, lifetime: float,
                 threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "flowalign.rewards.server", "--reward", "clip_score",
           "--arg", f"model={json.dumps(str(model_dir))}", "--device", "cpu", "--host", "127.0.0.1",
           "--port", str(port), "--token", TOKEN, "--max-batch", str(max_batch), "--batch-window-ms",
           str(window_ms), "--log-level", "warning", "--lifetime", str(lifetime), "--max-payload-mb", "256"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    url = f"http://127.0.0.1:{port}"
    client = RemoteReward(url, token=TOKEN, retries=0)
    deadline = time.monotonic() + 120
    while True:
        try:
            client.health()
            return proc, url
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"server did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="ViT-S-32", help="open_clip architecture (random weights) or 'tiny'")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=2, help="requests per client per round")
    p.add_argument("--images", type=int, default=4, help="images per request")
    p.add_argument("--size", type=int, default=224, help="image side in pixels (resized to the model's input)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the local reward and of the server (1 avoids OpenMP oversubscription "
                        "on a shared 2-core machine; both sides get the same number)")
    p.add_argument("--out", default="reward_server")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    tmp = Path(tempfile.mkdtemp(prefix="reward_bench_"))
    model_dir = save_model(args.model, tmp / "model")
    reward = CLIPScore.from_pretrained(model_dir)
    n_total = args.clients * args.requests * args.images
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n_total, 3, args.size, args.size, generator=g)
    words = ["a red circle", "two blue squares", "a photo of a cat", "a dog on the left of a tree"]
    prompts = [words[i % len(words)] for i in range(n_total)]
    chunks = [(images[i : i + args.images], prompts[i : i + args.images]) for i in range(0, n_total, args.images)]
    per_client = [chunks[c * args.requests : (c + 1) * args.requests] for c in range(args.clients)]
    reference = reward(images, prompts)

    def local() -> None:
        with torch.inference_mode():
            for x, pr in chunks:
                reward(x, pr)

    def local_batched() -> None:
        with torch.inference_mode():
            reward.batch_size = None
            reward(images, prompts)
            reward.batch_size = 32

    servers = {"remote_batching_on": start_server(model_dir, 32, 5.0, lifetime=3600, threads=args.threads)}
    try:
        servers["remote_batching_off"] = start_server(model_dir, 0, 0.0, lifetime=3600, threads=args.threads)
        clients = {mode: [RemoteReward(url, token=TOKEN) for _ in range(args.clients)]
                   for mode, (_, url) in servers.items()}
        outputs: dict[str, torch.Tensor] = {}

        def remote(mode: str):
            def run() -> None:
                results: list[torch.Tensor | None] = [None] * args.clients
                barrier = threading.Barrier(args.clients)

                def worker(c: int) -> None:
                    barrier.wait()
                    results[c] = torch.cat([clients[mode][c](x, pr) for x, pr in per_client[c]])

                threads = [threading.Thread(target=worker, args=(c,)) for c in range(args.clients)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                outputs[mode] = torch.cat(results)  # type: ignore[arg-type]
            return run

        fns = {"local": local, "local_batched": local_batched,
               "remote_batching_on": remote("remote_batching_on"), "remote_batching_off": remote("remote_batching_off")}
        times = interleaved(fns, repeats=args.repeats, warmup=1)
        for mode, out in outputs.items():
            err = (out - reference).abs().max().item()
            assert err < 1e-4, f"{mode}: remote scores differ from local by {err}"
        stats = {mode: clients[mode][0]._request("GET", "/stats") for mode in servers}
    finally:
        for proc, _ in servers.values():
            stop_server(proc)

    rows = []
    for mode, t in times.items():
        wall = median(t["wall"])
        rows.append({"mode": mode, "images": n_total, "median_s": wall, "images_per_s": n_total / wall,
                     "vs_local": paired_ratio(times["local"]["wall"], t["wall"])})
    payload = {
        "benchmark": "reward_server",
        "description": "images/s of a CLIP-score reward: local calls vs 8 concurrent HTTP clients, dynamic "
                       "batching on/off; vs_local = median over rounds of local_time / mode_time (>1 is faster)",
        "config": {"model": args.model, "clients": args.clients, "requests_per_client": args.requests,
                   "images_per_request": args.images, "image_size": args.size, "repeats": args.repeats,
                   "torch_threads_local_and_server": args.threads,
                   "encoding": "npy float32", "batching_on": {"max_batch": 32, "batch_window_ms": 5.0},
                   "load_average_1m": os.getloadavg()[0]},
        "results": rows,
        "server_stats": stats,
        "raw_wall_s": {m: t["wall"] for m, t in times.items()},
    }
    path = write_json(args.out, payload)
    print(format_table(rows, ["mode", "images", "median_s", "images_per_s", "vs_local"]))
    print(f"server stats: {stats}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
