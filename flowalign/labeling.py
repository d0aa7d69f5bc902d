"""Human preference labelling: a small local web app over a labelling queue folder.

    flowalign label serve runs/d3po/labels             # http://127.0.0.1:8765, Ctrl-C to stop
    flowalign label status runs/d3po/labels            # progress
    flowalign label export runs/d3po/labels pairs.jsonl   # labelled pairs -> offline DPO dataset
    flowalign label sample recipes/shapes_dpo.yaml --out pairs/ [--auto-label shapes_geneval]   # make a queue

The folder holds ``pairs.jsonl`` (``{"id", "prompt", "a", "b"}``, media paths relative to the folder; D3PO's human
mode appends a round at a time) and the label log ``labels.jsonl`` (formats: ``flowalign.pairs``). The page shows
the next unlabelled pair -- the two candidates side by side in an order fixed per pair but random across pairs
(crc32 of the id; against left/right bias) -- with a progress count. Keys: ``ArrowLeft``/``1`` left is better,
``ArrowRight``/``2`` right is better, ``ArrowDown``/``s`` skip, ``t`` tie, ``u``/``Backspace``/``Ctrl+Z`` undo; the
buttons do the same. Every choice is one fsynced append to the log (``LabelLog``), so labels survive a crash and
the trainer can read them while people label; undo appends an undo event for the most recent label of this
annotator and shows that pair again. New pairs written to ``pairs.jsonl`` while the page is open appear when the
queue runs dry (the page polls).

Served by uvicorn (FastAPI). Bound to loopback by default; any other address needs ``--token`` (sent once as
``?token=...``, then kept in a cookie). ``LabelServer`` runs the app in a background thread (D3PO ``serve: true``,
tests).

Cross-site defences (any page the annotator visits can send requests to a local server): every request must name
an allowed ``Host`` (the bound address, plus the loopback names on a loopback bind: a DNS-rebinding page sends its
own host name); state-changing calls (``POST``) must send ``Content-Type: application/json`` (a cross-site form or
``text/plain`` fetch cannot), an ``Origin``, when present, equal to the server's own, and the per-session token
that the served page embeds (``X-Label-Session`` header; ``LabelServer.session_token`` for scripted clients).
Refusals are 403 (host, origin, session token) or 415 (content type) and change no label.
"""

from __future__ import annotations

import argparse
import hmac
import os
import secrets
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from starlette.requests import Request  # module level: FastAPI resolves the string annotations from here

from flowalign import pairs as pf

if TYPE_CHECKING:  # annotations only (sample_queue loads them lazily)
    from flowalign.adapter import Adapter
    from flowalign.config import Config

TOKEN_ENV = "FLOWALIGN_LABEL_TOKEN"
COOKIE = "flowalign_label_token"
SESSION_HEADER = "x-label-session"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


class Queue:
    """The labelling state of one folder: queue rows (re-read when ``pairs.jsonl`` changes) + the label log."""

    def __init__(self, folder: str | os.PathLike, labels: str | os.PathLike | None = None, annotator: str = "",
                 shuffle: bool = True) -> None:
        self.folder = Path(folder).resolve()
        if not self.folder.is_dir():
            raise ValueError(f"labelling folder {str(folder)!r} does not exist")
        self.log = pf.LabelLog(Path(labels) if labels else self.folder / pf.LABELS_FILE)
        self.annotator, self.shuffle = annotator, shuffle
        self._rows: list[dict] = []
        self._stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()

    def rows(self) -> list[dict]:
        path = self.folder / pf.QUEUE_FILE
        with self._lock:
            st = path.stat() if path.is_file() else None
            stamp = (st.st_mtime_ns, st.st_size) if st else (0, 0)
            if stamp != self._stamp:
                self._rows = pf.read_queue(self.folder) if st else []
                self._stamp = stamp
            return self._rows

    def _sides(self, row: dict) -> tuple[str, str]:
        swap = self.shuffle and zlib.crc32(row["id"].encode()) & 1
        return ("b", "a") if swap else ("a", "b")

    def state(self) -> dict[str, Any]:
        rows, labels = self.rows(), self.log.labels()
        ids = {r["id"] for r in rows}
        done = [lab for i, lab in labels.items() if i in ids]
        pending = next((r for r in rows if r["id"] not in labels), None)
        pair = None
        if pending is not None:
            left, right = self._sides(pending)
            pair = {"id": pending["id"], "prompt": pending["prompt"],
                    "left": self._medium(left, pending[left]), "right": self._medium(right, pending[right])}
        mine = [lab for lab in done if lab.annotator == self.annotator]
        return {"pair": pair, "can_undo": bool(mine),
                "progress": {"total": len(rows), "done": len(done),
                             "skipped": sum(lab.choice == "skip" for lab in done),
                             "remaining": len(rows) - len(done)}}

    @staticmethod
    def _medium(key: str, rel: str) -> dict[str, Any]:
        return {"key": key, "url": "/media/" + rel.replace(os.sep, "/"), "video": pf.is_video(rel)}

    def label(self, pair_id: str, choice: str) -> None:
        if pair_id not in {r["id"] for r in self.rows()}:
            raise KeyError(pair_id)
        self.log.record(pair_id, choice, self.annotator)

    def undo(self) -> str | None:
        return self.log.undo(self.annotator)


