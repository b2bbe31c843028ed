"""Streaming conversion of a safetensors transformers checkpoint: bounded memory, any size.

1. The model is built from config.json on the meta device (no memory, no random init) and every
   checkpoint header is checked against it (names, shapes, float dtypes).
2. Discovery and the rewrite run on the meta model, exactly as in memory (`structure_only`): this
   says which checkpoint tensors are MLP weights, which MoE tensors each becomes, and every output
   tensor's name, dtype and shape, so output shard headers can be written before any data.
3. Output tensors are produced in state-dict order: other tensors are read one at a time (positioned
   reads at the offsets of the checked headers, not one long-lived memory map whose touched pages
   would count as resident memory) and copied; for each MLP its dense tensors are read, mapped to MoE weights
   by the same code and seeds as the in-memory path (`MoEBuilder.moe_for`, hence the same router
   init), verified on a synthetic probe (the per-layer check) and written. Peak memory is about
   one MoE layer plus one dense MLP. With calibration text (compiler/stream_probe.py) the dense
   model first runs on it module by module, so each layer is verified (and k-means clustered) on
   the text's hidden states, and the upcycled model runs on it after, for the whole-model error and
   the perplexity before/after.
4. Output: transformers-layout shards (`model-0000k-of-0000N.safetensors` + index, or one
   `model.safetensors`), config, spec, report, and `upcycle.json` with sha256 per file and the
   fate of every input tensor; written in a temp folder renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from upcycle.passes.rewrite import linear_paths, rewrite_mlps
from upcycle.passes.weight_mapping import plan_scaling
from upcycle.specs import load_spec

from .checkpoint import (ST_DTYPES, IOSeconds, OutTensor, PhaseSeconds, ShardWriter, TensorReader, checkpoint_files,
                         dominant_float_dtype, scan_checkpoint)
from .atomic import atomic_output, check_output
from .readahead import Readahead
from .errors import ModelError, UpcycleError
from .loading import check_tensors_against, load_config, meta_skeleton, tied_aliases, tokenizer_files
from .output_folder import EXPORT_RECORD, tensor_accounting, write_config, write_metadata, write_report
from .pipeline import MoEBuilder, _NullProgress, analyse
from .report import Report
from .resources import FILES_OVERHEAD_BYTES

DEFAULT_SHARD_BYTES = 2 * 10**9
VERIFICATION = "per-layer: each MoE layer against its dense MLP on synthetic unit-RMS probes (no whole-model forward)"


def safetensors_input(path) -> bool:
    """Whether `path` is a safetensors checkpoint the streaming mode can read."""
    path = Path(path)
    if path.is_file():
        return path.suffix == ".safetensors"
    if path.is_dir() and (path / "config.json").is_file():
        try:
            return bool(checkpoint_files(path))
        except UpcycleError:
            return True  # let the streaming path report the broken index
    return False


@dataclass
class MetaPlan:
    """The rewrite planned on the meta device."""

    config: object
    model: nn.Module  # rewritten meta model
    infos: dict  # checkpoint tensors
    records: list
    plan: object
    discovery: object
    seen: dict  # mlp path -> (match, traced unit, [(local name, absolute name)])


class _Recorder(MoEBuilder):
    """Structure-only builder that remembers each MLP's match, traced unit and dense tensor names."""

    def __init__(self, spec, discovery):
        super().__init__(spec, discovery, None, _NullProgress(), structure_only=True)
        self.seen = {}

    def __call__(self, match, unit):
        names = []
        for ref in match.linears:
            for local in ref.parameter_names(unit):
                names.append((local, ".".join(p for p in (match.unit_path, local) if p)))
        # a copy: the rewrite then edits this unit's graph (e.g. GPT-2's MLP nodes become the MoE
        # call), and the streamed mapping and verification need the dense MLP's nodes
        self.seen[match.path] = (match, copy.deepcopy(unit), names)
        return super().__call__(match, unit)


