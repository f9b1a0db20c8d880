"""The worker: one process per rank, started by the launcher (`python -m llmtrain.train RUN_DIR`).

It reads everything from the run folder the CLI prepared (recipe.resolved.yaml, data.json), builds
the model and the DeepSpeed engine, and trains: LR as a pure function of the step, evaluation,
checkpoints with every rank's RNG state and the sampler position, and a clean stop on
SIGTERM/SIGINT/SIGUSR1 (finish the step, save, exit 0).

Under `srun` (`--slurm`) it maps SLURM's task variables to the ones torch.distributed reads.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
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

from llmtrain.train.checkpoint import prune, resolve_resume, tag_for, write_meta
from llmtrain.data.packing import load_split
from llmtrain.data.prepare import PreparedData
from llmtrain.data.sampler import ResumableSampler
from llmtrain.data.tokenizer import token_bytes
from llmtrain.errors import UserError
from llmtrain.heads.temperature import attach_temperature
from llmtrain.train.init_from import load_module_weights, resolve_init_from
from llmtrain.train.memory import memory_source, oom_snapshot, peak_bytes
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
    """Set by a stop signal; ranks agree on it at step boundaries so all of them save together."""

    def __init__(self):
        self.signal_name: str | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.signal_name else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class Worker:
    def __init__(self, run_dir: Path, resume: str | None, stop_after: int | None, slurm: bool = False):
        import deepspeed

        self.run_dir = run_dir
        self.recipe = Recipe.model_validate(yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text()))
        self.data = PreparedData.from_json((run_dir / "data.json").read_text())
        self.stop_after = stop_after
        self.stop = StopFlag()

        r = self.recipe
        if slurm:
            os.environ.update(rank_env(os.environ, r.launch.master_port))
            if int(os.environ["WORLD_SIZE"]) != r.world_size:
                raise UserError(f"SLURM_NTASKS={os.environ['WORLD_SIZE']} but the recipe has launch.nodes × "
                                f"launch.ranks_per_node = {r.world_size}; submit with matching --nodes and "
                                "--ntasks-per-node (llmtrain launch slurm writes both)")
        deepspeed.init_distributed(verbose=False)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
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
        if checkpoint is not None:
            self._load(checkpoint)

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
        tag_dir = resolve_resume(resume, self.run_dir)
        if tag_dir is None:
            return None
        return checkpoint_to_load(tag_dir, self.world, self.recipe.deepspeed.zero_stage, may_convert=False)

    def _save(self) -> Path:
        ckpt_dir = self.run_dir / "checkpoints"
        tag = tag_for(self.step)
        states = [None] * self.world
        dist.all_gather_object(states, rng_state())
        client = {"step": self.step, "tokens_seen": self.tokens_seen, "train_seconds": self.train_seconds,
                  "sampler": self.sampler.state_dict(),
                  "rng": states, "world_size": self.world, "universal_checkpoint_info": {}}
        self.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client)
        dist.barrier()
        if self.rank == 0:
            write_meta(ckpt_dir / tag, {
                "step": self.step, "tokens_seen": self.tokens_seen, "world_size": self.world,
                "identity": self.recipe.identity(), "tokenizer_hash": self.data.tokenizer_hash,
                "recipe": self.recipe.model_dump(mode="json"), "saved_at": time.time(),
            })
            prune(ckpt_dir, self.recipe.checkpoint.keep_last)
        dist.barrier()
        return ckpt_dir / tag

    def _load(self, tag_dir: Path) -> None:
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.engine.optimizer.param_groups]
        path, client = self.engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                                   load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {tag_dir}")
        self._repair_optimizer_after_load(hyper)
        self.step, self.tokens_seen = client["step"], client["tokens_seen"]
        self.train_seconds = client.get("train_seconds", 0.0)
        self.sampler.load_state_dict(client["sampler"])
        # RNG streams are per rank: on another world size they cannot be matched, so they stay
        # freshly seeded. The model has no dropout, so no training step draws from them today.
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
        dist.all_reduce(sums)
        nll, nbytes, ntok = sums[0].item(), sums[1].item(), sums[2].item()
        out = {f"val_top{k}": sums[3 + i].item() / ntok for i, k in enumerate((1, 5, 10))}
        if head.is_distribution:
            out.update(val_loss=nll / ntok, val_ppl=math.exp(min(nll / ntok, 700)), val_bpb=nll / (math.log(2) * nbytes))
        if tempered:
            dist.all_reduce(tau_sums)
            dist.all_reduce(tau_range, op=dist.ReduceOp.MIN)
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
        global_tokens = r.train.micro_batch * r.train.grad_accum * self.world * r.model.seq_len
        end = r.train.steps if self.stop_after is None else min(r.train.steps, self.step + self.stop_after)
        reason, last_saved = "complete", None
        window_start, window_tokens = time.perf_counter(), 0
        peak_bytes(reset=True)
        while self.step < end:
            step_start = time.perf_counter()
            loss, head_metrics = self._train_step(lr_at(self.step, r.train), temperature_lr_at(self.step, r))
            self.train_seconds += time.perf_counter() - step_start
            self.step += 1
            self.tokens_seen += global_tokens
            window_tokens += global_tokens
            stopping = self.stop.agreed()
            if self.step % r.train.log_every == 0 or self.step == end or stopping:
                dist.all_reduce(loss)
                now = time.perf_counter()
                record = {"step": self.step, "loss": loss.item() / self.world, "lr": lr_at(self.step - 1, r.train),
                          "tokens_seen": self.tokens_seen, "train_s": round(self.train_seconds, 3),
                          "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                          "peak_mem_bytes": self._peak_memory(), **self._reduce_metrics(head_metrics)}
                if r.temperature.enabled:  # read back from the optimizer: the LR the network trains at
                    record["lr_temperature"] = next(g["lr"] for g in self.engine.optimizer.param_groups
                                                    if g.get("lr_kind") == "temperature")
                if sink:
                    sink.log(record)
                window_start, window_tokens = time.perf_counter(), 0
            if self.step % r.eval.every == 0 or self.step == r.train.steps:
                record = {"step": self.step, "train_s": round(self.train_seconds, 3), **self.evaluate()}
                if sink:
                    sink.log(record)
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
        if sink:
            sink.close()
            self._report(reason, last_saved)
        return 0

    def _train_step(self, lr: float, temperature_lr: float) -> tuple[torch.Tensor, dict[str, list[float]]]:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = temperature_lr if group.get("lr_kind") == "temperature" else lr
        total = torch.zeros(())
        metrics: dict[str, list[float]] = {}
        accum = self.recipe.train.grad_accum
        for _ in range(accum):
            block = self.train_blocks[self.sampler.next_indices()].to(self.device)
            out = self.engine(block[:, :-1], block[:, 1:])
            self.engine.backward(out.loss)
            self.engine.step()
            total += out.loss.detach().float().cpu()
            for key, value in out.metrics.items():
                metrics.setdefault(key, []).append(value)
        return total / accum, metrics

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
            dist.all_reduce(value, op=op)
            out[key] = value.item()
        return out

    def _peak_memory(self) -> int:
        """Largest per-rank peak since the last record."""
        peak = torch.tensor([float(peak_bytes(reset=True))])
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        return int(peak.item())

    def _report(self, reason: str, saved: Path | None) -> None:
        status = {"reason": reason, "step": self.step, "steps": self.recipe.train.steps,
                  "checkpoint": str(saved) if saved else None, "memory_source": memory_source()}
        (self.run_dir / "status.yaml").write_text(yaml.safe_dump(status, sort_keys=False))
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
    parser.add_argument("--slurm", action="store_true", help="started by srun: map SLURM_* to RANK, WORLD_SIZE, ...")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the DeepSpeed launcher")
    args = parser.parse_args(argv)
    try:
        worker = Worker(args.run_dir, args.resume, args.stop_after, slurm=args.slurm)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return UserError.exit_code
    with oom_snapshot(worker.run_dir, worker.rank):  # CUDA: dump allocator history on OOM
        code = worker.train()
    dist.barrier()
    dist.destroy_process_group()
    return code


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
    that finished. Everything we own is flushed and closed by this point."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_skipping_finalizers(main())