# ----------------------------------------------------------------------------------------------- app
def _host_name(host: str) -> str:
    """``"127.0.0.1:8765"`` -> ``"127.0.0.1"``, ``"[::1]:80"`` -> ``"::1"`` (lower case)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]")[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def create_app(folder: str | os.PathLike, labels: str | os.PathLike | None = None, annotator: str = "",
               shuffle: bool = True, token: str | None = None, allowed_hosts: Sequence[str] | None = None):
    """The FastAPI app: ``GET /`` page, ``GET /api/state``, ``POST /api/label {id, choice}``, ``POST /api/undo``,
    ``GET /media/<path>`` (files of the folder).

    ``allowed_hosts``: host names a request's ``Host`` may name (default: the loopback names); ``["*"]`` accepts
    any (a wildcard bind, where ``--token`` is required). ``app.state.session_token`` is the per-session token that
    state-changing calls must send as ``X-Label-Session`` (the page embeds it)."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles

    queue = Queue(folder, labels, annotator, shuffle)
    token = token or None
    hosts = {_host_name(h) for h in (allowed_hosts if allowed_hosts is not None else LOOPBACK_NAMES)}
    session = secrets.token_urlsafe(32)  # new per app: a forged request cannot know it
    app = FastAPI(title="flowalign label", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.queue = queue
    app.state.session_token = session

    @app.middleware("http")
    async def check_token(request: Request, call_next):
        if token is None:
            return await call_next(request)
        given = request.query_params.get("token") or request.cookies.get(COOKIE) or \
            request.headers.get("x-label-token", "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            return JSONResponse({"detail": "missing or invalid token: open the URL with ?token=<token>"},
                                status_code=401)
        response = await call_next(request)
        if request.query_params.get("token"):
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    @app.middleware("http")  # registered last, so it runs first: before the token check
    async def same_origin_only(request: Request, call_next):
        host = request.headers.get("host", "")
        if "*" not in hosts and _host_name(host) not in hosts:  # DNS rebinding: the attacker's name in Host
            return JSONResponse({"detail": f"Host {host!r} is not this server's address "
                                           f"({', '.join(sorted(hosts))})"}, status_code=403)
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            origin = request.headers.get("origin")
            if origin is not None and origin.rstrip("/").lower() != f"{request.url.scheme}://{host}".lower():
                return JSONResponse({"detail": f"cross-origin request from {origin!r} refused"}, status_code=403)
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return JSONResponse({"detail": f"Content-Type must be application/json, got {ctype or 'none'!r}"},
                                    status_code=415)
            if not hmac.compare_digest(request.headers.get(SESSION_HEADER, "").encode(), session.encode()):
                return JSONResponse({"detail": "missing or wrong session token (X-Label-Session): reload the page"},
                                    status_code=403)
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    def page():
        return HTMLResponse(PAGE.replace("{{folder}}", _html_escape(str(queue.folder)))
                            .replace("{{session}}", session))

    @app.get("/api/state")
    def state():
        return queue.state()

    @app.post("/api/label")
    async def label(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"detail": "body must be JSON {id, choice}"}, status_code=400)
        if not isinstance(body, dict) or not isinstance(body.get("id"), str):
            return JSONResponse({"detail": "body must be JSON {id, choice}"}, status_code=400)
        if body.get("choice") not in pf.CHOICES:
            return JSONResponse({"detail": f"choice must be one of {', '.join(pf.CHOICES)}"}, status_code=400)
        try:
            queue.label(body["id"], body["choice"])
        except KeyError:
            return JSONResponse({"detail": f"unknown pair id {body['id']!r}"}, status_code=404)
        return queue.state()

    @app.post("/api/undo")
    def undo():
        undone = queue.undo()
        return {**queue.state(), "undone": undone}

    app.mount("/media", StaticFiles(directory=str(queue.folder)), name="media")
    return app


