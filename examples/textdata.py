"""Real English text from a registry package, split and packed for language-model training.

Source: the King James Bible from Debian's `bible-kjv` (the `bible` command and its data file),
4.3 MB of text. The split is fixed and documented: the Gospel of John is the validation set (the
text the main job scores), every other book is training text. Verse numbers and chapter headings
are removed; the text is tokenized once and cached beside the tokenizer's name.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"
JOHN = "John1:1-21:25"
BEFORE_JOHN = "Gen1:1-Luke24:53"
AFTER_JOHN = "Acts1:1-Rev22:21"


def _bible(spec: str) -> str:
    try:
        raw = subprocess.run(["bible", "-p", "/usr/lib", spec], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        sys.exit(f"error: need Debian's bible-kjv for real text (apt-get install bible-kjv): {exc}")
    lines = []
    for ln in raw.splitlines():
        s = ln.strip()
        if not s or re.fullmatch(r"[1-3]?\s?[A-Z][A-Za-z ]+ \d+", s):  # chapter headings ("1 John 3")
            continue
        lines.append(re.sub(r"^\s*\d+\s+", "", ln))
    return " ".join(" ".join(lines).split())


def kjv_split() -> tuple[str, str]:
    """(train text: every book but John, validation text: the Gospel of John)."""
    return _bible(BEFORE_JOHN) + " " + _bible(AFTER_JOHN), _bible(JOHN)


def token_split(tokenizer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [n] of the train and validation text, cached per tokenizer `name`."""
    key = hashlib.sha1(name.encode()).hexdigest()[:10]
    path = CACHE / f"kjv-tokens-{key}.pt"
    if path.is_file():
        data = torch.load(path, weights_only=True)
        return data["train"], data["val"]
    train, val = kjv_split()
    enc = lambda t: torch.tensor(tokenizer(t, add_special_tokens=False).input_ids, dtype=torch.int64)  # noqa: E731
    data = {"train": enc(train), "val": enc(val)}
    CACHE.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(data, tmp)
    tmp.replace(path)
    return data["train"], data["val"]


def pack(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[n] -> [n // seq_len, seq_len] consecutive sequences (the tail is dropped)."""
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len)


def byte_tokens(text: str) -> torch.Tensor:
    """Bytes as tokens (vocabulary 256): real text for tiny models that have no tokenizer."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)
