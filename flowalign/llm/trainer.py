"""The LLM RLVR loop: rollouts -> rewards -> advantages -> clipped policy updates (GRPO family).

One step (``LLMTrainer.train_step``):

1. sample ``prompts_per_step`` train prompts and ``G`` completions each (``rollout.generate``; ``G + 1`` for
   MC-GRPO); DAPO dynamic sampling drops groups whose rewards are all equal and refills them;
2. score every reward component (``flowalign.rewards`` registry, text modality) plus the DAPO soft overlong
   punishment; the total is the weighted sum;
3. one no-grad micro-batched pass gives the old-policy (``num_iterations > 1`` or KL-in-reward) and reference
   (``beta > 0``; LoRA: adapters disabled) token log-probs;
4. advantages from ``flowalign.advantages.ADVANTAGES`` (REINFORCE++ with KL-in-reward: token-level returns,
   whitened over tokens); MC-GRPO drops each group's median pivot;
5. ``num_iterations`` x ``mini_batches`` optimizer steps (groups shuffled whole), each accumulated over
   ``train.batch_size`` rows with step-level normalisers (``micro-token-mean``: per-window ones, as TRL bnpo),
   so the accumulated loss equals the one-shot loss of the mini-batch. Speed, with the same loss and gradients:
   each prompt runs once per group in the training forward (prefix sharing), and groups whose advantages are all 0
   are not run at all when no KL/entropy term needs them.

Several processes (``accelerate launch`` / ``torchrun``): ``rollout.prompts_per_step`` is per process; all
processes draw from one shared prompt stream and process ``r`` takes the ``r``-th slice of each draw, and every
prompt's G samples come from a generator seeded by the prompt's position in that stream. So ``P`` processes with
``n`` prompts each sample exactly the rollouts of one process with ``P * n`` prompts. Group statistics are local
(a group never straddles processes), batch statistics (batch std, GDPO, REINFORCE++ whitening, also over tokens
with the KL in the reward) and the token/sequence normalisers are global, mini-batches are drawn from one global
permutation of the groups (a process with no group in a mini-batch joins the gradient all-reduce with a zero
backward), and DAPO refill rounds run in lockstep. ``tests/test_llm_multiprocess.py`` checks that two processes
train to the weights of one process (1e-5).

``rollout.engine=vllm`` (optional extra): rollouts from a ``flowalign.llm.vllm.VLLMEngine`` built on the model's
checkpoint directory; the trainer loads the policy's new weights into it before the first generation after each
optimizer step (and after ``resume``), so sampling stays on-policy.

Logs are JSONL (``<output_dir>/metrics.jsonl``): reward per component, accuracy, response length, clip fractions,
KL, entropy, timings per phase. Checkpoints (``flowalign.llm.checkpointing`` over ``flowalign.checkpoint``, the
image trainer's crash-safe writer) hold the trainable weights, optimizer, scheduler, RNG states and the prompt
stream; ``resume`` continues bit-for-bit on CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml
from torch import Tensor

from flowalign import trackers
from flowalign.advantages import median_pivots, zero_std_groups
from flowalign.llm import checkpointing, run_guards
from flowalign.llm.advantages import step_advantages
from flowalign.llm.config import LLMConfig
from flowalign.llm.losses import kl_estimate, policy_loss
from flowalign.llm.model import WEIGHTS_DIR, load_model
from flowalign.llm.rollout import Rollout, concat, generate, token_logps, token_logps_grouped
from flowalign.llm.task import ArithmeticTask
from flowalign.rewards.base import REWARDS, get_reward
from flowalign.rewards.text import OverlongPenalty


class LLMTrainer:
    """Owns the model(s), optimizer, accelerator, prompt stream and logs of one LLM RLVR run."""

    def __init__(self, cfg: LLMConfig, accelerator=None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.cfg = cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        # no buffer broadcast in DDP's forward (the only buffers are RoPE tables, equal everywhere): processes run
        # different numbers of forwards per optimizer step (prefix sharing, uneven mini-batches), and a collective
        # in every forward would then deadlock
        self.acc = accelerator or Accelerator(cpu=cfg.train.device == "cpu", kwargs_handlers=[
            DistributedDataParallelKwargs(broadcast_buffers=False)], project_dir=cfg.output_dir,
            log_with=trackers.log_with(cfg.log, cfg.output_dir))
        trackers.start(self.acc, cfg.log, cfg.to_dict())  # log.trackers/project/run_name/init_kwargs
        torch.manual_seed(cfg.seed)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
        model, self.tok = load_model(cfg.model.path, dtype)
        self.lora = cfg.model.lora.enabled
        if self.lora:
            from peft import LoraConfig, get_peft_model

            lc = cfg.model.lora
            model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=lc.rank, lora_alpha=lc.alpha,
                                                     lora_dropout=lc.dropout, target_modules=list(lc.target_modules)))
        if cfg.model.gradient_checkpointing:  # transformers >= 5.2x calls it activation checkpointing
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if self.lora:
                model.enable_input_require_grads()
        self.ref = None
        if cfg.algo.beta > 0 and not self.lora:  # LoRA uses the base model (adapters disabled) as reference
            self.ref = copy.deepcopy(model).eval().requires_grad_(False).to(self.acc.device)
        params = [p for p in model.parameters() if p.requires_grad]
        o = cfg.train
        opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        warm = max(1, o.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        self.model, self.opt, self.sched = self.acc.prepare(model, opt, sched)
        rw = cfg.reward
        self.rewards = [get_reward(name, **rw.kwargs.get(name, {})) for name in rw.weights]
        self.reward_names = list(rw.weights)
        self.weights = [float(w) for w in rw.weights.values()]
        if cfg.algo.overlong_buffer:  # DAPO soft overlong punishment as one more reward component
            self.rewards.append(OverlongPenalty(cfg.rollout.max_new_tokens, cfg.algo.overlong_buffer))
            self.reward_names.append("overlong_penalty")
            self.weights.append(cfg.algo.overlong_penalty)
        task = ArithmeticTask(cfg.task.max_operand, cfg.task.heldout_fraction, cfg.task.seed)
        self.train_set, self.heldout = task.split("train"), task.split("heldout")
        # shared by all processes (same seeds): the prompt stream and the group shuffle; per-prompt sampling seeds
        # come from the stream position (``_group_generators``)
        self.gen_prompts = torch.Generator().manual_seed(cfg.seed * 1_000_003)
        self.gen_sample = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919)
        self._perm, self._pos, self._epoch = torch.randperm(len(self.train_set), generator=self.gen_prompts), 0, 0
        self.step = 0
        self._weights_version, self._vllm_synced = 0, -1
        self.vllm = None
        if cfg.rollout.engine == "vllm":
            from flowalign.llm.vllm import VLLMEngine

            path = WEIGHTS_DIR if cfg.model.path in (None, "embedded") else cfg.model.path
            self.vllm = VLLMEngine(path, dtype=cfg.model.dtype, seed=cfg.seed + self.acc.process_index,
                                   **cfg.rollout.vllm_kwargs)
        self.out = Path(cfg.output_dir)
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    # ---------------------------------------------------------------- data and rollouts
    @property
    def policy(self):
        return self.acc.unwrap_model(self.model)

    def _draw(self, n: int) -> tuple[list, list[int]]:
        """``n`` examples from the shared prompt stream and their stream positions (epoch * N + index)."""
        out, ids = [], []
        while len(out) < n:
            if self._pos >= len(self._perm):
                self._perm, self._pos = torch.randperm(len(self.train_set), generator=self.gen_prompts), 0
                self._epoch += 1
            take = self._perm[self._pos:self._pos + n - len(out)]
            ids += [self._epoch * len(self._perm) + self._pos + j for j in range(len(take))]
            self._pos += len(take)
            out += [self.train_set[int(i)] for i in take]
        return out, ids

    def _next_prompts(self, n: int) -> tuple[list, list[int]]:
        """This process's ``n`` prompts: the ``rank``-th slice of a draw of ``P * n`` (all processes draw alike)."""
        P, r = self.acc.num_processes, self.acc.process_index
        exs, ids = self._draw(P * n)
        return exs[r * n:(r + 1) * n], ids[r * n:(r + 1) * n]

    def _group_generators(self, ids: list[int]) -> list[torch.Generator]:
        """One sampling generator per prompt, seeded by (seed, stream position): independent of batch layout."""
        base = (self.cfg.seed * 1_000_003 + 7919) * 0x9E3779B97F4A7C15
        return [torch.Generator().manual_seed((base + (k + 1) * 0xBF58476D1CE4E5B9) % 2**63) for k in ids]

    def _generate(self, prompts: list[str], group_size: int, temperature: float, generator) -> Rollout:
        r = self.cfg.rollout
        kw = {}
        if self.vllm is not None:  # on-policy: the engine gets the weights of the latest optimizer step
            if self._vllm_synced != self._weights_version:
                self.vllm.sync_weights(self.policy)
                self._vllm_synced = self._weights_version
            kw["vllm_engine"] = self.vllm
        return generate(self.policy, self.tok, prompts, group_size, r.max_new_tokens, temperature, r.top_k,
                        r.top_p, r.stop_strings, generator, r.engine, **kw)

    def _sample(self, examples, ids: list[int], group_size: int) -> tuple[Rollout, list[int]]:
        ro = self._generate([e.prompt for e in examples], group_size, self.cfg.rollout.temperature,
                            self._group_generators(ids))
        return ro, [e.answer for e in examples for _ in range(group_size)]

    def _global_max(self, x: int) -> int:
        if self.acc.num_processes == 1:
            return x
        return int(self.acc.gather(torch.tensor([x], device=self.acc.device)).max())

    def _global_sum(self, x: Tensor) -> Tensor:
        if self.acc.num_processes == 1:
            return x
        return self.acc.reduce(x.to(self.acc.device), reduction="sum").cpu()

    def score(self, ro: Rollout, answers: list[int]) -> Tensor:
        """Reward components ``[B, K]`` (K = rewards + overlong penalty when enabled); metadata carries
        ``num_tokens`` (completion length incl. EOS) and ``truncated``."""
        meta = [{"num_tokens": int(n), "truncated": bool(t)} for n, t in zip(ro.lengths, ro.truncated)]
        cols = [rw(completions=ro.completions, prompts=ro.prompts, metadata=meta, answers=answers).float().cpu()
                for rw in self.rewards]
        R = torch.stack(cols, 1)
        run_guards.check_rewards(R, self.reward_names, self.step + 1)  # NaN/inf: stop, naming the component
        return R

    def _collect(self) -> tuple[Rollout, Tensor, dict]:
        """Rollouts and rewards of one step, with DAPO dynamic sampling when enabled."""
        cfg, a = self.cfg, self.cfg.algo
        G = cfg.rollout.group_size + (1 if a.median_pivot else 0)
        want = cfg.rollout.prompts_per_step
        ro, answers = self._sample(*self._next_prompts(want), G)
        R = self.score(ro, answers)
        info = {"groups_sampled": want}
        if not a.dynamic_sampling:
            return ro, R, info
        w = torch.tensor(self.weights)
        kept_ro, kept_R, n_kept = [], [], 0
        for rnd in range(a.max_refill_rounds + 1):
            if rnd:  # refill rounds run in lockstep over processes (same draws from the shared prompt stream)
                need = want - n_kept
                m = self._global_max(need)
                if m == 0:
                    break
                exs, ids = self._next_prompts(m)
                if need == 0:
                    continue
                ro, answers = self._sample(exs[:need], ids[:need], G)
                R = self.score(ro, answers)
                info["groups_sampled"] += len(ro) // G
            ok = ~zero_std_groups(R @ w, G)[::G] if G > 1 else torch.ones(len(ro) // G, dtype=torch.bool)
            rows = ok.repeat_interleave(G).nonzero().flatten()
            if len(rows):
                kept_ro.append(ro.index(rows.to(ro.completion_ids.device)))
                kept_R.append(R[rows])
                n_kept += int(ok.sum())
        info["groups_kept"] = n_kept
        if not kept_ro:
            return ro.index(torch.zeros(0, dtype=torch.long)), R[:0], info
        return concat(kept_ro, self.tok.pad_token_id), torch.cat(kept_R), info

    def _logps(self, model, ro: Rollout, rows: Tensor, entropy: bool = False):
        """Token log-probs of ``rows`` (whole groups when prefix sharing is on) under ``model``."""
        T, G = self.cfg.rollout.temperature, ro.group_size
        args = (ro.prompt_ids[rows], ro.prompt_mask[rows], ro.completion_ids[rows], ro.completion_mask[rows])
        pos = self.cfg.rollout.position_ids
        if self._shared(G):
            return token_logps_grouped(model, *args, group_size=G, temperature=T, entropy=entropy, position_ids=pos)
        return token_logps(model, *args, temperature=T, entropy=entropy, position_ids=pos)

    def _shared(self, G: int) -> bool:
        """Prefix sharing needs a KV cache in the training forward (not with gradient checkpointing)."""
        return (self.cfg.train.prefix_sharing and not self.cfg.model.gradient_checkpointing
                and self.cfg.train.batch_size >= G)

    def _skip_zero_adv(self) -> bool:
        a = self.cfg.algo
        # single process only (a rank whose groups are all skipped would need a zero backward: not worth it)
        return (self.cfg.train.skip_zero_advantage and (a.beta == 0 or a.kl_in_reward) and not a.entropy_coef
                and self.acc.num_processes == 1)

    def _micro(self, rows: Tensor, G: int) -> list[Tensor]:
        """Split row indices into micro-batches; whole groups when prefix sharing is on."""
        mb = self.cfg.train.batch_size
        if self._shared(G):
            mb = (mb // G) * G
        return list(rows.split(mb))

    @torch.no_grad()
    def _aux_logps(self, ro: Rollout, old: bool, ref: bool) -> tuple[Tensor | None, Tensor | None]:
        """Old-policy and reference log-probs in one micro-batched no-grad pass over the rollout."""
        if not (old or ref):
            return None, None
        if len(ro) == 0:
            e = ro.completion_ids.new_zeros(ro.completion_ids.shape, dtype=torch.float32)
            return (e if old else None), (e if ref else None)
        rows = torch.arange(len(ro), device=ro.completion_ids.device)
        olds, refs = [], []
        G = ro.group_size
        mb = max(self.cfg.rollout.logprob_micro_batch // G, 1) * G if self._shared(G) else \
            self.cfg.rollout.logprob_micro_batch
        for r in rows.split(mb):
            if old:
                olds.append(self._logps(self.model, ro, r)[0])
            if ref:
                if self.ref is not None:
                    refs.append(self._logps(self.ref, ro, r)[0])
                else:
                    with self.policy.disable_adapter():
                        refs.append(self._logps(self.model, ro, r)[0])
        return (torch.cat(olds) if old else None), (torch.cat(refs) if ref else None)

    def advantages(self, R: Tensor, group_size: int, ro: Rollout | None = None, kl: Tensor | None = None) -> Tensor:
        """``[B]`` (or REINFORCE++ token-level ``[B, C]``) advantages; ``flowalign.llm.advantages.step_advantages``."""
        return step_advantages(R, group_size, self.cfg.algo, self.weights, self.acc, ro, kl)

    # ---------------------------------------------------------------- one step
    def train_step(self) -> dict:
        cfg, a = self.cfg, self.cfg.algo
        t0 = time.perf_counter()
        self.model.eval()
        ro, R, info = self._collect()
        t_gen = time.perf_counter() - t0
        G = cfg.rollout.group_size + (1 if a.median_pivot else 0)
        w = torch.tensor(self.weights)
        metrics = {"step": self.step + 1, **info}
        metrics["reward"] = float((R @ w).mean()) if len(R) else float("nan")
        for j, n in enumerate(self.reward_names):
            metrics[f"reward/{n}"] = float(R[:, j].mean()) if len(R) else float("nan")
        metrics["response_length"] = float(ro.lengths.float().mean()) if len(ro) else 0.0
        metrics["truncated_frac"] = float(ro.truncated.float().mean()) if len(ro) else 0.0
        trackers.log_texts(self.acc, "samples/completions", list(zip(ro.prompts, ro.completions, (R @ w).tolist())),
                           self.step + 1, limit=cfg.log.samples)
        rows_all = int(self._global_sum(torch.tensor([float(len(ro))]))[0])
        if rows_all == 0:  # dynamic sampling found no informative group (on any process): no update this step
            self.step += 1
            metrics["skipped"] = 1
            self._log(metrics)
            return metrics
        t1 = time.perf_counter()
        need_old = a.num_iterations > 1 or a.mini_batches > 1 or (a.kl_in_reward and a.beta > 0)
        old, ref = self._aux_logps(ro, old=need_old, ref=a.beta > 0)
        kl_r = kl_estimate(old, ref, a.kl_estimator) if (a.kl_in_reward and a.beta > 0) else None
        if kl_r is not None:  # the per-token KL that goes into the reward (REINFORCE++ / RLOO)
            m = ro.completion_mask.to(kl_r.dtype)
            metrics["kl_in_reward"] = float((kl_r * m).sum() / m.sum().clamp(min=1))
        A = self.advantages(R, G, ro, kl_r)
        keep = torch.arange(len(ro))
        if a.median_pivot:
            piv = median_pivots(R @ w, G)
            keep = keep[~torch.isin(keep, piv)]
        dev = ro.completion_ids.device
        keep_d = keep.to(dev)
        ro = dataclasses.replace(ro.index(keep_d), group_size=G - 1 if a.median_pivot else G)
        A, old = A[keep].to(dev), (old[keep_d] if old is not None else None)
        ref = ref[keep_d] if ref is not None else None
        loss_mask = ro.completion_mask.clone()
        if a.mask_truncated:
            loss_mask[ro.truncated] = 0
        t_aux = time.perf_counter() - t1
        t2 = time.perf_counter()
        stats = self._update(ro, A, old, ref, loss_mask)
        t_train = time.perf_counter() - t2
        self.step += 1
        metrics.update(stats)
        n_tok = int(ro.completion_mask.sum())
        if self.vllm is not None:
            metrics["vllm_weight_syncs"] = self.vllm.syncs
        metrics.update({"adv_abs_mean": float(A.abs().mean()), "tokens": n_tok, "loss_tokens": int(loss_mask.sum()),
                        "time/generate": t_gen, "time/aux_logprobs": t_aux, "time/train": t_train,
                        "time/step": time.perf_counter() - t0, "lr": self.sched.get_last_lr()[0]})
        self._log(metrics)
        return metrics

    def _update(self, ro: Rollout, A: Tensor, old: Tensor | None, ref: Tensor | None, loss_mask: Tensor) -> dict:
        cfg, a = self.cfg, self.cfg.algo
        self.model.train()
        n = len(ro)
        P = self.acc.num_processes
        acc_stats: dict[str, list] = {}
        grad_norms, losses = [], []
        G = ro.group_size
        skipped, idle = 0, 0
        shuffle = a.num_iterations > 1 or a.mini_batches > 1
        n_local = n // G
        if P > 1:  # this process's groups are [offset, offset + n_local) of the global group list
            per_rank = self.acc.gather(torch.tensor([n_local], device=self.acc.device)).cpu()
            offset, n_glob = int(per_rank[:self.acc.process_index].sum()), int(per_rank.sum())
        else:
            offset, n_glob = 0, n_local
        for _ in range(a.num_iterations):
            # shuffle whole groups (keeps prompt sharing possible); rows of a group stay together. One global
            # permutation (same generator state on every process), so mini-batches match a single process's
            groups = torch.randperm(n_glob, generator=self.gen_sample) if shuffle else torch.arange(n_glob)
            for gchunk in groups.tensor_split(a.mini_batches):
                if len(gchunk) == 0:
                    continue
                gchunk = gchunk[(gchunk >= offset) & (gchunk < offset + n_local)] - offset
                chunk = (gchunk[:, None] * G + torch.arange(G)[None]).flatten().to(loss_mask.device)
                counts = torch.tensor([float(len(chunk)), float(loss_mask[chunk].sum())], device=self.acc.device)
                if P > 1:  # step-level normalisers over all processes, divided by P because DDP averages grads
                    counts = self.acc.reduce(counts, reduction="sum")
                n_seq, n_tok = float(counts[0]) / P, float(counts[1]) / P
                row_tok, n_win = self._windows(chunk, G, loss_mask)
                self.opt.zero_grad(set_to_none=True)
                total = 0.0
                if self._skip_zero_adv():
                    # groups whose advantages are all 0 add exactly 0 to the loss and its gradient (no KL/entropy
                    # term): skip their forward/backward; the normalisers above still count them
                    a_rows = A[chunk].reshape(len(gchunk), G, -1)
                    live = (a_rows != 0).flatten(1).any(1)
                    skipped += int((~live).sum())
                    chunk = chunk.reshape(len(gchunk), G)[live].flatten()
                micro = self._micro(chunk, G) if len(chunk) else []
                for k, mb in enumerate(micro):
                    ctx = self.acc.no_sync(self.model) if (P > 1 and k < len(micro) - 1) else nullcontext()
                    with ctx:
                        logp, ent = self._logps(self.model, ro, mb, entropy=True)
                        if not a.entropy_coef:
                            ent = ent.detach()
                        o = old[mb] if old is not None else logp.detach()
                        out = policy_loss(
                            logp, o, A[mb], loss_mask[mb], loss=a.policy_loss, agg=a.loss_agg_mode,
                            eps_low=a.eps_low, eps_high=a.eps_high, delta=a.delta,
                            importance_sampling_level=a.importance_sampling_level,
                            ref_logp=ref[mb] if (ref is not None and not a.kl_in_reward) else None,
                            beta=0.0 if a.kl_in_reward else a.beta, kl=a.kl_estimator,
                            kl_ratio_correction=a.kl_ratio_correction, entropy=ent, entropy_coef=a.entropy_coef,
                            num_seqs=n_seq, num_tokens=row_tok[mb] if row_tok is not None else n_tok,
                            norm=cfg.rollout.max_new_tokens, num_windows=n_win)
                        self.acc.backward(out.loss)
                    total += out.loss.item()
                    for key, v in out.metrics.items():
                        acc_stats.setdefault(key, []).append((v, len(mb)))
                if P > 1 and not micro:  # no local rows in this mini-batch: still join the DDP gradient all-reduce
                    self._zero_backward()
                    idle += 1
                for p in self.model.parameters():  # all groups skipped: zero grads keep AdamW's step identical
                    if p.requires_grad and p.grad is None:
                        p.grad = torch.zeros_like(p)
                # gradients are all-reduced, so every process stops together on them; a local NaN loss only with P=1
                run_guards.check_update(self.step + 1, total if P == 1 else 0.0,
                                        [(n, p.grad) for n, p in self.policy.named_parameters()])
                gn = self.acc.clip_grad_norm_(self.model.parameters(), cfg.train.max_grad_norm) \
                    if cfg.train.max_grad_norm else torch.tensor(float("nan"))
                self.opt.step()
                self.sched.step()
                self._weights_version += 1
                grad_norms.append(float(gn))
                losses.append(total)
        stats = {k: sum(v * m for v, m in vs) / max(1, sum(m for _, m in vs)) for k, vs in acc_stats.items()}
        stats.update({"loss": sum(losses) / len(losses), "grad_norm": sum(grad_norms) / len(grad_norms),
                      "zero_adv_groups_skipped": skipped / max(1, a.num_iterations), "idle_mini_batches": idle})
        return stats

    def _windows(self, chunk: Tensor, G: int, loss_mask: Tensor) -> tuple[Tensor | None, float | None]:
        """``micro-token-mean`` (TRL bnpo): each row's accumulation-window token count ``[n]`` and the windows per
        step ``W`` (global count / P, as DDP averages). Windows are the ``train.batch_size`` splits of the
        mini-batch *before* zero-advantage groups are skipped, so skipping never changes a normaliser."""
        if self.cfg.algo.loss_agg_mode != "micro-token-mean":
            return None, None
        row_tok = torch.zeros(loss_mask.shape[0], dtype=torch.float32, device=loss_mask.device)
        wins = self._micro(chunk, G) if len(chunk) else []
        for w in wins:
            row_tok[w] = loss_mask[w].sum().float()
        n_win = torch.tensor([float(len(wins))], device=self.acc.device)
        P = self.acc.num_processes
        if P > 1:
            n_win = self.acc.reduce(n_win, reduction="sum")
        return row_tok, max(float(n_win[0]) / P, 1e-12)

    def _zero_backward(self) -> None:
        """A backward of ``0 * logits`` through the wrapped model (all parameters): DDP all-reduces as usual."""
        ids = torch.tensor([[self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id]],
                           device=self.acc.device)
        self.acc.backward(self.model(input_ids=ids).logits.float().sum() * 0.0)

    # ---------------------------------------------------------------- evaluation, logs, checkpoints
    @torch.no_grad()
    def evaluate(self, n: int | None = None, temperature: float | None = None, split: str = "heldout") -> dict:
        """Answer accuracy and format rate on ``n`` examples of ``split`` (fixed seed: comparable across calls)."""
        exs = (self.heldout if split == "heldout" else self.train_set)[: n or self.cfg.eval.num_prompts]
        T = self.cfg.eval.temperature if temperature is None else temperature
        g = torch.Generator().manual_seed(self.cfg.seed + 12345)
        ro = self._generate([e.prompt for e in exs], 1, T, g)
        answers = [e.answer for e in exs]
        out = {"split": split, "n": len(exs), "temperature": T}
        for name in ("arith_answer", "arith_format"):
            out[name] = float(REWARDS.get(name)()(completions=ro.completions, answers=answers).mean())
        out["accuracy"] = out.pop("arith_answer")
        out["format"] = out.pop("arith_format")
        return out

    def _log(self, metrics: dict) -> None:
        if self.acc.is_main_process:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()})
                        + "\n")
        if self.cfg.log.trackers:  # the same record, numeric leaves (eval/accuracy, reward/<name>, ...)
            self.acc.log(trackers.scalars(metrics), step=metrics["step"])

    def train(self, steps: int | None = None, progress: bool = True) -> list[dict]:
        """Run ``steps`` (default ``train.steps``) steps with periodic held-out evaluation and checkpoints."""
        from tqdm.auto import tqdm

        steps = self.cfg.train.steps if steps is None else steps
        ev, ck = self.cfg.eval, self.cfg.checkpoint
        history = []
        if self.step == 0:
            self._log({"step": 0, "eval": self.evaluate()})
        end = self.step + steps
        bar = tqdm(total=steps, disable=not (progress and self.acc.is_main_process), desc="llm-rl")
        while self.step < end:
            m = self.train_step()
            history.append(m)
            bar.update(1)
            bar.set_postfix(reward=f"{m['reward']:.3f}")
            if ev.every and self.step % ev.every == 0 and self.step < end:
                self._log({"step": self.step, "eval": self.evaluate()})
            if ck.every and self.step % ck.every == 0:
                self.save()
        bar.close()
        self._log({"step": self.step, "eval": self.evaluate()})
        self.save()
        if self.cfg.log.trackers:
            self.acc.end_training()  # flush + close (TensorBoard reopens its writer if train() runs again)
        return history

    def trainable_state(self) -> dict[str, Tensor]:
        """The trained weights by name (LoRA adapters, or the whole model), CPU copies."""
        model = self.policy
        if self.lora:
            from peft import get_peft_model_state_dict

            sd = get_peft_model_state_dict(model)
        else:
            sd = model.state_dict()
        # clone: tied embeddings share storage, which safetensors refuses
        return {k: v.detach().cpu().clone().contiguous() for k, v in sd.items()}

    def load_trainable_state(self, sd: dict[str, Tensor]) -> None:
        if self.lora:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.policy, sd)
        else:
            self.policy.load_state_dict(sd)
        self._weights_version += 1  # new weights: a vLLM engine must reload them

    def save(self) -> Path:
        """Write ``checkpoint-<step>`` crash-safely (``flowalign.llm.checkpointing``); every process calls it."""
        return checkpointing.save(self)

    def resume(self, path: str | Path, allow_config_change: tuple[str, ...] | list[str] = ()) -> None:
        """Restore a checkpoint written by ``save`` (or ``"latest"``); the run then continues bit-for-bit (CPU).
        A config differing from the checkpoint's is refused (``run_guards.resume_changes``) unless its keys are in
        ``allow_config_change`` (or cadence/output keys); allowed changes are applied and logged.
        ``"latest"`` with no checkpoint yet (a run killed before its first save) starts afresh: the log rows of
        the killed run are dropped so none is written twice."""
        found = checkpointing.resolve(str(path), self)
        if found is None:
            import sys

            from flowalign import checkpoint as ckpt

            print(f"warning: --resume {path}: no checkpoint under {checkpointing.checkpoint_root(self)}; "
                  "starting afresh", file=sys.stderr)
            if self.acc.is_main_process:
                ckpt.truncate_log(self.out / "metrics.jsonl", -1, key="step")  # its step-0 eval row too
            return
        changes = run_guards.resume_changes(self.cfg, found, allow_config_change)
        checkpointing.load(self, found)
        run_guards.apply_changes(self, changes)


