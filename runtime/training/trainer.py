"""The continued-training loop of an upcycled model: FSDP2 under torchrun, DCP checkpoints, resume.

    from upcycle.runtime.training import train
    train(args)          # args: examples/train.py's arguments (an argparse.Namespace or alike)

Steps: load a dense model and upcycle it (`args.spec`, `args.layers`), or load an upcycled output
folder; pack real English text (data.py) into sequences; train with the paper's recipe
(schedule.py: AdamW, linear warmup then cosine decay from a peak LR reset above the dense model's
final LR; the router aux loss through autograd) with gradient accumulation and clipping; validate
every `args.eval_every` steps; write router telemetry and metrics; checkpoint (DCP,
runtime/train_checkpoint.py) every `args.checkpoint_every` steps, keeping `args.keep`. Under
torchrun the model is sharded with FSDP2 (runtime/distributed.py `parallelize`). The run folder's
files are run_dir.py's. examples/train.py is the command line over this module.

Test hook: with `UPCYCLE_TRAIN_KILL_AT_STEP=N` in the environment (or `train(..., kill_at_step=N)`)
the process SIGKILLs itself at the start of step N (0-based), as a killed job would die; the
resume tests use it. Unset (the default): never.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from . import run_dir as rd
from .data import batch_for, byte_tokens, kjv_split, pack, token_split
from .schedule import adamw, param_groups, scheduler

KILL_AT_STEP_ENV = "UPCYCLE_TRAIN_KILL_AT_STEP"  # test hook: see the module doc


class Dist:
    """Rank, world size, device, and the mesh when several processes run."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu")
        self.mesh = None
        if self.world > 1:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            from torch.distributed.device_mesh import init_device_mesh

            self.mesh = init_device_mesh(self.device.type, (self.world,))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, *values: float) -> list:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def close(self):
        """Tear the process group down once every rank has finished (called on success only: after a
        failure the peers may never reach the barrier, and torchrun stops them anyway)."""
        if self.world > 1:
            dist.barrier()
            dist.destroy_process_group()


def relax_step(args) -> int | None:
    """The step from which per_slice routers route by plain top-K (None: never)."""
    return None if args.relax_routing_at >= 1.0 else int(round(args.relax_routing_at * args.steps))


def kill_step(kill_at_step: int | None = None) -> int:
    """The test hook's step: `kill_at_step`, else $UPCYCLE_TRAIN_KILL_AT_STEP, else -1 (never)."""
    return kill_at_step if kill_at_step is not None else int(os.environ.get(KILL_AT_STEP_ENV, "-1"))


# --- model and data ------------------------------------------------------------------------------

def model_path(args, models: dict | None = None) -> Path:
    """args.model as a folder: a name in `models` ({name: () -> folder}, e.g. the examples'
    "smollm2") is made by its function, anything else is a path."""
    if models and args.model in models:
        return Path(models[args.model]())
    return Path(args.model)


def load_data(args, models: dict | None = None):
    """-> tokenizer name, train sequences [n, L], validation sequences [m, L]."""
    if args.model == "tiny":
        train, val = kjv_split()
        return "bytes", pack(byte_tokens(train), args.seq_len), pack(byte_tokens(val), args.seq_len)
    from transformers import AutoTokenizer

    path = model_path(args, models)
    tok = AutoTokenizer.from_pretrained(str(path))
    train, val = token_split(tok, str(path))
    return str(path), pack(train, args.seq_len), pack(val, args.seq_len)


def build_model(args, log, models: dict | None = None):
    """-> (model, source description, resolved spec dict or None, kind): kind "dense" (to be
    upcycled with the spec), "dense-only" (--dense: continued as it is) or None (already upcycled)."""
    import upcycle
    from upcycle.specs import load_spec

    if args.model == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(args.seed)
        dense = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                             max_position_embeddings=max(args.seq_len, 128), bos_token_id=1,
                                             eos_token_id=2))
        source = {"kind": "tiny", "seed": args.seed}
    else:
        path = model_path(args, models)
        if (path / "upcycle.json").is_file():
            log(f"loading the upcycled model in {path}")
            return upcycle.load(path), {"kind": "upcycled", "path": str(path)}, None, None
        from transformers import AutoModelForCausalLM

        dense = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        source = {"kind": "dense", "path": str(path)}
    if args.dense:
        return dense, source, None, "dense-only"
    spec = load_spec(args.spec).to_dict()
    if args.layers:
        mode, _, n = args.layers.partition(":")
        spec["layers"] = "all" if mode == "all" else {mode: int(n)}
    if args.aux is not None:
        spec["router"]["aux_loss_coef"] = args.aux
    spec["verify"]["enabled"] = False  # the compiler's verification is the main job's business
    return dense, source, spec, "dense"


