"""The worker: one process per rank, started by the launcher (`python -m llmtrain.train RUN_DIR`).

It reads everything from the run folder the CLI prepared (recipe.resolved.yaml, data.json), builds
the model and the DeepSpeed engine, and trains: LR as a pure function of the step, evaluation,
checkpoints with every rank's RNG state and the sampler position, and a clean stop on
SIGTERM/SIGINT/SIGUSR1 (finish the step, save, exit 0; a second SIGINT/SIGTERM exits at once).

Faults: a non-finite loss, gradient norm or weight, or a step DeepSpeed skipped, is agreed on by
every rank each step (train.on_nonfinite: stop, or skip up to train.max_skipped in a row); no
checkpoint is saved unless every weight is finite. Collectives time out after launch.timeout_s,
and each rank's heartbeat lets the launcher's watchdog end a job whose ranks stopped. A save that
fails for lack of space removes its partial folder and ends the job with "no space left on device".

Under `srun` (`--slurm`) it maps SLURM's task variables to the ones torch.distributed reads.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import math
import os
import random
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

# torch.distributed deprecates a call that DeepSpeed makes; the warning is theirs, not the user's.
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
import torch.distributed as dist
import yaml

from llmtrain.train.checkpoint import (checkpoint_bytes, checkpoint_files, complete_checkpoints, file_entry, prune,
                                       resolve_resume, tag_for, write_meta)
from llmtrain.data.packing import load_split
from llmtrain.data.prepare import PreparedData
from llmtrain.data.sampler import ResumableSampler
from llmtrain.data.tokenizer import token_bytes
from llmtrain.errors import UserError
from llmtrain.heads.temperature import attach_temperature
from llmtrain.train.init_from import load_module_weights, resolve_init_from
from llmtrain.train.heartbeat import Heartbeat
from llmtrain.train.memory import format_bytes, memory_source, oom_snapshot, peak_bytes
from llmtrain.train.mfu import model_flops_per_token, peak_flops
from llmtrain.train.status import EXIT_DIVERGED, EXIT_FAILED, write_status
from llmtrain.model.language_model import LanguageModel, count_parameters
from llmtrain.recipe import Recipe
from llmtrain.train.slurm_env import rank_env
from llmtrain.train.engine_config import deepspeed_config, param_groups
from llmtrain.train.schedule import lr_at, temperature_lr_at
from llmtrain.train.universal import checkpoint_to_load, is_universal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_model(recipe: Recipe, vocab_size: int, ds_config: dict, load_weights: bool = True) -> LanguageModel:
    """The recipe's model with the same initial weights on every rank. A Hugging Face body under
    ZeRO-3 is built partitioned (deepspeed.zero.Init) with the weights loaded into the partitions:
    transformers does that while a HfDeepSpeedConfig of the engine's config is alive, and asks again
    later (it holds it weakly), so the model keeps it."""
    keep = None
    if recipe.model.hf and recipe.deepspeed.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds_config)
    torch.manual_seed(recipe.train.seed)
    model = LanguageModel(recipe.model, recipe.head_spec(), vocab_size, load_weights=load_weights)
    model.hf_deepspeed_config = keep
    return model


class StopFlag:
    """Set by a stop signal; ranks agree on it at step boundaries so all of them save together.
    A second SIGINT/SIGTERM means "now": the rank exits at once (a save it was in stays invisible)."""

    def __init__(self):
        self.signal_name: str | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signal_name and signum != signal.SIGUSR1:
            os.write(2, f"second {signal.Signals(signum).name}: exiting now without saving\n".encode())
            os._exit(128 + signum)
        self.signal_name = signal.Signals(signum).name


def reduced(values: torch.Tensor, device: torch.device, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce of small host values through the ranks' device, returned on the host: NCCL (the
    backend on CUDA) reduces device tensors only; gloo takes them where they are."""
    out = values.to(device)
    dist.all_reduce(out, op=op)
    return out.cpu()


