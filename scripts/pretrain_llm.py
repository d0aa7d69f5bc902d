"""Pretrain the embedded tiny causal LM on the addition task with noisy targets (a deliberately weak start).

The corpus is generated from the task's *train* pairs only. Each target is correct with probability
``--p-correct``; otherwise the sum is off by one of -10, -1, +1, +10 (never negative). A fraction ``--p-bad-format``
of targets drops one of the brackets. The model therefore learns arithmetic (every corrupted target is
sum-related) but *samples* the right, well-formatted answer only part of the time: the room that RL with a
verifier reward is meant to close. Deterministic from ``--seed`` (one CPU thread, seeded generator).

    nohup nice -n 15 .venv/bin/python scripts/pretrain_llm.py --out flowalign/llm/weights &
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from flowalign.llm.model import build_random_model
from flowalign.llm.task import ArithmeticTask


def make_batch(pairs: torch.Tensor, tok, gen: torch.Generator, batch: int, p_correct: float, p_bad: float):
    """Tokenised noisy sequences ``<s>a+b=<s>`` + EOS, right padded, with a loss mask on the completion."""
    idx = torch.randint(len(pairs), (batch,), generator=gen)
    u = torch.rand(batch, generator=gen)
    off = torch.tensor([-10, -1, 1, 10])[torch.randint(4, (batch,), generator=gen)]
    fmt = torch.rand(batch, generator=gen)
    side = torch.randint(2, (batch,), generator=gen)
    prompts, completions = [], []
    for i in range(batch):
        a, b = (int(v) for v in pairs[idx[i]])
        s = a + b
        if u[i] >= p_correct:
            s = max(0, s + int(off[i]))
        text = f"<{s}>"
        if fmt[i] < p_bad:
            text = text[1:] if side[i] == 0 else text[:-1]
        prompts.append(f"{a}+{b}=")
        completions.append(text)
    p_ids = tok(prompts)["input_ids"]
    c_ids = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in completions]
    L = max(len(p) + len(c) for p, c in zip(p_ids, c_ids))
    ids = torch.full((batch, L), tok.pad_token_id)
    att = torch.zeros(batch, L, dtype=torch.long)
    loss_mask = torch.zeros(batch, L)
    for i, (p, c) in enumerate(zip(p_ids, c_ids)):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        att[i, :n] = 1
        loss_mask[i, len(p):n] = 1
    return ids, att, loss_mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="flowalign/llm/weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--p-correct", type=float, default=0.35)
    ap.add_argument("--p-bad-format", type=float, default=0.15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    task = ArithmeticTask(seed=args.seed)
    pairs = torch.tensor([[int(x) for x in e.prompt[:-1].split("+")] for e in task.split("train")])
    model, tok = build_random_model(seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    model.train()
    t0 = time.time()
    for step in range(args.steps):
        ids, att, lm = make_batch(pairs, tok, gen, args.batch, args.p_correct, args.p_bad_format)
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        loss = (nll * lm[:, 1:]).sum() / lm[:, 1:].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(json.dumps({"step": step, "loss": round(loss.item(), 4), "s": round(time.time() - t0, 1)}),
                  flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "pretrain_args.json").write_text(json.dumps(vars(args), indent=1) + "\n")
    print("saved", out)


if __name__ == "__main__":
    main()