# --- steps ---------------------------------------------------------------------------------------

def autocast(args, device):
    enabled = args.dtype == "bf16" and args.world == 1
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def validate(model, val: torch.Tensor, args, d: Dist) -> float:
    """Mean next-token loss over the first args.eval_seqs validation sequences (all ranks)."""
    was = model.training
    model.eval()
    mine = val[: args.eval_seqs][d.rank::d.world]
    nll = count = 0.0
    for i in range(0, mine.shape[0], 4):
        ids = mine[i:i + 4].to(d.device)
        with autocast(args, d.device):
            logits = model(input_ids=ids).logits.float()
        nll += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                       ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    nll, count = d.sum(nll, count)
    model.train(was)
    return nll / max(count, 1)


def train_step(model, opt, sched, micro_batches: list, args, d: Dist) -> tuple[float, float, float]:
    """One optimizer step over this rank's micro-batches: (this rank's loss, gradient norm, LR used)."""
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for micro in micro_batches:
        ids = micro.to(d.device)
        with autocast(args, d.device):
            loss = model(input_ids=ids, labels=ids).loss / args.accum
        loss.backward()
        total += float(loss.detach())
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # DTensor under FSDP
    opt.step()
    lr = sched.get_last_lr()[0]
    sched.step()
    return total, grad_norm, lr


def step_record(step: int, loss: float, lr: float, grad_norm: float, tokens_per_s: float, stats: dict) -> dict:
    """metrics.jsonl's record of (0-based) `step`."""
    imbalance = max((s.max_over_mean_load for s in stats.values()), default=0.0)
    record = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
              "max_over_mean_load": imbalance}
    if stats:  # the output scale relative to the dense MLP, and how many tokens get complete MLPs
        mass = [s.combine_mass for s in stats.values()]
        record["combine_mass_mean"] = sum(mass) / len(mass)
        record["combine_mass_max"] = max(mass)
        record["complete_mlp_fraction"] = min(s.complete_mlp_fraction for s in stats.values())
    return record


def log_line(record: dict, steps: int) -> str:
    line = (f"step {record['step']}/{steps} loss {record['loss']:.4f} lr {record['lr']:.2e} "
            f"grad {record['grad_norm']:.2f} tok/s {record['tokens_per_s']:.0f} load max/mean "
            f"{record['max_over_mean_load']:.2f}")
    if "combine_mass_mean" in record:
        line += f" mass {record['combine_mass_mean']:.3f} complete {record['complete_mlp_fraction']:.3f}"
    return line