def agree(stop: bool, bad: bool, device: torch.device) -> tuple[bool, bool]:
    """One collective per step: has any rank been asked to stop, has any seen a non-finite value."""
    flags = reduced(torch.tensor([float(stop), float(bad)]), device, dist.ReduceOp.MAX)
    return bool(flags[0].item()), bool(flags[1].item())


class Diverged(Exception):
    """Training produced non-finite values: nothing more is saved, the run exits 3."""


class Worker:
    def __init__(self, run_dir: Path, resume: str | None, stop_after: int | None, slurm: bool = False,
                 allow_data_change: bool = False):
        import deepspeed

        self.run_dir = run_dir
        self.recipe = Recipe.model_validate(yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text()))
        self.data = PreparedData.from_json((run_dir / "data.json").read_text())
        self.stop_after = stop_after
        self.allow_data_change = allow_data_change
        self.stop = StopFlag()

        r = self.recipe
        if slurm:
            os.environ.update(rank_env(os.environ, r.launch.master_port))
            if int(os.environ["WORLD_SIZE"]) != r.world_size:
                raise UserError(f"SLURM_NTASKS={os.environ['WORLD_SIZE']} but the recipe has launch.nodes × "
                                f"launch.ranks_per_node = {r.world_size}; submit with matching --nodes and "
                                "--ntasks-per-node (llmtrain launch slurm writes both)")
        # Each rank on its own GPU before the first collective: NCCL binds its communicator to the
        # current device and otherwise guesses it from the global rank (seen warning on an H200).
        deepspeed.get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))
        # A collective that waits longer than this raises instead of blocking for ever.
        deepspeed.init_distributed(verbose=False, timeout=datetime.timedelta(seconds=r.launch.timeout_s))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.heartbeat = Heartbeat(run_dir, self.rank)
        global _HEARTBEAT
        _HEARTBEAT = self.heartbeat
        if slurm and self.rank == 0:  # no CLI around srun to say so
            write_status(run_dir, "running", step=None, steps=r.train.steps)
        unlink_deepspeed_shm()
        checkpoint = self._resolve_checkpoint(resume)
        self.device = torch.device(deepspeed.get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0))))

        ds_config = deepspeed_config(r, self.world, load_universal=checkpoint is not None and is_universal(checkpoint))
        # On resume the checkpoint holds the weights: a Hugging Face folder's are not read again.
        model = build_model(r, self.data.vocab_size, ds_config, load_weights=checkpoint is None)
        if r.data.document_mask:
            model.body.document_eos = self.data.eos_id
        model.head.prepare(torch.from_numpy(np.load(self.data.counts_path)))
        if r.temperature.enabled:
            self._add_temperature(model, resume)
        self.n_params = count_parameters(model)
        self.flops_per_token = model_flops_per_token(model, r.model.layers, r.model.d_model, r.model.seq_len,
                                                     r.train.micro_batch * r.model.seq_len)
        self.engine, *_ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, r.train.weight_decay, r.temperature.weight_decay),
            config=ds_config,
        )
        # Memory-mapped: a rank holds only the blocks of its current micro-batch.
        self.train_blocks = load_split(self.data.train_path, self.data.seq_len + 1)
        self.val_blocks = load_split(self.data.val_path, self.data.seq_len + 1)
        self.token_bytes = token_bytes(self.data.tokenizer_path).to(self.device)
        self.sampler = ResumableSampler(len(self.train_blocks), r.train.micro_batch, self.rank, self.world, r.train.seed)
        self.step, self.tokens_seen = 0, 0
        self.train_seconds = 0.0  # wall time inside training steps: compares heads at equal time
        # A distinct stream per rank for anything random during training (dropout, sampling).
        seed_all(r.train.seed * 1000 + 17 + self.rank)
        # Checkpoints saved by this attempt not yet followed by a finite step; the newest that was.
        self.unconfirmed: list[Path] = []
        self.confirmed: Path | None = checkpoint
        if checkpoint is not None:
            self._load(checkpoint)
        self.peak_flops, self.peak_source = self._peak_flops()
        self.heartbeat.beat()

    def _peak_flops(self) -> tuple[float, str]:
        """The ranks' FLOP/s together, MFU's denominator. Every rank measures at the same moment:
        ranks that share a CPU then share its rate, as they do while training."""
        dist.barrier()
        rate, source = peak_flops(self.device, self.recipe.train.precision)
        return reduced(torch.tensor([rate], dtype=torch.float64), self.device).item(), source

    def _add_temperature(self, model: LanguageModel, resume: Path | None) -> None:
        """Attach the network after the body and head are initialized, so they get the same
        weights with and without it. frozen_body: load the body and head from init_from (not on
        resume: the run's checkpoint holds them) and train the network only."""
        t = self.recipe.temperature
        attach_temperature(model.head, **t.network_options())
        if t.mode != "frozen_body":
            return
        if resume is None:
            load_module_weights(model, resolve_init_from(self.recipe, self.data.tokenizer_hash))
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.head.temperature.parameters():
            p.requires_grad_(True)

    # ------------------------------------------------------------------ checkpoints

    def _resolve_checkpoint(self, resume: str | None) -> Path | None:
        """`--resume auto` (srun starts workers directly, without the CLI) or a folder; its universal
        copy when this world size or ZeRO stage differs from the saved one. Only the CLI (or the
        preparing step of launch/slurm.sbatch) converts: every rank must load the same folder."""
        # The CLI verified checksums already (or, under srun, the preparing step): sizes here.
        tag_dir = resolve_resume(resume, self.run_dir, checksums=False,
                                 warn=print if self.rank == 0 else lambda _: None)
        if tag_dir is None:
            return None
        return checkpoint_to_load(tag_dir, self.world, self.recipe.deepspeed.zero_stage, may_convert=False)

    def _save(self) -> Path:
        """Save a checkpoint on every rank; rank 0 seals it with the manifest (every file's size and
        SHA-256, hashed by all ranks in turn) once all files are written and fsynced. Weights that
        are not all finite are never saved (Diverged)."""
        if not self._weights_finite():
            raise Diverged("non-finite weights")
        ckpt_dir = self.run_dir / "checkpoints"
        tag = tag_for(self.step)
        if self.rank == 0:
            # A folder of this step from an abandoned later attempt (this run resumed from an
            # older checkpoint): replace it whole, so no old file or marker outlives the save.
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
            self._warn_if_no_room(ckpt_dir, tag)
        states = [None] * self.world
        dist.all_gather_object(states, rng_state())
        client = {"step": self.step, "tokens_seen": self.tokens_seen, "train_seconds": self.train_seconds,
                  "sampler": self.sampler.state_dict(),
                  "rng": states, "world_size": self.world, "universal_checkpoint_info": {}}
        try:
            self.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client)
            dist.barrier()
            names = checkpoint_files(ckpt_dir / tag)
            mine = {name: file_entry(ckpt_dir / tag / name) for name in names[self.rank::self.world]}
        except Exception as e:  # noqa: BLE001  (disk full is reported; anything else re-raised)
            self._save_failed(ckpt_dir / tag, e)
            raise
        parts = [None] * self.world
        dist.all_gather_object(parts, mine)
        if self.rank == 0:
            write_meta(ckpt_dir / tag, {
                "step": self.step, "tokens_seen": self.tokens_seen, "world_size": self.world,
                "identity": self.recipe.identity(), "tokenizer_hash": self.data.tokenizer_hash,
                "corpus_hash": self.data.corpus_hash,
                "recipe": self.recipe.model_dump(mode="json"), "saved_at": time.time(),
                "files": dict(sorted((name, entry) for part in parts for name, entry in part.items())),
            })
        dist.barrier()
        self.heartbeat.beat()
        self.unconfirmed.append(ckpt_dir / tag)
        return ckpt_dir / tag

    def _confirm_checkpoints(self) -> None:
        """A step after a save came out finite: the saved weights were sound, and older checkpoints
        may now be pruned. Pruning waits for this because a step can leave huge but finite weights
        that only the next step shows to be broken: the checkpoint before it must survive."""
        if not self.unconfirmed:
            return
        self.confirmed = self.unconfirmed[-1]
        self.unconfirmed = []
        if self.rank == 0:
            prune(self.run_dir / "checkpoints", self.recipe.checkpoint.keep_last)

    def _weights_finite(self) -> bool:
        """Every rank checks its share of the weights (its ZeRO-3 partition, or every world-th
        parameter), and all agree."""
        params = list(self.engine.module.parameters())
        if self.recipe.deepspeed.zero_stage == 3:
            local = [p.ds_tensor for p in params if hasattr(p, "ds_tensor")]
        else:
            local = [p.data for p in params[self.rank::self.world]]
        ok = all(bool(torch.isfinite(t).all()) for t in local if t.numel())
        return bool(reduced(torch.tensor([float(ok)]), self.device, dist.ReduceOp.MIN).item())

    def _warn_if_no_room(self, ckpt_dir: Path, tag: str) -> None:
        done = complete_checkpoints(ckpt_dir)
        if not done:
            return
        need, free = checkpoint_bytes(done[-1]), shutil.disk_usage(ckpt_dir).free
        if need > free:
            print(f"warning: checkpoint {tag} needs about {format_bytes(need)} (the size of {done[-1].name}) but only "
                  f"{format_bytes(free)} is free on the device holding {ckpt_dir}; the save may fail (older "
                  "checkpoints are kept)", file=sys.stderr, flush=True)

    def _save_failed(self, tag_dir: Path, error: Exception) -> None:
        """A save that ran out of space: remove the partial checkpoint (it would never be resumed),
        say so with the path, record the failure and end this rank (the launcher ends the others).
        Any other error is left to propagate."""
        if not disk_full(error, tag_dir.parent):
            return
        shutil.rmtree(tag_dir, ignore_errors=True)
        kept = complete_checkpoints(tag_dir.parent)
        message = (f"no space left on device while saving checkpoint {tag_dir} (rank {self.rank}); the partial "
                   f"checkpoint was removed; the last complete one, {kept[-1] if kept else 'none'}, is kept. Free space "
                   "there, then continue with --resume auto")
        print(f"error: {message}", file=sys.stderr, flush=True)
        with contextlib.suppress(OSError):
            write_status(self.run_dir, "failed", reason=message, step=self.step, steps=self.recipe.train.steps,
                         checkpoint=str(kept[-1]) if kept else None)
        exit_skipping_finalizers(EXIT_FAILED)

    def _load(self, tag_dir: Path) -> None:
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.engine.optimizer.param_groups]
        path, client = self.engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                                   load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {tag_dir}")
        self._repair_optimizer_after_load(hyper)
        self.step, self.tokens_seen = client["step"], client["tokens_seen"]
        self.train_seconds = client.get("train_seconds", 0.0)
        try:
            self.sampler.load_state_dict(client["sampler"])
        except UserError:
            if not self.allow_data_change:
                raise
            if self.rank == 0:  # another corpus: its own order from the start, the step count goes on
                print("note: --allow-data-change: the data changed size; its order starts from the beginning",
                      file=sys.stderr, flush=True)
        # RNG streams are per rank: on another world size they cannot be matched, so they stay
        # freshly seeded. The temperature network's dropout draws from them: only a resume on the
        # same world size continues its masks exactly (the body and heads draw nothing).
        if client.get("world_size") == self.world:
            set_rng_state(client["rng"][self.rank])

    def _repair_optimizer_after_load(self, hyper: list[dict]) -> None:
        """Undo two faults of DeepSpeed's ZeRO-3 universal load (0.19.8, stage3.py
        load_hp_checkpoint_state_from_checkpoint_dir_stage3): it copies the first parameter
        group's hyperparameters onto every group (the norms got weight decay, TempNet's group
        the body's LR kind), and it hands every group one shared `step` tensor, which Adam then
        advances once per group per step (wrong bias correction). The recipe's hyperparameters
        win over any checkpoint's (LR is set every step); each state gets its own step."""
        for group, own in zip(self.engine.optimizer.param_groups, hyper):
            group.update(own)
        inner = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        for state in inner.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()

    # ------------------------------------------------------------------ evaluation

    def _head_params(self):
        """ZeRO-3 gathers the head's weights only inside its forward; eval calls other methods."""
        if self.recipe.deepspeed.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.engine.module.head.parameters()))
        return contextlib.nullcontext()

    @torch.no_grad()
    def evaluate(self) -> dict:
        model = self.engine.module
        head = model.head
        mb, batches = self.recipe.train.micro_batch, self.recipe.eval.batches
        n_val = len(self.val_blocks)
        tempered = head.temperature is not None
        sums = torch.zeros(6, dtype=torch.float64)  # nll, bytes, tokens, top1, top5, top10
        tau_sums = torch.zeros(2, dtype=torch.float64)  # Σ τ, tempered nll
        tau_range = torch.full((2,), math.inf, dtype=torch.float64)  # min τ and −max τ: one MIN reduction
        model.eval()  # the temperature network's dropout; the body has none
        for b in range(batches):
            start = ((b * self.world + self.rank) * mb) % max(1, n_val - mb + 1)
            block = self.val_blocks[start:start + mb].to(self.device)
            hidden = model.body(block[:, :-1]).flatten(0, 1)
            targets = block[:, 1:].flatten()
            with self._head_params():
                logprobs, top = model.logprobs_and_topk(hidden, targets, 10)  # one pass over the scores
                if logprobs is not None:
                    sums[0] -= logprobs.double().sum().cpu()
                if tempered:  # perplexity above is at τ = 1, as the paper's; here the tempered one
                    tau = head.predict_temperature(hidden)
                    tau_sums[0] += tau.double().sum().cpu()
                    tau_sums[1] -= head.tempered_token_logprobs(hidden, targets, tau).double().sum().cpu()
                    tau_range = torch.minimum(tau_range, torch.stack([tau.min(), -tau.max()]).double().cpu())
            hits = (top == targets[:, None]).cumsum(1)
            sums[1] += self.token_bytes[targets].sum().cpu()
            sums[2] += targets.numel()
            sums[3:] += torch.stack([hits[:, k - 1].sum() for k in (1, 5, 10)]).double().cpu()
        model.train()
        sums = reduced(sums, self.device)
        nll, nbytes, ntok = sums[0].item(), sums[1].item(), sums[2].item()
        out = {f"val_top{k}": sums[3 + i].item() / ntok for i, k in enumerate((1, 5, 10))}
        if head.is_distribution:
            out.update(val_loss=nll / ntok, val_ppl=math.exp(min(nll / ntok, 700)), val_bpb=nll / (math.log(2) * nbytes))
        if tempered:
            tau_sums = reduced(tau_sums, self.device)
            tau_range = reduced(tau_range, self.device, dist.ReduceOp.MIN)
            tempered_nll = tau_sums[1].item() / ntok
            out.update(val_tau_mean=tau_sums[0].item() / ntok, val_tau_min=tau_range[0].item(),
                       val_tau_max=-tau_range[1].item(), val_loss_tau=tempered_nll,
                       val_ppl_tau=math.exp(min(tempered_nll, 700)))
        return out

    # ------------------------------------------------------------------ training

    def train(self) -> int:
        from llmtrain.train.metrics import MetricsSink

        r = self.recipe
        sink = MetricsSink(self.run_dir, r.train.steps, self.step) if self.rank == 0 else None
        if sink and self.step == 0:
            network = f" + temperature network ({r.temperature.mode})" if r.temperature.enabled else ""
            sink.message(f"[bold]{r.name}[/]: {self.n_params / 1e6:.2f}M parameters, head {r.head.type}{network}, "
                         f"ZeRO-{r.deepspeed.zero_stage}, {self.world} ranks, {r.train.precision}")
        if sink:
            sink.message(f"MFU of {self.flops_per_token / 1e6:.3g} MFLOP/token against {self.peak_flops / 1e12:.3g} "
                         f"TFLOP/s ({self.world} ranks, {self.peak_source})")
        global_tokens = r.train.micro_batch * r.train.grad_accum * self.world * r.model.seq_len
        end = r.train.steps if self.stop_after is None else min(r.train.steps, self.step + self.stop_after)
        reason, last_saved = "complete", None
        window_start, window_tokens = time.perf_counter(), 0
        skipped_in_a_row = 0
        peak_bytes(reset=True)
        try:
            while self.step < end:
                step_start = time.perf_counter()
                loss, head_metrics, problem = self._train_step(lr_at(self.step, r.train), temperature_lr_at(self.step, r))
                self.train_seconds += time.perf_counter() - step_start
                self.step += 1
                self.tokens_seen += global_tokens
                window_tokens += global_tokens
                self.heartbeat.beat()
                stopping, bad = agree(self.stop.signal_name is not None, problem is not None, self.device)
                diverged = None
                if bad:  # every rank takes this branch: the flag was agreed
                    problem = problem or "non-finite values on another rank"
                    skipped_in_a_row += 1
                    if r.train.on_nonfinite == "stop":
                        diverged = problem
                    elif not self._weights_finite():  # ZeRO-3 applies non-finite fp32 gradients
                        diverged = f"{problem}, and the step was applied (non-finite weights)"
                    elif skipped_in_a_row >= r.train.max_skipped:
                        diverged = f"{problem}; {skipped_in_a_row} steps in a row skipped (train.max_skipped)"
                    elif sink:
                        sink.message(f"[yellow]warning[/]: step {self.step} skipped: {problem}")
                else:
                    skipped_in_a_row = 0
                    self._confirm_checkpoints()
                if self.step % r.train.log_every == 0 or self.step == end or stopping or bad:
                    loss = reduced(loss, self.device)
                    tokens_per_s = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                    record = {"step": self.step, "loss": loss.item() / self.world, "lr": lr_at(self.step - 1, r.train),
                              "tokens_seen": self.tokens_seen, "train_s": round(self.train_seconds, 3),
                              "tokens_per_s": tokens_per_s, "mfu": self.flops_per_token * tokens_per_s / self.peak_flops,
                              "peak_mem_bytes": self._peak_memory(), **self._reduce_metrics(head_metrics)}
                    if bad:
                        record["skipped"] = True
                    if r.temperature.enabled:  # read back from the optimizer: the LR the network trains at
                        record["lr_temperature"] = next(g["lr"] for g in self.engine.optimizer.param_groups
                                                        if g.get("lr_kind") == "temperature")
                    if sink:
                        sink.log(record)
                    window_start, window_tokens = time.perf_counter(), 0
                if diverged:
                    raise Diverged(diverged)
                if self.step % r.eval.every == 0 or self.step == r.train.steps:
                    record = {"step": self.step, "train_s": round(self.train_seconds, 3), **self.evaluate()}
                    if sink:
                        sink.log(record)
                    self.heartbeat.beat()
                    window_start = time.perf_counter()  # tokens/s measures training, not eval
                if self.step % r.checkpoint.every == 0 or self.step == end or stopping:
                    last_saved = self._save()
                    window_start = time.perf_counter()
                if stopping:
                    reason = f"stopped by {self.stop.signal_name or 'a signal on another rank'}"
                    break
            if self.step < r.train.steps and reason == "complete":
                reason = f"stopped after {self.stop_after} steps (--stop-after)"
            if last_saved is None and self.step > 0:
                last_saved = self._save()
            self._confirm_checkpoints()  # the run ends here: its last step was checked already
        except Diverged as e:
            if sink:
                sink.close()
            self._report_divergence(str(e))
            return EXIT_DIVERGED
        if sink:
            sink.close()
            self._report(reason, last_saved)
        return 0

    def _train_step(self, lr: float, temperature_lr: float) -> tuple[torch.Tensor, dict[str, list[float]], str | None]:
        """One optimizer step; also what was non-finite in it on this rank (None: nothing). Under
        ZeRO-1/2 DeepSpeed skips a step whose gradients overflow; under ZeRO-0 we do (the
        gradients are dropped before the optimizer sees them)."""
        for group in self.engine.optimizer.param_groups:
            group["lr"] = temperature_lr if group.get("lr_kind") == "temperature" else lr
        total = torch.zeros(())
        metrics: dict[str, list[float]] = {}
        accum = self.recipe.train.grad_accum
        skipped_before = self.engine.skipped_steps
        problem = None
        for _ in range(accum):
            block = self.train_blocks[self.sampler.next_indices()].to(self.device)
            out = self.engine(block[:, :-1], block[:, 1:])
            self.engine.backward(out.loss)
            if self.recipe.deepspeed.zero_stage == 0 and self.engine.is_gradient_accumulation_boundary():
                problem = problem or self._drop_nonfinite_gradients()
            self.engine.step()
            total += out.loss.detach().float().cpu()
            for key, value in out.metrics.items():
                metrics.setdefault(key, []).append(value)
        loss = total / accum
        norm = self.engine.get_global_grad_norm()
        if not math.isfinite(loss.item()):
            problem = f"non-finite loss ({loss.item()})"
        elif norm is not None and not math.isfinite(float(norm)):
            problem = problem or f"non-finite gradient norm ({float(norm)})"
        elif self.engine.skipped_steps > skipped_before:
            problem = problem or "DeepSpeed skipped the step (gradient overflow)"
        return loss, metrics, problem

    def _drop_nonfinite_gradients(self) -> str | None:
        """ZeRO-0 applies whatever gradients it has: drop non-finite ones so the step is skipped
        (parameters without a gradient are left alone by the optimizer)."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        if not grads:
            return None
        norm = float(torch.nn.utils.get_total_norm(grads))
        if math.isfinite(norm):
            return None
        for p in self.engine.module.parameters():
            p.grad = None
        return f"non-finite gradient norm ({norm})"

    def _report_divergence(self, problem: str) -> None:
        last = str(self.confirmed) if self.confirmed else None
        later = [d.name for d in self.unconfirmed]
        doubt = (f" ({', '.join(later)}, saved after it, may hold damaged weights: the step after the save "
                 "diverged)") if later else ""
        message = (f"diverged at step {self.step}: {problem}; nothing was saved from step {self.step} on "
                   f"(train.on_nonfinite={self.recipe.train.on_nonfinite}); last good checkpoint: {last or 'none'}{doubt}")
        if self.rank == 0:
            print(f"error: {message}", file=sys.stderr, flush=True)
            write_status(self.run_dir, "diverged", reason=message, step=self.step, steps=self.recipe.train.steps,
                         checkpoint=last)

    def _reduce_metrics(self, metrics: dict[str, list[float]]) -> dict[str, float]:
        """The head's metrics of one step over micro-steps and ranks: *_min by min, *_max by max,
        the rest by mean. Every rank has the same keys (the same head)."""
        out = {}
        for key in sorted(metrics):
            values = torch.tensor(metrics[key], dtype=torch.float64)
            if key.endswith("_min"):
                value, op = values.min(), dist.ReduceOp.MIN
            elif key.endswith("_max"):
                value, op = values.max(), dist.ReduceOp.MAX
            else:
                value, op = values.mean() / self.world, dist.ReduceOp.SUM
            out[key] = reduced(value, self.device, op).item()
        return out

    def _peak_memory(self) -> int:
        """Largest per-rank peak since the last record."""
        return int(reduced(torch.tensor([float(peak_bytes(reset=True))]), self.device, dist.ReduceOp.MAX).item())

    def _report(self, reason: str, saved: Path | None) -> None:
        write_status(self.run_dir, "complete" if reason == "complete" else "stopped", reason=reason, step=self.step,
                     steps=self.recipe.train.steps, checkpoint=str(saved) if saved else None,
                     memory_source=memory_source())
        print(f"{reason} at step {self.step}/{self.recipe.train.steps}; run folder {self.run_dir}", flush=True)
        if self.step < self.recipe.train.steps:
            print(f"resume with: llmtrain run {self.run_dir / 'recipe.resolved.yaml'} --out {self.run_dir} --resume auto",
                  flush=True)


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmtrain.train", description="llmtrain worker (started by `llmtrain run`)")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--resume", default=None, help="checkpoint folder to continue from, or 'auto'")
    parser.add_argument("--stop-after", type=int, default=None)
    parser.add_argument("--allow-data-change", action="store_true", help="resume on another corpus")
    parser.add_argument("--slurm", action="store_true", help="started by srun: map SLURM_* to RANK, WORLD_SIZE, ...")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the DeepSpeed launcher")
    args = parser.parse_args(argv)
    try:
        worker = Worker(args.run_dir, args.resume, args.stop_after, slurm=args.slurm,
                        allow_data_change=args.allow_data_change)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return UserError.exit_code
    try:
        with oom_snapshot(worker.run_dir, worker.rank):  # CUDA: dump allocator history on OOM
            code = worker.train()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return UserError.exit_code
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        print(f"error: no space left on device: {e.filename or args.run_dir} (rank {worker.rank})", file=sys.stderr, flush=True)
        return EXIT_FAILED
    dist.barrier()
    dist.destroy_process_group()
    return code


def disk_full(error: BaseException, folder: Path) -> bool:
    """Did a write into `folder` fail for lack of space? torch.save reports ENOSPC as a bare
    "basic_ios::clear: iostream error" or "file write failed", so the free space decides too."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC or "No space left" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(folder).free < 64 * 2**20
    except OSError:
        return False


def unlink_deepspeed_shm() -> None:
    """DeepSpeed's CPU all-reduce gives each rank a ~66 MB POSIX shared-memory file,
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>, and never
    unlinks it: every run would leave its ranks' files in RAM until reboot (a test suite's worth
    filled 9 GB). init_distributed maps every rank's file before it returns, so after a barrier
    the names can go; the mappings stay valid. Call it on every rank right after
    init_distributed."""
    dist.barrier()
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
            f"{os.environ.get('MASTER_PORT')}_{dist.get_rank()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name)


def exit_skipping_finalizers(code: int) -> None:
    """Leave the process without interpreter finalization. DeepSpeed and gloo keep C++ threads
    alive past destroy_process_group; now and then one is still joinable while Python tears down,
    and the rank dies with "terminate called without an active exception" (SIGABRT) after a run
    that finished. Everything we own is flushed and closed by this point. The heartbeat file says
    the rank ended, with its code (the launcher's watchdog reads it)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if _HEARTBEAT is not None:
        _HEARTBEAT.close(code)
    os._exit(code)


_HEARTBEAT: Heartbeat | None = None  # this rank's, once it has one


if __name__ == "__main__":
    exit_skipping_finalizers(main())