def open_checkpoint(model_path, config_path=None):
    src = Path(model_path)
    if not src.exists():
        raise ModelError(f"{src}: no such file or directory (expected a transformers directory or a .safetensors file "
                         "with config.json beside it)")
    if src.is_dir() and not (src / "config.json").is_file() and config_path is None:
        raise ModelError(f"{src}: directory has no config.json, so it is not a transformers model directory")
    config = load_config(Path(config_path) if config_path else (src if src.is_dir() else src.parent))
    files = checkpoint_files(src)
    if not files:
        raise ModelError(f"{src}: no safetensors weights (model.safetensors or an index with shards); streaming reads safetensors only")
    infos = scan_checkpoint(files)
    return src, config, infos


def analyse_on_meta(spec, model_path, config_path=None):
    """The checkpoint's model built on the meta device from its config, checked against the headers,
    and analysed: (config, checkpoint infos, meta model, discovery, selection, plan)."""
    src, config, infos = open_checkpoint(model_path, config_path)
    model = meta_skeleton(config, dominant_float_dtype(infos))
    check_tensors_against(model, {n: (i.shape, i.dtype) for n, i in infos.items()}, src)
    return (config, infos, model, *analyse(model, spec))


def plan_on_meta(spec, model_path, config_path=None) -> MetaPlan:
    spec = load_spec(spec)
    config, infos, model, discovery, selection, plan = analyse_on_meta(spec, model_path, config_path)
    targets = {f.key: f.rewrite_unit for f in discovery.mlps if selection[f.index] == ""}
    recorder = _Recorder(spec, discovery)
    model, records = rewrite_mlps(model, targets, recorder)
    return MetaPlan(config, model, infos, records, plan, discovery, recorder.seen)


def _set_tensor(root: nn.Module, dotted: str, value: torch.Tensor) -> None:
    owner_path, _, attr = dotted.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        setattr(owner, attr, value)


def _get_tensor(root: nn.Module, dotted: str) -> torch.Tensor:
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class StreamResult:
    out: Path
    report: Report
    manifest: dict
    input_bytes: int
    output_bytes: int
    seconds: float
    profile: dict = dataclasses.field(default_factory=dict)  # StreamProfile.to_dict(): seconds per phase


class StreamProfile(PhaseSeconds):
    """Seconds per phase of a streamed conversion. Producer phases (plan, read, map, check, probe)
    follow one another on the main thread (the probe's own reads count in read as well); the writer's (write, sha256, fsync) run on threads of their own
    and overlap them, and producer_wait is how long the main thread slept waiting for the disk."""

    def __init__(self) -> None:
        self.plan = self.read = self.map = self.check = self.probe = 0.0
        self.io = IOSeconds()

    def to_dict(self, total: float) -> dict:
        return {"total_s": total, "plan_s": self.plan, "read_s": self.read,
                "map_s": self.map, "check_s": self.check, "probe_s": self.probe, **self.io.to_dict()}


