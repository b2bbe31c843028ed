"""Pre-flight budget: refuse a conversion that would not fit, before any tensor is allocated.

Why: the plan (made on the meta device, no memory) already knows every output tensor's bytes, so an
`experts.expansion` of 100000 or a full disk can be refused in a second, with numbers, instead of
after minutes with the OOM killer ending some other process or a half-written output. The checks:

- memory: the conversion's peak (in memory: the dense model + every new MoE layer + mapping and
  verification temporaries; streaming: one layer in flight + the writer's queue; `upcycle.load`:
  the skeleton + the model + one weight file) against the memory actually available: the least of
  /proc/meminfo's MemAvailable, the cgroup's limit minus its use (v1 and v2, every level up), the
  address-space limit (ulimit -v) and `UPCYCLE_MEMORY_BUDGET`;
- disk: the output's bytes against the free space of the output's filesystem (and the per-file
  limit, ulimit -f), capped by `UPCYCLE_DISK_BUDGET`.

`UPCYCLE_MEMORY_BUDGET` / `UPCYCLE_DISK_BUDGET` (e.g. "8GB", "500MB", bytes) count at most that much
as available: a cap for shared machines, and the hook tests use to exercise refusals with small
numbers. Estimates are of the bytes the work adds to the process (the interpreter with torch is
already resident, so it is not in MemAvailable either). Over budget: `ResourceError` (an
UpcycleError: one line, exit 2) with both numbers and what would fit; `force_resources=True`
(`--force-resources`) goes ahead anyway.
"""

from __future__ import annotations

import math
import os
import resource
from dataclasses import dataclass
from pathlib import Path

from .errors import UpcycleError

ENV_MEMORY = "UPCYCLE_MEMORY_BUDGET"
ENV_DISK = "UPCYCLE_DISK_BUDGET"
WRITER_QUEUE_BYTES = 64 << 20  # checkpoint.ShardWriter's max_pending_bytes
FILES_OVERHEAD_BYTES = 8 << 20  # config, spec, report, manifest, tokenizer files (a generous bound)
_UNLIMITED = 1 << 60  # cgroup v1 writes ~2^63 for "no limit"


class ResourceError(UpcycleError):
    """The work does not fit the memory or disk available (numbers and what would fit in the message)."""


def fmt_bytes(n: float) -> str:
    n = float(n)
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def parse_size(text: str, what: str) -> int:
    """'2GB', '500MB', '1GiB', '123' -> bytes; an UpcycleError naming `what` otherwise."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    t = str(text).strip().upper().replace(" ", "")
    num = t.rstrip("KMGTIB")
    try:
        value = float(num) * units[t[len(num):]]
        if not math.isfinite(value):
            raise ValueError
        value = int(value)
    except (ValueError, KeyError, OverflowError):
        raise UpcycleError(f"{what} {text!r}: expected a size like 2GB, 500MB or 1GiB") from None
    if value < 1:
        raise UpcycleError(f"{what} {text!r}: must be positive")
    return value


def _env_cap(name: str) -> int | None:
    value = os.environ.get(name)
    return parse_size(value, name) if value not in (None, "") else None


# ---- what is available --------------------------------------------------------------------------

@dataclass(frozen=True)
class Available:
    bytes: int
    source: str  # where the number comes from, for messages


def meminfo_available(path: str = "/proc/meminfo") -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _stat_value(path: Path, keys: tuple[str, ...]) -> int:
    try:
        for line in path.read_text().splitlines():
            k, _, v = line.partition(" ")
            if k in keys:
                return int(v)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_dirs(proc_root: Path) -> list[tuple[int, Path, Path]]:
    """[(cgroup version, this process's memory cgroup folder, the hierarchy's mount point)] from
    /proc/self/cgroup and /proc/self/mountinfo."""
    try:
        groups = (proc_root / "self" / "cgroup").read_text().splitlines()
        mounts = (proc_root / "self" / "mountinfo").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in mounts:
        left, _, right = line.partition(" - ")
        lf, rf = left.split(), right.split()
        if len(lf) < 5 or not rf:
            continue
        root, point, fstype = lf[3], lf[4], rf[0]
        opts = rf[2].split(",") if len(rf) > 2 else []
        if fstype == "cgroup2":
            version, want = 2, lambda ctrl: ctrl == ""
        elif fstype == "cgroup" and "memory" in opts:
            version, want = 1, lambda ctrl: "memory" in ctrl.split(",")
        else:
            continue
        for g in groups:
            parts = g.split(":", 2)
            if len(parts) != 3 or not want(parts[1]) or (version == 2 and parts[0] != "0"):
                continue
            rel = parts[2]
            if root != "/" and rel.startswith(root):
                rel = rel[len(root):]
            folder = Path(point) / rel.lstrip("/")
            found.append((version, folder if folder.is_dir() else Path(point), Path(point)))
    return found


def cgroup_available(proc_root: Path = Path("/proc")) -> Available | None:
    """The least of (limit - use) over this process's memory cgroup and its ancestors; file cache
    the kernel would drop for us (inactive file pages) counts as free."""
    best = None
    for version, folder, mount in _cgroup_dirs(Path(proc_root)):
        chain = [folder] + [p for p in folder.parents if p == mount or mount in p.parents]
        for p in chain:
            if version == 2:
                limit, used = _read_int(p / "memory.max"), _read_int(p / "memory.current")
                cache = _stat_value(p / "memory.stat", ("inactive_file",))
            else:
                limit, used = _read_int(p / "memory.limit_in_bytes"), _read_int(p / "memory.usage_in_bytes")
                cache = _stat_value(p / "memory.stat", ("total_inactive_file", "inactive_file"))
            if limit is not None and limit < _UNLIMITED and used is not None:
                free = max(0, limit - max(0, used - cache))
                if best is None or free < best.bytes:
                    best = Available(free, f"cgroup limit {fmt_bytes(limit)}, {fmt_bytes(used - cache)} in use")
    return best


def address_space_available() -> Available | None:
    """ulimit -v: the address space left to this process."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    used = 0
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                used = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return Available(max(0, soft - used), f"address-space limit (ulimit -v) {fmt_bytes(soft)}")