def _html_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class LabelServer:
    """The app on a real uvicorn server in a background thread: ``.url``, ``.stop()``; a context manager.

    ``port=0`` picks a free port. ``create=True`` makes the folder (an empty queue waits for pairs)."""

    def __init__(self, folder: str | os.PathLike, host: str = "127.0.0.1", port: int = 0,
                 token: str | None = None, create: bool = False, log_level: str = "warning", **app_kwargs: Any
                 ) -> None:
        from flowalign.rewards.server import bind_socket, is_loopback

        if not token and not is_loopback(host):
            raise ValueError(f"refusing to serve labels on {host!r} without a token (--token or ${TOKEN_ENV}); "
                             "only loopback addresses may run without one")
        folder = Path(folder)
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        if not folder.is_dir():
            raise ValueError(f"labelling folder {str(folder)!r} does not exist")
        self.sock = bind_socket(host, port)
        self.port = self.sock.getsockname()[1]
        bare = host.strip("[]")
        wildcard = bare in ("0.0.0.0", "::", "")
        allowed = ["*"] if wildcard else [bare, *(LOOPBACK_NAMES if is_loopback(bare) else ())]
        self.app = create_app(folder, token=token, allowed_hosts=app_kwargs.pop("allowed_hosts", allowed),
                              **app_kwargs)
        self.session_token: str = self.app.state.session_token
        h = f"[{host}]" if ":" in host else host
        self.url = f"http://{h}:{self.port}/" + (f"?token={token}" if token else "")
        self.log_level = log_level
        self.server = self.thread = None

    def start(self) -> "LabelServer":
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level=self.log_level, access_log=False,
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name=f"label-server-{self.port}", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("label server failed to start")
            time.sleep(0.01)
        return self

    def serve_forever(self) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level=self.log_level, access_log=False,
                                                    lifespan="off"))
        self.server.run(sockets=[self.sock])

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None and threading.current_thread() is not self.thread:
            self.thread.join(timeout=30)
        self.sock.close()

    def __enter__(self) -> "LabelServer":
        return self.start() if self.server is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ----------------------------------------------------------------------------------------------- sampling