def _return_freed_memory() -> None:
    """glibc raises its mmap threshold as large blocks are freed, after which tensor buffers come
    from the heap and stay in the process's RSS when freed (measured: 0.44 GB kept after the first
    layer of the 3 GB model). A fixed 1 MB threshold gives every tensor its own mapping, returned on
    free, so the resident set follows the live tensors. glibc only; elsewhere nothing changes."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _cast_plan(t: OutTensor, dtype: torch.dtype, keep_fp32: bool) -> OutTensor:
    if not t.dtype.is_floating_point or (keep_fp32 and t.name.endswith(ROUTER_FP32_SUFFIXES)):
        return t
    return OutTensor(t.name, dtype, t.shape)


ROUTER_FP32_SUFFIXES = ("router.weight", "router.bias", "router.expert_bias")


def stream_upcycle(spec, model_path, out_dir, *, config=None, force: bool = False,
                   max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = False,
                   writer_factory=ShardWriter, fmt: str = "native", target: str | None = None,
                   dtype: torch.dtype | None = None, calibration=None, tokenizer=None,
                   calibration_name: str = "text", force_resources: bool = False) -> StreamResult:
    """Upcycle a safetensors checkpoint on disk into `out_dir` without loading it (see module doc).

    fmt "hf": write a transformers MoE checkpoint instead (compiler/targets/; `target` names one):
    `export_hf`'s names, layout and order, through the same writer, so the same bytes as the
    in-memory export of the same model. dtype: cast every floating tensor to it on write (native
    routers stay fp32), None: as the source. calibration: text (tokenized with `tokenizer`, by
    default the one beside the checkpoint) or token ids: the probe for per-layer verification,
    k-means and the perplexity before/after, run module by module (compiler/stream_probe.py).
    Right after the plan, before any tensor is read, the memory in flight and the output's disk
    space are checked (preflight.check_streaming; force_resources=True skips).
    From the first moment the kernel reads the checkpoint ahead of the conversion
    (compiler/readahead.py), so the disk works while the model's code is imported and traced."""
    t0 = time.perf_counter()
    readahead = _start_readahead(model_path)
    try:
        return _stream(t0, spec, model_path, out_dir, config=config, force=force, max_shard_bytes=max_shard_bytes,
                       progress=progress, writer_factory=writer_factory, fmt=fmt, target=target, dtype=dtype,
                       calibration=calibration, tokenizer=tokenizer, calibration_name=calibration_name,
                       force_resources=force_resources, readahead=readahead)
    finally:
        if readahead is not None:
            readahead.close()


def _start_readahead(model_path):
    """A Readahead over the checkpoint's files, whole and in the order the reader meets them (a
    transformers checkpoint is saved in the order its tensors are written out), or None when they
    cannot be listed: the plan then reports why, with its own message. The files are taken whole,
    headers included, so nothing is parsed here that the plan parses again."""
    try:
        files = checkpoint_files(Path(model_path))
        spans = [(f, 0, f.stat().st_size) for f in files]
    except (UpcycleError, OSError, ValueError):
        return None
    return Readahead(spans) if spans else None