def available_memory() -> Available:
    """The memory this process can still use (see the module doc for the sources)."""
    candidates = []
    avail = meminfo_available()
    if avail is not None:
        candidates.append(Available(avail, "MemAvailable"))
    for c in (cgroup_available(), address_space_available()):
        if c is not None:
            candidates.append(c)
    cap = _env_cap(ENV_MEMORY)
    if cap is not None:
        candidates.append(Available(cap, ENV_MEMORY))
    if not candidates:
        return Available(_UNLIMITED, "unknown")
    return min(candidates, key=lambda a: a.bytes)


def nearest_existing(path: Path) -> Path:
    """`path` or its closest ancestor that exists (where free space and permissions are checked)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_disk(path) -> Available:
    """Free bytes (for an unprivileged writer) on the filesystem that will hold `path`."""
    where = nearest_existing(Path(path))
    try:
        st = os.statvfs(where)
        free = Available(st.f_bavail * st.f_frsize, f"free on the filesystem of {where}")
    except OSError:
        free = Available(_UNLIMITED, "unknown")
    cap = _env_cap(ENV_DISK)
    if cap is not None and cap < free.bytes:
        free = Available(cap, ENV_DISK)
    return free


# ---- what the work needs ------------------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    """What the estimates need to know of one planned conversion (all from the plan on meta)."""

    dense_params: int  # the dense model (unique parameters)
    moe_params: int  # all new MoE layers: routers, experts, shared experts
    largest_layer: int  # parameters of the largest MoE layer
    largest_mlp: int  # parameters of the largest dense MLP rewritten
    largest_other: int  # elements of the largest tensor that is not a rewritten MLP's (an embedding)
    params_after: int
    layers: int  # MoE layers
    d_model: int
    d_ffn: int  # the widest rewritten dense MLP
    num_experts: int
    top_k: int
    expert_width: int
    itemsize: int  # bytes per element as the model is held (the source dtype)
    out_itemsize: int  # bytes per element as written
    vocab: int = 0
    heads: int = 0
    max_positions: int = 0
    probe_tokens: int = 0  # 0: no verification
    expansion: int = 1


def workload(plan, spec, model, *, itemsize: int, out_itemsize: int | None = None) -> Workload:
    """The Workload of `plan` (pipeline.analyse's) for `model` (meta or real; only shapes are read)."""
    chosen = plan.selected
    prefixes = tuple(e.path + "." for e in chosen)
    largest_other = 0
    for name, p in model.named_parameters():
        if not name.startswith(prefixes):
            largest_other = max(largest_other, p.numel())
    config = getattr(model, "config", None)

    def cfg(*names):
        for n in names:
            v = getattr(config, n, None)
            if isinstance(v, int) and v > 0:
                return v
        return 0

    big = max(chosen, key=lambda e: e.moe_params)
    return Workload(
        dense_params=plan.params_before, moe_params=sum(e.moe_params for e in chosen),
        largest_layer=big.moe_params, largest_mlp=max(e.params for e in chosen), largest_other=largest_other,
        params_after=plan.params_after, layers=len(chosen), d_model=max(e.d_model for e in chosen),
        d_ffn=max(e.d_ffn for e in chosen), num_experts=big.num_experts, top_k=big.top_k,
        expert_width=big.expert_width, itemsize=itemsize, out_itemsize=out_itemsize or itemsize,
        vocab=cfg("vocab_size"), heads=cfg("num_attention_heads", "n_head", "num_heads"),
        max_positions=cfg("max_position_embeddings", "n_positions", "max_seq_len"),
        probe_tokens=spec.verify.probe_tokens if spec.verify.enabled else 0, expansion=spec.experts.expansion)


@dataclass(frozen=True)
class Estimate:
    what: str  # "in-memory conversion", "streaming conversion", "upcycle.load", ...
    memory: int  # peak bytes the work adds to the process
    output: int = 0  # bytes written (0: nothing)
    parts: tuple = ()  # ((label, bytes), ...) of the memory, for messages
    scaled: int = 0  # the part of `memory` that grows with experts.expansion (for "what would fit")
    expansion: int = 1

    def largest_fitting_expansion(self, available: int) -> int:
        """The largest experts.expansion whose estimate fits `available` (0: none does)."""
        if not self.scaled:
            return 0
        fixed = self.memory - self.scaled
        return max(0, int((available - fixed) * self.expansion // self.scaled))


def _layer_check_bytes(w: Workload) -> int:
    """One MoE layer against its dense MLP on probe_tokens tokens: inputs, both outputs, router
    scores, and the routed tokens' gathered inputs and gate/up/activation (grouped backend)."""
    t, d, h, k, n = w.probe_tokens, w.d_model, w.expert_width, w.top_k, w.num_experts
    return t * (4 * d + 2 * n + k * (2 * d + 3 * h) + 2 * w.d_ffn) * max(w.itemsize, 4)


def _model_probe_bytes(w: Workload) -> int:
    """The whole-model probe: dense and MoE logits kept, the captured MLP inputs, one forward's
    activations and attention scores (the probe's batch and sequence as pipeline._probe_model makes them)."""
    if not w.probe_tokens or not w.vocab:
        return 0
    seq = max(w.probe_tokens // 2, 1)
    if w.max_positions:
        seq = min(seq, w.max_positions)
    batch = max(2, -(-w.probe_tokens // seq))
    toks = batch * seq
    acts = toks * (2 * w.vocab + w.layers * w.d_model + 8 * w.d_model + 2 * max(w.d_ffn, w.top_k * w.expert_width))
    scores = 2 * batch * max(w.heads, 1) * seq * seq
    return (acts + scores) * max(w.itemsize, 4)


def in_memory(w: Workload, *, loaded: bool = False) -> Estimate:
    """The in-memory conversion: the dense model (unless `loaded`: already in memory), every MoE
    layer, and the mapping and verification temporaries (one layer being mapped, the unscaled copy
    some scalings verify against, the layer and model probes)."""
    model = 0 if loaded else w.dense_params * w.itemsize
    experts = w.moe_params * w.itemsize
    temps = w.largest_layer * w.itemsize * (2 if w.probe_tokens else 1)
    verify = (_layer_check_bytes(w) + _model_probe_bytes(w)) if w.probe_tokens else 0
    parts = ((("dense model", model),) if not loaded else ()) + (("new MoE layers", experts),
                                                                   ("mapping", temps), ("verification", verify))
    return Estimate("in-memory conversion", model + experts + temps + verify, output_bytes(w), parts,
                    scaled=experts + temps, expansion=w.expansion)


def streaming(w: Workload) -> Estimate:
    """The streamed conversion: the layer being mapped (its tensors, the mapping's temporaries or
    the unscaled copy, and the copy cast for writing), its dense MLP, the writer's queue or the
    largest other tensor (an embedding, read and cast), and the per-layer check."""
    layer = 3 * w.largest_layer * max(w.itemsize, w.out_itemsize)
    dense = w.largest_mlp * w.itemsize
    other = max(min(WRITER_QUEUE_BYTES, output_bytes(w)), 2 * w.largest_other * max(w.itemsize, w.out_itemsize))
    verify = _layer_check_bytes(w) if w.probe_tokens else 0
    return Estimate("streaming conversion", layer + dense + other + verify, output_bytes(w),
                    (("layer in flight", layer), ("its dense MLP", dense), ("write queue", other),
                     ("verification", verify)), scaled=layer, expansion=w.expansion)


def output_bytes(w: Workload) -> int:
    return w.params_after * w.out_itemsize + FILES_OVERHEAD_BYTES


def loading(dense_bytes: int, weight_bytes: int, largest_file: int) -> Estimate:
    """upcycle.load: the dense skeleton it rebuilds, the model with its MoE layers, and one weight
    file read before it is copied in."""
    return Estimate("upcycle.load", dense_bytes + weight_bytes + largest_file, 0,
                    (("dense skeleton", dense_bytes), ("model", weight_bytes), ("one weight file", largest_file)))


# ---- the checks ---------------------------------------------------------------------------------

FORCE = "--force-resources (force_resources=True) goes ahead anyway"


def check_memory(est: Estimate, *, alternatives: list[str] | None = None) -> None:
    """ResourceError if `est.memory` exceeds the available memory; `alternatives`: what else fits."""
    avail = available_memory()
    if est.memory <= avail.bytes:
        return
    parts = ", ".join(f"{label} {fmt_bytes(b)}" for label, b in est.parts if b)
    fits = list(alternatives or [])
    e = est.largest_fitting_expansion(avail.bytes)
    if 0 < e < est.expansion:
        fits.append(f"experts.expansion <= {e}")
    hint = f"would fit: {', or '.join(fits)}; " if fits else ""
    raise ResourceError(f"not enough memory for the {est.what}: it needs about {fmt_bytes(est.memory)} ({parts}) "
                        f"but {fmt_bytes(avail.bytes)} is available ({avail.source}); {hint}{FORCE}")


def check_disk(need: int, out, *, largest_file: int | None = None) -> None:
    """ResourceError if `need` bytes do not fit on the filesystem that will hold `out` (or one file
    is over the process's file-size limit, ulimit -f)."""
    free = free_disk(out)
    if need > free.bytes:
        raise ResourceError(f"{out}: not enough disk space for the output: it needs about {fmt_bytes(need)} but "
                            f"{fmt_bytes(free.bytes)} is {free.source if free.source == ENV_DISK else 'free there'}; "
                            f"would fit: another -o on a filesystem with more space, a smaller experts.expansion, or "
                            f"--dtype bf16; {FORCE}")
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if largest_file and soft != resource.RLIM_INFINITY and largest_file > soft:
        raise ResourceError(f"{out}: an output file of {fmt_bytes(largest_file)} is over this process's file-size "
                            f"limit (ulimit -f, {fmt_bytes(soft)}); would fit: --max-shard-size below it; {FORCE}")


# --- the checks of a conversion (preflight.py applies them; re-exported there) --------------------


def itemsize_of(dtype, default: int = 4) -> int:
    """Bytes per element of a torch dtype (None: `default`)."""
    import torch

    return torch.empty((), dtype=dtype).element_size() if dtype is not None else default


def check_streaming(plan, spec, model, *, itemsize: int, out_itemsize: int, out=None,
                    max_shard_bytes: int | None = None) -> Estimate:
    """A streamed conversion (model: the rewritten meta model): memory in flight, disk space, and
    the largest shard against the file-size limit."""
    est = streaming(workload(plan, spec, model, itemsize=itemsize, out_itemsize=out_itemsize))
    check_memory(est)
    if out is not None:
        largest = min(max_shard_bytes, est.output) if max_shard_bytes else est.output
        check_disk(est.output, Path(out), largest_file=largest)
    return est


def check_loaded(plan, spec, model) -> Estimate:
    """compile_upcycle on a model in memory: the new MoE layers and the temporaries must fit."""
    p = next(iter(model.parameters()), None)
    if p is None or p.device.type == "meta":
        return None
    est = in_memory(workload(plan, spec, model, itemsize=p.element_size()), loaded=True)
    check_memory(est)
    return est


def describe(est: Estimate, out=None) -> str:
    """The plan table's resource line(s): estimates next to what is available."""
    avail = available_memory()
    parts = ", ".join(f"{label} {fmt_bytes(b)}" for label, b in est.parts if b)
    ok = "fits" if est.memory <= avail.bytes else "DOES NOT FIT"
    lines = [f"memory ({est.what}): about {fmt_bytes(est.memory)} ({parts}); available {fmt_bytes(avail.bytes)} "
             f"({avail.source}): {ok}"]
    if est.output:
        line = f"output: about {fmt_bytes(est.output)}"
        if out is not None:
            free = free_disk(out)
            line += f"; {fmt_bytes(free.bytes)} free for {out}: {'fits' if est.output <= free.bytes else 'DOES NOT FIT'}"
        lines.append(line)
    return "\n".join(lines)


__all__ = ["ResourceError", "Estimate", "Workload", "Available", "available_memory", "free_disk", "workload",
           "in_memory", "streaming", "loading", "output_bytes", "check_memory", "check_disk", "describe",
           "parse_size", "fmt_bytes", "ENV_MEMORY", "ENV_DISK"]