def sample_queue(cfg: Config, out: str | os.PathLike, per_prompt: int = 2, auto_label: str | None = None,
                 adapter: Adapter | None = None, progress: bool = True) -> int:
    """Sample ``per_prompt`` images for every prompt of ``cfg.sample.prompts`` with the recipe's model and sampler
    (``sample.kernel/noise_level/num_steps/guidance``, seed ``cfg.seed``) and append all C(per_prompt, 2) pairs of
    each prompt to the labelling queue in ``out``. ``auto_label`` (a reward name, with ``cfg.reward.kwargs``) also
    labels them: the higher score wins, equal scores are ties (AI feedback, as Diffusion-DPO's ``--choice_model``).
    Returns the number of new pairs."""
    import itertools

    import torch
    from tqdm.auto import tqdm

    from flowalign.data import load_prompts
    from flowalign.eval.media import save_png, save_video
    from flowalign.methods.base import generator
    from flowalign.rollout import sample

    if per_prompt < 2:
        raise ValueError(f"per_prompt must be >= 2 (a pair needs two samples), got {per_prompt}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if adapter is None:
        from flowalign.adapter import adapter_from_config

        adapter = adapter_from_config(cfg)
    judge = None
    if auto_label:
        from flowalign.rewards.base import get_reward

        judge = get_reward(auto_label, **dict(cfg.reward.kwargs.get(auto_label, {})))
    s = cfg.sample
    prompts, meta = load_prompts(s.prompts)
    rows, labels = [], []
    for i, prompt in enumerate(tqdm(prompts, desc="sampling pairs", disable=not progress)):
        with torch.no_grad():
            traj = sample(adapter, [prompt], group_size=per_prompt, num_steps=s.num_steps, kernel=s.kernel,
                          noise_level=s.noise_level, guidance=s.guidance, negative_prompt=s.negative_prompt,
                          generator=generator(cfg.seed, "label_sample", i, device=adapter.device))
        images = traj.images.float().clamp(0, 1)
        u8 = (images * 255).round().to(torch.uint8).cpu()
        video = images.ndim == 5
        names = []
        for k in range(per_prompt):
            rel = f"samples/{i:06d}_{k}.{'mp4' if video else 'png'}"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (save_video if video else save_png)(out / rel, u8[k])
            names.append(rel)
        scores = judge(images, [prompt] * per_prompt, [dict(meta[i])] * per_prompt) if judge else None
        for a, b in itertools.combinations(range(per_prompt), 2):
            pid = f"s{cfg.seed}-{i:06d}-{a}-{b}"
            rows.append({"id": pid, "prompt": prompt, "a": names[a], "b": names[b], **dict(meta[i])})
            if scores is not None:
                d = float(scores[a] - scores[b])
                labels.append((pid, "a" if d > 0 else "b" if d < 0 else "tie"))
    n = pf.append_queue(out, rows)
    if labels:
        log = pf.LabelLog(out / pf.LABELS_FILE)
        have = log.labels()
        for pid, choice in labels:
            if pid not in have:
                log.record(pid, choice, f"reward:{auto_label}")
    return n


# ----------------------------------------------------------------------------------------------- CLI
def label_main(argv: Sequence[str] | None = None) -> int:
    """``flowalign label serve|status|export``."""
    p = argparse.ArgumentParser(prog="flowalign label", description="Label preference pairs in a browser.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve the labelling page for a pairs folder")
    s.add_argument("folder", help="folder with pairs.jsonl (id, prompt, a, b) and the media")
    s.add_argument("--host", default="127.0.0.1", help="bind address; anything but loopback needs --token")
    s.add_argument("--port", type=int, default=8765, help="port (0 = any free port)")
    s.add_argument("--labels", default=None, help="label log (default: <folder>/labels.jsonl)")
    s.add_argument("--annotator", default=os.environ.get("USER", ""), help="name recorded with every label")
    s.add_argument("--token", default=os.environ.get(TOKEN_ENV), help=f"access token (default ${TOKEN_ENV})")
    s.add_argument("--no-shuffle", action="store_true", help="always show candidate a on the left")
    st = sub.add_parser("status", help="print labelling progress")
    st.add_argument("folder")
    ex = sub.add_parser("export", help="write the labelled pairs as an offline DPO dataset (.jsonl)")
    ex.add_argument("folder")
    ex.add_argument("out")
    sa = sub.add_parser("sample", help="sample pairs from a recipe's model into a labelling queue")
    sa.add_argument("recipe", help="YAML recipe: model, sample.prompts and the sampler settings")
    sa.add_argument("overrides", nargs="*", help="dotted overrides key=value")
    sa.add_argument("--out", required=True, help="queue folder to create or extend")
    sa.add_argument("--per-prompt", type=int, default=2, help="samples per prompt (all pairs of them are queued)")
    sa.add_argument("--auto-label", default=None, metavar="REWARD",
                    help="label the pairs with this reward (higher wins) instead of people")
    args = p.parse_args(argv)
    try:
        if args.cmd == "serve":
            server = LabelServer(args.folder, host=args.host, port=args.port, token=args.token,
                                 labels=args.labels, annotator=args.annotator, shuffle=not args.no_shuffle,
                                 log_level="info")
            print(f"labelling {args.folder} at {server.url}  (Ctrl-C to stop)", flush=True)
            server.serve_forever()
            return 0
        if args.cmd == "status":
            prog = Queue(args.folder).state()["progress"]
            print(f"{prog['done']} of {prog['total']} pairs labelled ({prog['skipped']} skipped), "
                  f"{prog['remaining']} to go")
            return 0
        if args.cmd == "sample":
            from flowalign.config import load_config

            n = sample_queue(load_config(args.recipe, args.overrides, validate=False), args.out, args.per_prompt,
                             args.auto_label)
            print(f"queued {n} new pairs in {args.out}" + ("" if args.auto_label else
                                                           f"; label them: flowalign label serve {args.out}"))
            return 0
        n = pf.export_pairs(args.folder, args.out)
        print(f"wrote {n} labelled pairs to {args.out}")
        return 0
    except (ValueError, OSError) as e:
        print(f"flowalign label: {e}", file=sys.stderr)
        return 2


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>flowalign · label</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="label-session" content="{{session}}">
<style>
 body{font-family:system-ui,sans-serif;margin:0;background:#111;color:#eee}
 header{display:flex;justify-content:space-between;padding:.6em 1em;background:#222;font-size:14px}
 #prompt{font-size:20px;text-align:center;margin:.8em 1em}
 .cands{display:flex;gap:1.5em;justify-content:center;padding:0 1em}
 figure{margin:0;text-align:center}
 .cand{background:#000;border:3px solid #444;padding:0;cursor:pointer;display:block}
 .cand:hover{border-color:#8cf}
 .cand img,.cand video{width:min(40vw,512px);height:min(40vw,512px);object-fit:contain;image-rendering:pixelated;
  display:block}
 figcaption{margin-top:.3em;color:#aaa}
 .actions{display:flex;gap:.6em;justify-content:center;margin:1.2em}
 .actions button{font-size:15px;padding:.5em 1em}
 #done{text-align:center;font-size:20px;margin-top:3em}
 kbd{background:#333;border-radius:3px;padding:0 .3em}
</style></head>
<body>
<header><span id="progress">loading…</span><span>{{folder}}</span>
<span><kbd>←</kbd>/<kbd>1</kbd> left · <kbd>→</kbd>/<kbd>2</kbd> right · <kbd>↓</kbd>/<kbd>s</kbd> skip ·
<kbd>t</kbd> tie · <kbd>u</kbd> undo</span></header>
<main id="pair" hidden>
 <p id="prompt"></p>
 <div class="cands">
  <figure><button class="cand" id="left" title="left is better"></button><figcaption>left (←)</figcaption></figure>
  <figure><button class="cand" id="right" title="right is better"></button><figcaption>right (→)</figcaption></figure>
 </div>
 <div class="actions">
  <button id="btn-left">← left better</button><button id="btn-tie">tie (t)</button>
  <button id="btn-skip">skip (↓)</button><button id="btn-right">right better →</button>
 </div>
</main>
<p id="done" hidden>Nothing to label right now — new pairs appear here when they are written.</p>
<div class="actions"><button id="btn-undo" disabled>undo (u)</button></div>
<script>
let state = null, busy = false;
const $ = id => document.getElementById(id);
const SESSION = document.querySelector('meta[name="label-session"]').content;
function media(el, m) {
  el.dataset.key = m.key;
  el.innerHTML = "";
  const node = document.createElement(m.video ? "video" : "img");
  node.src = m.url;
  if (m.video) { node.autoplay = true; node.loop = true; node.muted = true; node.playsInline = true; }
  else { node.alt = "candidate " + m.key; }
  el.appendChild(node);
}
function render(s) {
  state = s;
  const p = s.progress;
  $("progress").textContent = `${p.done} / ${p.total} labelled · ${p.skipped} skipped · ${p.remaining} left`;
  $("btn-undo").disabled = !s.can_undo;
  if (s.pair) {
    $("pair").hidden = false; $("done").hidden = true;
    $("pair").dataset.id = s.pair.id;
    $("prompt").textContent = s.pair.prompt;
    media($("left"), s.pair.left); media($("right"), s.pair.right);
  } else {
    $("pair").hidden = true; $("done").hidden = false; delete $("pair").dataset.id;
  }
  document.body.dataset.ready = "1";
}
async function call(url, body) {
  if (busy) return;
  busy = true; document.body.dataset.ready = "0";
  try {
    const r = await fetch(url, {method: body === undefined ? "GET" : "POST",
      headers: {"Content-Type": "application/json", "X-Label-Session": SESSION},
      body: body === undefined ? undefined : JSON.stringify(body)});
    const s = await r.json();
    if (!r.ok) { alert(s.detail || r.statusText); await refresh(true); return; }
    render(s);
  } finally { busy = false; document.body.dataset.ready = "1"; }
}
function refresh(force) { if (force) busy = false; return call("/api/state"); }
function choose(side) {
  if (!state || !state.pair) return;
  let choice = side;
  if (side === "left" || side === "right") choice = state.pair[side].key;
  call("/api/label", {id: state.pair.id, choice: choice});
}
function undo() { if (state && state.can_undo) call("/api/undo", {}); }
$("left").onclick = () => choose("left"); $("right").onclick = () => choose("right");
$("btn-left").onclick = () => choose("left"); $("btn-right").onclick = () => choose("right");
$("btn-tie").onclick = () => choose("tie"); $("btn-skip").onclick = () => choose("skip");
$("btn-undo").onclick = undo;
document.addEventListener("keydown", e => {
  if (e.repeat) return;
  const k = e.key;
  if ((e.ctrlKey || e.metaKey) && k.toLowerCase() === "z") { e.preventDefault(); undo(); return; }
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  if (k === "ArrowLeft" || k === "1") choose("left");
  else if (k === "ArrowRight" || k === "2") choose("right");
  else if (k === "ArrowDown" || k === "s") choose("skip");
  else if (k === "t") choose("tie");
  else if (k === "u" || k === "Backspace") undo();
  else return;
  e.preventDefault();
});
setInterval(() => { if (state && !state.pair && !busy) refresh(); }, 2000);
refresh();
</script>
</body></html>
"""