def keep_records_up_to(path: Path, step: int) -> None:
    """Drop the JSONL records of steps after `step` (a resumed run recomputes them)."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in lines))
    tmp.replace(path)


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prune_checkpoints(run: Path, keep: int) -> None:
    done = sorted((run / rd.CHECKPOINTS).glob("step-*"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# --- the run -------------------------------------------------------------------------------------

@dataclass
class Prepared:
    """A run ready for its first step: model (sharded), optimizer, schedule, data, where it starts."""

    model: object
    opt: object
    sched: object
    train: torch.Tensor
    val: torch.Tensor
    n_params: int
    start: int
    before: dict


def _model(args, d: Dist, run: Path, log, models, val, tok_name: str, resuming: bool):
    """The model to train (upcycled here, loaded, or dense) on the device, run.json written:
    (model, the dense model's validation loss or None, parameters)."""
    import upcycle

    model, source, spec, kind = build_model(args, log, models)
    dense_val = None
    dense_config = model.config.to_dict() if kind in ("dense", "dense-only") and hasattr(model, "config") else None
    if kind == "dense-only" and not resuming:
        model.to(d.device).eval()
        dense_val = validate(model, val, args, d)
        log(f"dense model: validation loss {dense_val:.4f} (perplexity {math.exp(dense_val):.2f}); continued as it is")
    if kind == "dense":
        model.to(d.device).eval()
        if not resuming:
            dense_val = validate(model, val, args, d)
            log(f"dense model: validation loss {dense_val:.4f} (perplexity {math.exp(dense_val):.2f})")
        t0 = time.perf_counter()
        model = upcycle.compile_upcycle(model.cpu(), spec)
        log(f"upcycled with {args.spec}{' layers ' + args.layers if args.layers else ''} in {time.perf_counter() - t0:.1f} s")
    model.to(d.device).train()
    n_params = sum(p.numel() for p in model.parameters())
    if d.main and not resuming:
        rd.write_run_info(run, args=vars(args), source=source, spec=spec, dense_config=dense_config,
                          tokenizer=tok_name, params=n_params, relax_routing_step=relax_step(args))
    return model, dense_val, n_params


def prepare(args, d: Dist, run: Path, log, models=None) -> Prepared:
    """Data, model (upcycled, run.json written), FSDP2, optimizer and schedule; resumed from the
    newest checkpoint with args.resume; the validation loss at step 0 (summary_start.json)."""
    from upcycle.runtime import set_aux_loss_scale
    from upcycle.runtime.distributed import parallelize
    from upcycle.runtime.train_checkpoint import latest_checkpoint, load_training_checkpoint

    tok_name, train, val = load_data(args, models)
    log(f"text: KJV Bible, train {train.shape[0]} x {args.seq_len} tokens (all books but John), "
        f"validation {min(args.eval_seqs, val.shape[0])} x {args.seq_len} (the Gospel of John)")
    resuming = args.resume and latest_checkpoint(run) is not None
    model, dense_val, n_params = _model(args, d, run, log, models, val, tok_name, resuming)
    parallelize(model, d.mesh, checkpointing=args.checkpointing, compile=args.compile,
                param_dtype=torch.bfloat16 if args.dtype == "bf16" else None)
    opt = adamw(param_groups(model, args.weight_decay), args.lr)
    sched = scheduler(opt, args)
    set_aux_loss_scale(model, 1.0 / args.accum)  # our loss is averaged over the micro-batches
    start, before = 0, None
    if resuming:
        ckpt = latest_checkpoint(run)
        start = load_training_checkpoint(ckpt, model, opt, sched)["step"]
        log(f"resumed from {ckpt} at step {start}")
        if d.main:  # records of steps after the checkpoint are about to be recomputed
            for name in (rd.METRICS, rd.ROUTER):
                keep_records_up_to(run / name, start)
        summary_path = run / rd.SUMMARY_START
        if summary_path.is_file():
            before = json.loads(summary_path.read_text())
    if before is None:
        before = {"dense_val_loss": dense_val, "upcycled_val_loss": validate(model, val, args, d)}
        log(f"upcycled model at step 0: validation loss {before['upcycled_val_loss']:.4f}")
        if d.main:
            (run / rd.SUMMARY_START).write_text(json.dumps(before))
    return Prepared(model, opt, sched, train, val, n_params, start, before)


def train(args, *, models: dict | None = None, kill_at_step: int | None = None) -> int:
    """Run (or resume) the training run `args` describes; returns 0. models: {name: () -> folder}
    for names args.model may give (examples/train.py: "smollm2"). kill_at_step: the test hook."""
    if not sys.stderr.isatty():  # transformers' loading bars: carriage returns in a log
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    d = Dist()
    args.world = d.world
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch % (d.world * args.accum):
        raise SystemExit(f"error: --batch {args.batch} must be a multiple of world size x --accum "
                         f"({d.world} x {args.accum})")
    run = Path(args.run_dir)
    log = print if d.main else (lambda *a, **k: None)
    if d.main:
        run.mkdir(parents=True, exist_ok=True)
    p = prepare(args, d, run, log, models)
    val_loss, tokens_seen, t_train = _loop(args, d, run, log, p, kill_step(kill_at_step))
    if val_loss is None:
        val_loss = validate(p.model, p.val, args, d)
    _finish(args, d, run, p, val_loss, tokens_seen, t_train)
    d.close()
    return 0


def _loop(args, d: Dist, run: Path, log, p: Prepared, kill_at: int):
    """The steps from p.start: -> (last validation loss or None, tokens timed, seconds timed)."""
    import upcycle
    from upcycle.runtime import TelemetryWriter, read_router_stats
    from upcycle.runtime.train_checkpoint import save_training_checkpoint
    from tqdm.auto import tqdm

    telemetry = TelemetryWriter(run / rd.ROUTER) if d.main else None
    metrics_path = run / rd.METRICS
    bar = tqdm(total=args.steps, initial=p.start, disable=not (d.main and sys.stderr.isatty()), unit="step")
    tokens_seen, t_train, val_loss = 0, 0.0, None
    relax_at = relax_step(args)
    for step in range(p.start, args.steps):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if relax_at is not None and step >= relax_at and upcycle.relax_routing(p.model):
            log(f"step {step}: per_slice routing relaxed to plain top-K for the last {args.steps - step} steps")
        t0 = time.perf_counter()
        micro = batch_for(step, p.train, batch=args.batch, accum=args.accum, seed=args.seed, rank=d.rank, world=d.world)
        total, grad_norm, lr = train_step(p.model, p.opt, p.sched, micro, args, d)
        stats = read_router_stats(p.model)
        (loss_sum,) = d.sum(total)
        dt = time.perf_counter() - t0
        step_tokens = args.batch * args.seq_len
        if step > p.start:  # the first step of a process pays for warm-up
            tokens_seen += step_tokens
            t_train += dt
        record = step_record(step, loss_sum / d.world, lr, grad_norm, step_tokens / dt, stats)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            val_loss = validate(p.model, p.val, args, d)
            record["val_loss"] = val_loss
            log(f"step {step + 1}: validation loss {val_loss:.4f} (perplexity {math.exp(val_loss):.2f})")
        if d.main:
            telemetry.write(step + 1, stats)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            if (step + 1) % args.log_every == 0 and bar.disable:
                print(log_line(record, args.steps), flush=True)
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps:
            save_training_checkpoint(rd.checkpoint_dir(run, step + 1), p.model, p.opt, scheduler=p.sched,
                                     step=step + 1, data_position=(step + 1) * args.batch)
            if d.main:
                prune_checkpoints(run, args.keep)
    bar.close()
    return val_loss, tokens_seen, t_train


def _finish(args, d: Dist, run: Path, p: Prepared, val_loss: float, tokens_seen: int, t_train: float) -> None:
    """summary.json, the load heatmap and the closing lines (rank 0)."""
    from upcycle.runtime import plot_load_heatmap

    summary = {
        "steps": args.steps, "world": d.world, "params": p.n_params,
        "tokens_per_s": tokens_seen / t_train if t_train else None,
        "peak_memory_mb": peak_memory_mb(d.device),  # this process (rank 0)
        "val_loss_dense": p.before.get("dense_val_loss"), "val_loss_start": p.before["upcycled_val_loss"],
        "val_loss_end": val_loss,
    }
    if not d.main:
        return
    (run / rd.SUMMARY).write_text(json.dumps(summary, indent=2))
    try:
        plot_load_heatmap(run / rd.ROUTER, run / rd.ROUTER_PNG)
    except (ImportError, ValueError) as exc:
        print(f"(no heatmap: {exc})")
    dense_txt = f"dense {summary['val_loss_dense']:.4f}, " if summary["val_loss_dense"] is not None else ""
    tps = f"{summary['tokens_per_s']:.0f}" if summary["tokens_per_s"] else "n/a"
    print(f"\ndone: {args.steps} steps on {d.world} process(es); {tps} tokens/s; peak memory "
          f"{summary['peak_memory_mb']:.0f} MB per process")
    print(f"validation loss: {dense_txt}upcycled at start {summary['val_loss_start']:.4f} -> "
          f"{summary['val_loss_end']:.4f} after training (perplexity {math.exp(summary['val_loss_end']):.2f})")
    print(f"outputs in {run}: metrics.jsonl, router.jsonl, router_load.png, checkpoints/, summary.json")


__all__ = ["KILL_AT_STEP_ENV", "Dist", "Prepared", "relax_step", "kill_step", "model_path", "load_data", "build_model",
           "autocast", "validate", "train_step", "step_record", "log_line", "keep_records_up_to", "peak_memory_mb",
           "prune_checkpoints", "prepare", "train"]