def _stream(t0: float, spec, model_path, out_dir, *, config=None, force: bool = False,
            max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = False,
            writer_factory=ShardWriter, fmt: str = "native", target: str | None = None,
            dtype: torch.dtype | None = None, calibration=None, tokenizer=None,
            calibration_name: str = "text", force_resources: bool = False, readahead=None) -> StreamResult:
    """stream_upcycle's work, timed from t0; `readahead` (or None) is told what the reader consumes."""
    prof = StreamProfile()
    spec = load_spec(spec)
    _return_freed_memory()
    out = Path(out_dir)
    check_output(out, force, [model_path])  # before the plan, the CLI's rule (atomic_output applies it again)
    with prof.phase("plan"):  # importing the model's code, tracing it on the meta device, the rewrite plan
        mp = plan_on_meta(spec, model_path, config)
    if not force_resources:
        from .resources import check_streaming, itemsize_of

        src_dtype = dominant_float_dtype(mp.infos)
        check_streaming(mp.plan, spec, mp.model, itemsize=itemsize_of(src_dtype),
                        out_itemsize=itemsize_of(dtype or src_dtype), out=out, max_shard_bytes=max_shard_bytes)
    hf = _hf_plan(mp, spec, target) if fmt == "hf" else None
    src = Path(model_path)
    probe = None
    if calibration is not None:
        from .calibration import calibration_batch, load_tokenizer
        from .stream_probe import StreamProbe

        if tokenizer is None and not isinstance(calibration, torch.Tensor):
            tokenizer = load_tokenizer(model_path, config)
        calib = calibration_batch(calibration, tokenizer=tokenizer, config=mp.config, tokens=spec.verify.probe_tokens,
                                  name=calibration_name)
        probe = StreamProbe(calib, mp, dominant_float_dtype(mp.infos))
    final = mp.model.state_dict(keep_vars=True)
    aliases = tied_aliases(mp.model)  # {duplicate name: first name}
    moe_of = {}  # output name -> (mlp path, local name)
    for rec in mp.records:
        for name in final:
            if rec.moe_path == "" or name.startswith(rec.moe_path + "."):
                moe_of[name] = (rec.mlp_path, name[len(rec.moe_path) + 1:] if rec.moe_path else name)
    outputs: list[OutTensor] = []
    dropped_alias = {}
    groups: dict[int, list[str]] = {}
    for name, t in final.items():
        groups.setdefault(id(t), []).append(name)
    for name, t in final.items():
        names = groups[id(t)]
        keep = next((n for n in names if n in mp.infos), names[0])
        if name != keep:
            dropped_alias[name] = keep
            continue
        if name in moe_of:
            outputs.append(OutTensor(name, t.dtype, tuple(t.shape)))
        elif name in mp.infos:
            info = mp.infos[name]
            outputs.append(OutTensor(name, ST_DTYPES[info.dtype], info.shape))
        else:
            raise ModelError(f"{src}: output tensor {name!r} has no source in the checkpoint")
    if hf is not None:  # the target's tensors instead: same order rule as the in-memory export
        outputs = hf.outputs(outputs)
    if dtype is not None:
        outputs = [_cast_plan(t, dtype, keep_fp32=hf is None) for t in outputs]
        (hf.config if hf is not None else mp.config).dtype = dtype
    out_names = [t.name for t in outputs]
    tensors = tensor_accounting(list(mp.infos), hf.records(mp.records) if hf is not None else mp.records, out_names,
                                aliases={**{k: v for k, v in aliases.items()}, **dropped_alias}, where=str(src))
    out_kwargs = dict(force=force, need_bytes=sum(t.nbytes for t in outputs) + FILES_OVERHEAD_BYTES,
                      force_resources=force_resources, inputs=[src])

    builder = MoEBuilder(spec, mp.discovery, None, _NullProgress(), structure_only=False)
    reader = TensorReader(mp.infos, seconds=prof, readahead=readahead)
    bar = _bar(len(outputs), progress)
    src_dir = src if src.is_dir() else src.parent
    extra = tokenizer_files(src_dir)

    if probe is not None:  # the dense forward first: its MLP inputs are the layers' probes and k-means data
        with prof.phase("probe"):
            probe.run_dense(reader)
        builder.capture = probe.capture

    def measure():
        """(whole-model error, loss before, loss after, probe name) once the layers are written."""
        if probe is None:
            return None, None, None, "synthetic (streaming: per-layer only)"
        with prof.phase("probe"):
            return (*probe.run_upcycled(reader, moe_state), probe.description)

    checks = _DeferredChecks()

    def moe_state(mlp_path: str, verify: bool = True) -> dict[str, torch.Tensor]:
        """The MoE layer's tensors; its check against the dense MLP is deferred (`checks`): it runs
        while the writer drains this layer's tensors, before the next layer is built."""
        checks.run_all()  # the previous layer's, if the writer never made the producer wait
        match, gm, names = mp.seen[mlp_path]
        key = linear_paths(match)
        index = builder.index_of[key]
        dense = {local: reader.get(absolute).to(_get_tensor(gm, local).dtype) for local, absolute in names}
        scale = plan_scaling(spec, match.activation, match.gated)
        with _dense_in(gm, dense), torch.no_grad(), prof.phase("map"):
            moe = builder.moe_for(match, gm, scale, index)
        state = {k: v.detach() for k, v in moe.state_dict().items()}
        if spec.verify.enabled and verify:
            def check() -> None:
                with _dense_in(gm, dense), prof.phase("check"):
                    builder._verify(match, gm, moe, scale, index, key)

            checks.add(check)
        return state

    verification = (_probe_verification(probe) if spec.verify.enabled else "disabled")
    if hf is not None:
        try:
            return _write_hf(hf, spec, mp, src, out, outputs, tensors, moe_state, reader, bar, builder,
                             max_shard_bytes, out_kwargs, t0, measure, verification, checks, prof)
        finally:
            reader.close()
    # every core stays with torch: the writer's threads spend their time in write(2), sha256 and
    # fsync, which release the GIL. Leaving them a core (as before the layer checks moved into the
    # producer's waits) measured slower: 1.8 GB Llama, checks 2.7 s -> 1.7 s, total 11.4 s -> 9.5 s.
    with atomic_output(out, **out_kwargs) as tmp:
        writer = writer_factory(tmp, outputs, max_shard_bytes, metadata={"upcycle_format": "1"}, seconds=prof.io)
        writer.while_waiting(checks.run_one)
        try:
            current, cache = None, {}
            for t in outputs:
                if t.name in moe_of:
                    mlp_path, local = moe_of[t.name]
                    if mlp_path != current:
                        cache = moe_state(mlp_path)
                        current = mlp_path
                    value = cache.pop(local)
                else:
                    value = reader.get(t.name)
                writer.write(t.name, value.to(t.dtype))
                del value
                bar.update(1)
            checks.run_all()
            weight_files = writer.finish()
        except BaseException:
            writer.abort()
            reader.close()
            raise
        finally:
            bar.close()
        try:
            model_error, loss_before, loss_after, probe_name = measure()
        finally:
            reader.close()
        write_config(tmp, mp.config)  # model_type "upcycle": plain transformers must refuse it, not load a dense model
        report = Report.build(spec, mp.plan, builder.checks, mp.records, model_error, loss_before, loss_after,
                              seconds=time.perf_counter() - t0, probe=probe_name)
        manifest = write_metadata(tmp, spec=spec, kind="transformers", model_class=type(mp.model).__name__, source=src,
                                  report=report, tensors=tensors, weight_files=weight_files, extra_files=extra,
                                  streaming=True, verification=verification)
    in_bytes = sum(f.stat().st_size for f in {i.file for i in mp.infos.values()})
    out_bytes = sum(v["bytes"] for v in weight_files.values())
    total = time.perf_counter() - t0
    return StreamResult(out, report, manifest, in_bytes, out_bytes, total, prof.to_dict(total))


