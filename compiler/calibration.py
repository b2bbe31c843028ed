"""Real text for the conversion's checks: `--calibration FILE` / `compile_upcycle(..., calibration=)`.

Without it the probe is random token ids: fine for "does the layer equal the dense MLP", useless
for "how much did the model move on text like mine", and a poor sample for k-means routers (random
ids make hidden states no real text has). With it, the text (tokenized with the model's own
tokenizer) is the probe: each layer is verified on the hidden states the text produces, k-means
clusters those states, and the whole-model loss before and after is reported as perplexity on
that text. Streaming conversions run the same probe through the model module by module
(compiler/offload.py), so they get the same checks in bounded memory.

How much of the text: `verify.probe_tokens` tokens (`--probe-tokens`), from its start, in rows no
longer than the model's position table (and 512).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelError, UpcycleError

MAX_ROW = 512  # longest probe row: long enough for real context, short enough for CPU attention


@dataclass(frozen=True)
class CalibrationBatch:
    input_ids: torch.Tensor  # [rows, seq] int64
    description: str  # for the report: what the text was and how much of it was used

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()


def read_calibration(path) -> str:
    """The text of a calibration file (UTF-8), or one line saying what is wrong with it."""
    p = Path(path)
    if not p.is_file():
        raise UpcycleError(f"{p}: --calibration needs a plain-text file; no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UpcycleError(f"{p}: --calibration needs UTF-8 plain text; byte {exc.start} is not UTF-8") from None
    if not text.strip():
        raise UpcycleError(f"{p}: --calibration file is empty")
    return text


def load_tokenizer(model_path, config_path=None):
    """The model's own tokenizer: from its folder (or the --config folder), or from a .gguf file.
    One line if there is none (the calibration text cannot be tokenized without it)."""
    from transformers import AutoTokenizer

    path = Path(model_path)
    try:
        if path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        folders = [path if path.is_dir() else path.parent] + ([Path(config_path)] if config_path else [])
        for folder in folders:
            folder = folder if folder.is_dir() else folder.parent
            if any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
                return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # a broken tokenizer file: the user's input
        raise ModelError(f"{path}: cannot load the model's tokenizer for --calibration "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    raise ModelError(f"{path}: --calibration needs the model's tokenizer, and there are no tokenizer files "
                     "(tokenizer.json / tokenizer_config.json) beside it; add them or drop --calibration")


def _max_positions(config) -> int | None:
    limits = [getattr(config, a, None) for a in ("max_position_embeddings", "n_positions", "max_seq_len")]
    limits = [v for v in limits if isinstance(v, int) and v > 0]
    return min(limits) if limits else None


def calibration_batch(calibration, *, tokenizer, config, tokens: int, name: str = "text") -> CalibrationBatch:
    """`calibration`: a string, a list of strings (joined by blank lines) or token ids [rows, seq]
    (used as they are). Text is tokenized with `tokenizer` and cut into rows of equal length."""
    if isinstance(calibration, torch.Tensor):
        ids = calibration.long()
        ids = ids[None] if ids.dim() == 1 else ids
        return CalibrationBatch(ids, f"calibration {name} ({ids.numel()} given token ids)")
    texts = [calibration] if isinstance(calibration, str) else list(calibration)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise UpcycleError("calibration= must be a string, a list of strings or a tensor of token ids")
    if tokenizer is None:
        raise ModelError("calibration text needs the model's tokenizer: pass tokenizer= (or load the model from a "
                         "folder with its tokenizer files)")
    text = "\n\n".join(texts)
    # tokenize only as much text as the budget needs (a few characters per token; grown if short)
    chars = max(tokens * 8, 4096)
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=True)["input_ids"]
        if len(ids) >= tokens or chars >= len(text):
            break
        chars *= 4
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and ids and max(ids) >= vocab:
        raise ModelError(f"calibration {name}: the tokenizer gives id {max(ids)} but the model has {vocab} tokens; "
                         "is it the model's own tokenizer?")
    ids = ids[:tokens]
    if len(ids) < 2:
        raise UpcycleError(f"calibration {name}: only {len(ids)} token(s); give more text")
    seq = min(len(ids), MAX_ROW, _max_positions(config) or MAX_ROW)
    rows = len(ids) // seq
    batch = torch.tensor(ids[: rows * seq], dtype=torch.long).view(rows, seq)  # [rows, seq]
    return CalibrationBatch(batch, f"calibration {name} ({batch.numel()} tokens, {rows} x {seq})")


def tokenizer_of(model):
    """The tokenizer beside the folder an in-memory model was loaded from, or None."""
    origin = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    if origin and Path(origin).is_dir():
        try:
            return load_tokenizer(origin)
        except ModelError:
            return None
    return None


__all__ = ["CalibrationBatch", "read_calibration", "load_tokenizer", "calibration_batch", "tokenizer_of"]