def main(argv: list[str] | None = None) -> int:
    """``flowalign train RECIPE.yaml [key=value ...] [--resume latest|DIR] [--dry-run]`` for ``kind: llm``."""
    import argparse

    from flowalign.llm.config import load

    ap = argparse.ArgumentParser(prog="flowalign train", description="LLM RLVR training (GRPO family)")
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    ap.add_argument("--resume", default=None, help="checkpoint directory, or 'latest' in the run's checkpoints")
    ap.add_argument("--dry-run", action="store_true", help="validate the config, print it, exit")
    ap.add_argument("--overwrite", action="store_true", help="move a previous run in output_dir aside")
    ap.add_argument("--allow-config-change", nargs="+", default=[], metavar="KEY", help="keys --resume may change")
    args = ap.parse_intermixed_args(argv)
    try:
        cfg = load(args.recipe, args.overrides)
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    from flowalign.checkpoint import CheckpointError
    from flowalign.guards import NonFiniteError, ResumeConfigError, RunDirError

    try:  # refused before training (exit 2): a used output_dir, a changed config, an unreadable checkpoint
        if not args.resume:
            run_guards.prepare_output_dir(cfg, args.overwrite)
        tr = LLMTrainer(cfg)
        if args.resume:
            tr.resume(args.resume, args.allow_config_change)
    except (FileNotFoundError, RunDirError, ResumeConfigError, CheckpointError) as e:
        print(f"flowalign train: error: {e}", file=sys.stderr)
        return 2
    try:
        tr.train(max(0, cfg.train.steps - tr.step))
    except NonFiniteError as e:
        print(f"flowalign train: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"final_eval": tr.evaluate()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