class _HFPlan:
    """The transformers-format output of a streamed conversion: target, config, per-layer names."""

    def __init__(self, mp: MetaPlan, spec, target):
        from .export_hf import _layers, hf_config, hf_export_plan, plan_dtype

        self.plan = hf_export_plan(mp.model, spec, target)
        self.config = hf_config(mp.model, self.plan)
        self.dtype = plan_dtype(mp.model)
        self.layers = _layers(mp.model)
        self.mlp_of = {rec.moe_path: rec.mlp_path for rec in mp.records}  # moe module path -> MLP key

    def layer(self, i: int, state: dict) -> dict:
        moe = self.layers[i].mlp
        return self.plan.target.layer_tensors(state, moe.config, i, self.dtype, concat=False)

    def records(self, records: list) -> list:
        """The rewrite records with each MoE path where the target puts the block (GraniteMoe:
        block_sparse_moe), so the accounting finds the tensors each dense MLP became."""
        out = []
        for rec in records:
            i = next((j for j in self.plan.moe_layers if rec.moe_path == f"model.layers.{j}.mlp"), None)
            out.append(rec if i is None else dataclasses.replace(rec, moe_path=self.plan.target.moe_prefix(i)[:-1]))
        return out

    def order(self, native: list[OutTensor]) -> list:
        from .export_hf import hf_tensor_order

        return hf_tensor_order([t.name for t in native], self.plan)

    def outputs(self, native: list[OutTensor]) -> list[OutTensor]:
        by_name = {t.name: t for t in native}
        outs = []
        for name, i in self.order(native):
            if i is None:
                t = by_name[name]
                outs.append(OutTensor(self.plan.target.rename(name), t.dtype, t.shape))
            else:  # shapes and dtypes from the meta layer, through the same mapping
                for n, t in self.layer(i, self.layers[i].mlp.state_dict()).items():
                    outs.append(OutTensor(n, t.dtype, tuple(t.shape)))
        self.native = native
        return outs


