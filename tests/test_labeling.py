"""Human preference labels: the label log, the labelling web app (API and a real browser) and the trainer side.

What must hold:

* The label log is crash-tolerant (a torn last line is ignored, any other bad line is reported), the last event of
  a pair wins and undo removes the most recent label (of its annotator).
* The app serves the next unlabelled pair with a progress count, records choices from the buttons and the keyboard
  (left/right/skip/tie/undo) and refuses unknown ids, bad choices and missing tokens.
* In headless Chromium (slow): a person clicks and types through the queue, undoes a skip, and the JSONL holds
  exactly those choices.
* The trainer consumes labels: D3PO's human mode waits for labels written while it waits (through the real HTTP
  server) and trains on them; a labelled folder is a DPO dataset; ``flowalign label sample --auto-label`` makes one.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from flowalign import pairs as pf
from flowalign.labeling import LabelServer, Queue, create_app, label_main

PROMPTS = ["a red apple", "a red car", "a red rose", "red sky"]
COLORS = [(250, 20, 20), (20, 20, 250), (20, 200, 20), (240, 240, 30), (200, 0, 200), (0, 0, 0), (255, 255, 255),
          (120, 60, 0)]


def make_queue(folder: Path, n: int = 4) -> list[dict]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        for side, c in (("a", COLORS[(2 * i) % len(COLORS)]), ("b", COLORS[(2 * i + 1) % len(COLORS)])):
            Image.new("RGB", (32, 32), c).save(folder / f"{i}{side}.png")
        rows.append({"id": f"pair{i}", "prompt": f"prompt {i}", "a": f"{i}a.png", "b": f"{i}b.png"})
    pf.append_queue(folder, rows)
    return rows


# ------------------------------------------------------------------------------------------------ the log
def test_label_log_folds_events_undoes_and_tolerates_a_torn_tail(tmp_path):
    path = tmp_path / "labels.jsonl"
    log = pf.LabelLog(path)
    log.record("x", "a", "ann")
    log.record("y", "skip", "ann")
    log.record("z", "b", "bob")
    log.record("x", "b", "ann")  # relabel: last wins, and x becomes the most recent
    assert {k: v.choice for k, v in log.labels().items()} == {"y": "skip", "z": "b", "x": "b"}
    assert log.undo("ann") == "x" and "x" not in log.labels()
    assert log.undo("ann") == "y" and log.undo("ann") is None  # bob's label is not ann's to undo
    assert list(log.labels()) == ["z"]
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e.get("choice", "undo") for e in raw] == ["a", "skip", "b", "b", "undo", "undo"]
    # a crash mid-append leaves a torn last line: readers ignore it, the next writer cuts it
    with path.open("a") as f:
        f.write('{"id": "w", "cho')
    assert list(pf.read_labels(path)) == ["z"]
    pf.LabelLog(path).record("w", "a")
    assert {k: v.choice for k, v in pf.read_labels(path).items()} == {"z": "b", "w": "a"}
    # a bad line that is not the last one is corruption, reported with its number
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2] + ['{"id": "q", "choice": "maybe"}', "not json"] + lines[2:]) + "\n")
    with pytest.raises(pf.PairsError) as e:
        pf.read_labels(path)
    assert "line 3: choice='maybe'" in str(e.value) and "line 4: malformed JSON" in str(e.value)


def test_concurrent_writers_never_interleave(tmp_path):
    log = pf.LabelLog(tmp_path / "labels.jsonl")

    def work(k):
        for i in range(50):
            pf.LabelLog(tmp_path / "labels.jsonl").record(f"{k}-{i}", "a", str(k))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(log.labels()) == 200


# ------------------------------------------------------------------------------------------------ the app
@pytest.fixture
def client(tmp_path):
    from starlette.testclient import TestClient

    rows = make_queue(tmp_path / "q")
    app = create_app(tmp_path / "q", annotator="me")
    # the page's own calls: a loopback Host, JSON, and the session token the page embeds
    with TestClient(app, base_url="http://127.0.0.1:8765",
                    headers={"X-Label-Session": app.state.session_token}) as c:
        yield c, rows, tmp_path / "q"


def test_api_labels_in_order_with_progress_and_undo(client):
    c, _, folder = client
    s = c.get("/api/state").json()
    assert s["progress"] == {"total": 4, "done": 0, "skipped": 0, "remaining": 4} and not s["can_undo"]
    assert s["pair"]["id"] == "pair0" and {s["pair"]["left"]["key"], s["pair"]["right"]["key"]} == {"a", "b"}
    assert c.get(s["pair"]["left"]["url"]).content[:8] == b"\x89PNG\r\n\x1a\n"
    s = c.post("/api/label", json={"id": "pair0", "choice": "b"}).json()
    s = c.post("/api/label", json={"id": "pair1", "choice": "skip"}).json()
    assert s["pair"]["id"] == "pair2" and s["progress"]["done"] == 2 and s["progress"]["skipped"] == 1
    s = c.post("/api/undo", json={}).json()
    assert s["undone"] == "pair1" and s["pair"]["id"] == "pair1" and s["progress"]["done"] == 1
    assert c.post("/api/label", json={"id": "nope", "choice": "a"}).status_code == 404
    assert c.post("/api/label", json={"id": "pair1", "choice": "left"}).status_code == 400
    assert c.post("/api/label", content=b"{", headers={"content-type": "application/json"}).status_code == 400
    assert c.get("/media/../labels.jsonl").status_code == 404  # no way out of the folder
    # pairs appended while the app runs show up
    make_queue(folder, 6)
    assert c.get("/api/state").json()["progress"]["total"] == 6
    assert {k: v.choice for k, v in pf.read_labels(folder / "labels.jsonl").items()} == {"pair0": "b"}


def test_sides_are_shuffled_per_pair_but_stable(tmp_path):
    make_queue(tmp_path, 8)
    q = Queue(tmp_path)
    lefts = [q._sides(r)[0] for r in q.rows()]
    assert set(lefts) == {"a", "b"} and lefts == [q._sides(r)[0] for r in q.rows()]
    assert all(Queue(tmp_path, shuffle=False)._sides(r) == ("a", "b") for r in q.rows())


def test_token_is_required_beyond_loopback(tmp_path):
    from starlette.testclient import TestClient

    make_queue(tmp_path)
    with pytest.raises(ValueError, match="without a token"):
        LabelServer(tmp_path, host="0.0.0.0")
    app = create_app(tmp_path, token="s3cret")
    with TestClient(app, base_url="http://127.0.0.1") as c:
        assert c.get("/api/state").status_code == 401
        assert c.get("/?token=wrong").status_code == 401
        assert c.get("/?token=s3cret").status_code == 200  # sets the cookie
        assert c.get("/api/state").status_code == 200
    with TestClient(app, base_url="http://127.0.0.1") as c:  # a fresh browser: header works, a wrong one not
        assert c.get("/api/state", headers={"x-label-token": "wrong"}).status_code == 401
        assert c.get("/api/state", headers={"x-label-token": "s3cret"}).status_code == 200


def test_real_server_and_cli_status_export(tmp_path, capsys):
    import httpx

    rows = make_queue(tmp_path / "q")
    with LabelServer(tmp_path / "q") as server:
        assert server.url.startswith("http://127.0.0.1:")
        session = {"X-Label-Session": server.session_token}
        assert f'content="{server.session_token}"' in httpx.get(server.url).text  # the page embeds it
        for r, choice in zip(rows, ["a", "b", "tie", "b"]):
            assert httpx.post(server.url + "api/label", json={"id": r["id"], "choice": choice},
                              headers=session).status_code == 200
        assert httpx.get(server.url + "api/state").json()["pair"] is None
    assert label_main(["status", str(tmp_path / "q")]) == 0
    assert "4 of 4 pairs labelled (0 skipped), 0 to go" in capsys.readouterr().out
    assert label_main(["export", str(tmp_path / "q"), str(tmp_path / "out.jsonl")]) == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(o["id"], Path(o["chosen"]).name) for o in out] == [("pair0", "0a.png"), ("pair1", "1b.png"),
                                                                ("pair3", "3b.png")]  # the tie is left out
    pairs = pf.load_pairs(tmp_path / "out.jsonl", size=(32, 32))
    assert [p.id for p in pairs] == [p.id for p in pf.load_pairs(tmp_path / "q", size=(32, 32))]
    assert label_main(["status", str(tmp_path / "missing")]) == 2


# ------------------------------------------------------------------------------------------------ browser
from tests.browser import CHROMIUM, FLAGS, require_browser  # noqa: E402


@pytest.mark.slow
def test_browser_keyboard_buttons_and_undo(tmp_path):
    """A person in headless Chromium: keyboard and buttons through five pairs, skip then undo; checks the JSONL."""
    require_browser()
    from playwright.sync_api import sync_playwright

    make_queue(tmp_path / "q", 5)
    expected = {}
    with LabelServer(tmp_path / "q", annotator="tester") as server, sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True,
                                                   args=FLAGS, viewport={"width": 1200, "height": 900})
        page = ctx.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url)

        def current():
            page.wait_for_function("document.body.dataset.ready === '1'")
            pid = page.get_attribute("#pair", "data-id")
            return pid, page.get_attribute("#left", "data-key"), page.get_attribute("#right", "data-key")

        def progress():
            return page.inner_text("#progress")

        pid, left, right = current()
        assert pid == "pair0" and progress().startswith("0 / 5 labelled")
        page.wait_for_function("document.querySelector('#left img').naturalWidth === 32")
        page.keyboard.press("ArrowLeft")  # keyboard: left is better
        expected[pid] = left
        pid, left, right = current()
        assert pid == "pair1" and progress().startswith("1 / 5 labelled")
        page.click("#btn-right")  # button: right is better
        expected[pid] = right
        pid, left, right = current()
        assert pid == "pair2"
        page.keyboard.press("s")  # skip ...
        pid2, _, _ = current()
        assert pid2 == "pair3" and "1 skipped" in progress()
        page.keyboard.press("u")  # ... undone: pair2 comes back
        pid, left, right = current()
        assert pid == "pair2" and "0 skipped" in progress() and progress().startswith("2 / 5")
        page.click("#right")  # clicking the image itself
        expected[pid] = right
        pid, left, right = current()
        page.keyboard.press("2")  # the digit shortcut for right
        expected[pid] = right
        pid, left, right = current()
        assert pid == "pair4"
        page.click("#btn-tie")
        expected[pid] = "tie"
        current()
        assert page.is_visible("#done") and progress().startswith("5 / 5 labelled")
        shot = tmp_path / "label.png"
        page.screenshot(path=str(shot))
        assert shot.stat().st_size > 5_000
        if os.environ.get("LABEL_SCREENSHOT"):
            shutil.copy(shot, os.environ["LABEL_SCREENSHOT"])
        ctx.close()
        assert not errors, errors
    labels = pf.read_labels(tmp_path / "q" / "labels.jsonl")
    assert {k: v.choice for k, v in labels.items()} == expected
    assert all(v.annotator == "tester" for v in labels.values())
    events = [json.loads(line) for line in (tmp_path / "q" / "labels.jsonl").read_text().splitlines()]
    assert [e.get("choice", "undo") for e in events] == [expected["pair0"], expected["pair1"], "skip", "undo",
                                                         expected["pair2"], expected["pair3"], "tie"]
    assert events[3]["id"] == "pair2" and events[3]["undo"] is True


# ------------------------------------------------------------------------------------------------ trainer side
def _redness(image) -> float:
    """The redness reward of one ``[3, H, W]`` image: ``mean(R - (G + B) / 2)``."""
    return float((image[0] - (image[1] + image[2]) / 2).mean())


def _tiny_cfg(tmp_path, method="d3po", options=None, **train):
    from flowalign.config import load_config
    from flowalign.pipelines import tiny

    return load_config({
        "model": {"adapter": "sd3", "path": tiny.cached("sd3"), "kwargs": dict(tiny.RESOLUTION["sd3"]),
                  "lora": {"rank": 2}},
        "sample": {"prompts": PROMPTS, "prompts_per_round": 2, "group_size": 2, "batch_size": 4, "num_steps": 3,
                   "guidance": 1.0, "same_noise": True},
        "reward": {"weights": {"redness": 1.0}, "background": False},
        "train": {"method": method, "beta": 0.1, "train_cfg": False, "method_options": options or {}, **train},
        "ema": {"enabled": False}, "log": {"progress": False}, "checkpoint": {"save_final": False},
        "output_dir": str(tmp_path / "run")})


def test_d3po_waits_for_human_labels_from_the_web_app(tmp_path):
    """D3PO writes the round's pairs, a 'person' labels them through the HTTP server while training waits; the
    pairs it trains on are exactly those labels (skips dropped), and a timeout names the folder."""
    import httpx

    from flowalign.trainer import Trainer

    folder = tmp_path / "labels"
    cfg = _tiny_cfg(tmp_path, options={"preference": "human", "labels_dir": str(folder), "poll_s": 0.05,
                                       "serve": True, "serve_port": 0, "label_timeout_s": 120})
    trainer = Trainer(cfg)
    url = trainer.method.server.url
    session = {"X-Label-Session": trainer.method.server.session_token}
    decided = {}

    def person():  # label the redder image better, skip the second pair
        deadline = time.monotonic() + 120
        while len(decided) < 2 and time.monotonic() < deadline:
            s = httpx.get(url + "api/state").json()
            if s["pair"] is None:
                time.sleep(0.05)
                continue
            pair = s["pair"]
            if len(decided) == 1:
                choice = "skip"
            else:
                from flowalign.pairs import load_media

                red = {side: _redness(load_media(folder / pair[side]["url"][len("/media/"):]))
                       for side in ("left", "right")}
                choice = pair["left"]["key"] if red["left"] > red["right"] else pair["right"]["key"]
            httpx.post(url + "api/label", json={"id": pair["id"], "choice": choice}, headers=session)
            decided[pair["id"]] = choice

    th = threading.Thread(target=person, daemon=True)
    th.start()
    rec = trainer.step()
    th.join(timeout=10)
    trainer.method.close()
    assert len(decided) == 2 and rec["labeled_frac"] == 1.0 and rec["skip_frac"] == 0.5
    assert rec["pairs"] == 1 and rec["num_updates"] == 1 and rec["human_reward_agreement"] == 1.0
    queue = pf.read_queue(folder)
    first = next(r for r in queue if r["id"] in decided and decided[r["id"]] != "skip")
    st = trainer.method._store
    w, lo = st.pairs[0].tolist()
    assert (first[decided[first["id"]]], first["b" if decided[first["id"]] == "a" else "a"]) == \
        (f"iter_000000/{w:06d}.png", f"iter_000000/{lo:06d}.png")
    # resuming the same round re-uses its labels instead of waiting; a new round with nobody labelling times out
    cfg2 = _tiny_cfg(tmp_path, options={"preference": "human", "labels_dir": str(folder), "poll_s": 0.05,
                                        "label_timeout_s": 0.3})
    again = Trainer(cfg2, overwrite=True)  # a fresh Trainer in the used output dir (issue 22: refused without it)
    assert again.step()["pairs"] == 1
    with pytest.raises(TimeoutError, match="flowalign label serve"):
        again.step()


def test_d3po_queues_every_chunk_of_a_round_for_people(tmp_path):
    """With two sampling chunks per round, every pair of both chunks is queued with its own image (the round keeps
    every chunk's images for people), and labels from the log -- written here by a 'person' thread, choosing the
    redder image -- decide the trained pairs."""
    from flowalign.trainer import Trainer

    folder = tmp_path / "labels"
    cfg = _tiny_cfg(tmp_path, options={"preference": "human", "labels_dir": str(folder), "poll_s": 0.05,
                                       "label_timeout_s": 120})
    cfg.sample.prompts_per_round = 4  # 8 rows = 2 chunks of sample.batch_size=4
    trainer = Trainer(cfg)
    done = threading.Event()

    def person():
        log, seen = pf.LabelLog(folder / pf.LABELS_FILE), set()
        deadline = time.monotonic() + 120
        while len(seen) < 4 and time.monotonic() < deadline:
            for row in pf.read_queue(folder) if (folder / pf.QUEUE_FILE).is_file() else []:
                if row["id"] not in seen:
                    red = [_redness(pf.load_media(folder / row[k])) for k in ("a", "b")]
                    log.record(row["id"], "a" if red[0] > red[1] else "b", "tester")
                    seen.add(row["id"])
            time.sleep(0.05)
        done.set()

    th = threading.Thread(target=person, daemon=True)
    th.start()
    rec = trainer.step()
    th.join(timeout=10)
    queue = pf.read_queue(folder)
    assert done.is_set() and len(queue) == 4 and rec["labeled_frac"] == 1.0 and rec["pairs"] == 4
    st = trainer.method._store
    images = {f"iter_000000/{r:06d}.png" for r in range(8)}
    assert {row["a"] for row in queue} | {row["b"] for row in queue} == images
    for w, lo in st.pairs.tolist():  # the chosen image of each trained pair is the redder one on disk
        assert _redness(pf.load_media(folder / f"iter_000000/{w:06d}.png")) > \
            _redness(pf.load_media(folder / f"iter_000000/{lo:06d}.png"))


def test_labelled_folder_trains_dpo_and_auto_label(tmp_path):
    """``flowalign label sample --auto-label`` fills a labelled folder that dpo trains on directly."""
    from flowalign.labeling import sample_queue
    from flowalign.trainer import Trainer

    cfg = _tiny_cfg(tmp_path, "d3po")
    n = sample_queue(cfg, tmp_path / "q", per_prompt=3, auto_label="redness", progress=False)
    assert n == len(PROMPTS) * 3
    labels = pf.read_labels(tmp_path / "q" / "labels.jsonl")
    assert len(labels) == n and all(v.annotator == "reward:redness" for v in labels.values())
    assert sample_queue(cfg, tmp_path / "q", per_prompt=3, auto_label="redness", progress=False) == 0  # idempotent
    for pair in pf.load_pairs(tmp_path / "q", size=(32, 32)):  # the redder image is the chosen one
        red = [_redness(pf.load_media(p)) for p in (pair.chosen, pair.rejected)]
        assert red[0] >= red[1] - 1 / 255  # the judge saw float images, this the saved 8-bit PNGs
    dpo = _tiny_cfg(tmp_path, "dpo", {"pairs": str(tmp_path / "q"), "pairs_per_update": 4}, beta=100.0)
    tr = Trainer(dpo)
    before = [p.detach().clone() for p in tr.params]
    rec = tr.step()
    assert rec["num_updates"] == 2 and torch.isfinite(torch.tensor(rec["loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.params))