def _hf_plan(mp: MetaPlan, spec, target) -> _HFPlan:
    return _HFPlan(mp, spec, target)


def _probe_verification(probe) -> str:
    if probe is None:
        return VERIFICATION
    from .stream_probe import VERIFICATION as WITH_TEXT

    return WITH_TEXT


def _write_hf(hf: _HFPlan, spec, mp: MetaPlan, src: Path, out: Path, outputs, tensors, moe_state, reader, bar,
              builder, max_shard_bytes: int, out_kwargs: dict, t0: float, measure, verification: str,
              checks: _DeferredChecks, prof: StreamProfile) -> StreamResult:
    from .export_hf import export_record, write_hf_folder

    dtypes = {t.name: t.dtype for t in outputs}

    def values():
        for name, i in hf.order(hf.native):
            if i is None:
                value = reader.get(name)
                bar.update(1)
                out_name = hf.plan.target.rename(name)
                yield out_name, value.to(dtypes[out_name])
            else:
                layer = hf.layer(i, moe_state(hf.mlp_of[f"model.layers.{i}.mlp"]))
                for n in list(layer):  # popped as written: a layer's tensors are freed one by one
                    v = layer.pop(n)
                    bar.update(1)
                    yield n, v.to(dtypes[n])
                    del v
        checks.run_all()

    with atomic_output(out, **out_kwargs) as tmp:
        try:
            files = write_hf_folder(tmp, hf.config, values(), outputs, max_shard_bytes, spec=spec,
                                    source_class=type(mp.model).__name__,
                                    carried=tokenizer_files(src if src.is_dir() else src.parent),
                                    extra={**export_record(hf.plan), "streaming": True, "tensors": tensors,
                                           "verification": verification},
                                    while_waiting=checks.run_one, io_seconds=prof.io)
        finally:
            bar.close()
        model_error, loss_before, loss_after, probe_name = measure()
        report = Report.build(spec, mp.plan, builder.checks, mp.records, model_error, loss_before, loss_after,
                              seconds=time.perf_counter() - t0, probe=probe_name)
        write_report(tmp, report)
    in_bytes = sum(f.stat().st_size for f in {i.file for i in mp.infos.values()})
    out_bytes = sum(v["bytes"] for v in files.values())
    total = time.perf_counter() - t0
    return StreamResult(out, report, json.loads((out / EXPORT_RECORD).read_text()), in_bytes, out_bytes, total,
                        prof.to_dict(total))


@contextlib.contextmanager
def _dense_in(gm: nn.Module, dense: dict[str, torch.Tensor]):
    """The traced unit holds meta tensors between layers; one layer's dense weights are set for the
    duration of the block."""
    for local, value in dense.items():
        _set_tensor(gm, local, value)
    try:
        yield
    finally:
        for local in dense:
            t = _get_tensor(gm, local)
            _set_tensor(gm, local, torch.empty(t.shape, dtype=t.dtype, device="meta"))


class _DeferredChecks:
    """Layer checks waiting to run. Run while the producer would otherwise wait for the disk
    (ShardWriter.while_waiting), they overlap the writes of the layer they check; a failing check
    raises there, before anything is committed. At most one layer is pending (moe_state runs
    the rest before building the next), so the memory bound is the same as checking inline."""

    def __init__(self) -> None:
        self._pending: list = []

    def add(self, check) -> None:
        self._pending.append(check)

    def run_one(self) -> bool:
        if not self._pending:
            return False
        self._pending.pop(0)()
        return True

    def run_all(self) -> None:
        while self.run_one():
            pass


def _bar(total: int, enabled: bool):
    if not enabled:
        return _NullProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="streaming tensors", unit="tensor")


__all__ = ["stream_upcycle", "plan_on_meta", "safetensors_input"]
