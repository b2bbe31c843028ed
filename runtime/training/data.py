"""Training data: real English text from registry packages, split and packed for language-model training.

Source: the King James Bible from Debian's `bible-kjv` (the `bible` command and its data file),
4.3 MB of text. The split is fixed and documented: the Gospel of John is the validation set (the
text the main job scores), every other book is training text. Verse numbers and chapter headings
are removed; the text is tokenized once and cached per tokenizer name in the checkout's .cache
(the same files as when this lived in examples/textdata.py).

`batch_for` is the trainer's order over the packed sequences: a fixed permutation per epoch,
consecutive global batches, each rank a contiguous share, split into micro-batches.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]  # the checkout (the `upcycle` package's folder)
CACHE = ROOT / ".cache"
JOHN = "John1:1-21:25"
BEFORE_JOHN = "Gen1:1-Luke24:53"
AFTER_JOHN = "Acts1:1-Rev22:21"


class TextUnavailable(RuntimeError):
    """The real text a run needs is not on this machine and cannot be fetched (a Debian package
    missing, no registry access). Raised, not exited, so a library caller can handle it; scripts
    turn it into their one-line error with `exit_code`."""


def exit_code(main) -> int | str:
    """`main()`'s exit code, or the one-line error for `sys.exit` when its text is unavailable."""
    try:
        return main()
    except TextUnavailable as exc:
        return f"error: {exc}"


def _bible(spec: str) -> str:
    try:
        raw = subprocess.run(["bible", "-p", "/usr/lib", spec], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise TextUnavailable(f"need Debian's bible-kjv for real text (apt-get install bible-kjv): {exc}") from None
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


# --- a larger corpus: no token repeats in the reproduction's budget --------------------------------
# The KJV alone is 4.3 MB: the reproduction's 16.4M byte tokens would see it four times. Two more
# Debian packages of real English, read from their .deb files (downloaded with `apt-get download`
# and unpacked into .cache, nothing installed, no R or dictd needed): Jane Austen's six novels
# (r-cran-janeaustenr, an R data file) and the GNU Collaborative International Dictionary of
# English (dict-gcide: definitions with literary quotations, Webster 1913 + WordNet).

DEB_CACHE = CACHE / "debian"


def debian_package(name: str) -> Path:
    """The unpacked files of Debian package `name` (downloaded once into .cache/debian)."""
    root = DEB_CACHE / name
    if (root / ".complete").is_file():
        return root
    DEB_CACHE.mkdir(parents=True, exist_ok=True)
    for old in DEB_CACHE.glob(f"{name}_*.deb"):
        old.unlink()
    try:
        subprocess.run(["apt-get", "download", name], cwd=DEB_CACHE, check=True, capture_output=True, text=True)
        deb = next(DEB_CACHE.glob(f"{name}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, capture_output=True, text=True)
    except (OSError, StopIteration, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        raise TextUnavailable(f"could not fetch Debian's {name} (apt-get download {name}): "
                              f"{str(detail).strip()[:200]}") from None
    (root / ".complete").write_text("")
    deb.unlink()
    return root


def _r_strings(blob: bytes) -> list:
    """The character strings of one R-serialised (XDR) object: each CHARSXP is 4 bytes of flags
    (low byte 9), a 4-byte length, then the bytes."""
    import struct

    out, i = [], 0
    while i < len(blob) - 8:
        flags, n = struct.unpack(">Ii", blob[i:i + 8])
        if flags & 0xFF == 9 and 0 <= n < 1_000_000 and i + 8 + n <= len(blob):
            out.append(blob[i + 8:i + 8 + n].decode("utf-8", "replace"))
            i += 8 + n
        else:
            i += 1
    return out


def austen_novels() -> list:
    """Jane Austen's six novels (janeaustenr's lazy-load database: zlib blocks, one per novel)."""
    import zlib

    rdb = next(debian_package("r-cran-janeaustenr").rglob("Rdata.rdb")).read_bytes()
    novels, pos = [], 0
    while pos < len(rdb):
        d = zlib.decompressobj()
        blob = d.decompress(rdb[pos + 4:])
        pos = len(rdb) - len(d.unused_data)
        lines = _r_strings(blob)
        novels.append(" ".join(" ".join(ln for ln in lines if ln.strip() and ln != "UTF-8").split()))
    return [n for n in novels if len(n) > 100_000]


def gcide_entries() -> list:
    """The dictionary's entries as plain text: headword markup, source tags and braces removed."""
    import gzip

    path = next(debian_package("dict-gcide").rglob("gcide.dict.dz"))
    text = gzip.decompress(path.read_bytes()).decode("utf-8", "replace")
    text = text[text.find("Begin file 1 of 26"):]
    entries = []
    for raw in re.split(r"\n\n(?=\S)", text):
        raw = re.sub(r"\[(1913 Webster|WordNet 1\.5|PJC|Webster 1913 Suppl\.|RHG|Century Dict\.|F|U|\w+ \d+)\]", "", raw)
        raw = re.sub(r"\\[^\\\n]*\\", "", raw)  # pronunciation \Al"ley*way`\
        raw = raw.replace("{", "").replace("}", "")
        flat = " ".join(raw.split())
        if len(flat) > 40 and not flat.startswith(("Begin file", "End of file")):
            entries.append(flat)
    return entries


def mixed_corpus(block_bytes: int = 16384, seed: int = 0) -> tuple[bytes, bytes]:
    """(train, validation) bytes of KJV (without John) + Austen + GCIDE, ~38 MB: every source cut into
    blocks of `block_bytes`, the blocks shuffled with a fixed seed (a stationary mixture), 1 in 64
    blocks held out for validation. Cached in .cache."""
    cache = CACHE / f"mixed-corpus-{block_bytes}-{seed}.pt"
    if cache.is_file():
        d = torch.load(cache, weights_only=True)
        return bytes(d["train"].tolist()), bytes(d["val"].tolist())
    kjv_train, _ = kjv_split()
    sources = [kjv_train, *austen_novels(), " ".join(gcide_entries())]
    blocks = []
    for src in sources:
        b = src.encode("utf-8")
        blocks += [b[i:i + block_bytes] for i in range(0, len(b) - block_bytes + 1, block_bytes)]
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed)).tolist()
    val = b"".join(blocks[i] for i in order[::64])
    train = b"".join(blocks[i] for j, i in enumerate(order) if j % 64)
    CACHE.mkdir(exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    torch.save({"train": torch.frombuffer(bytearray(train), dtype=torch.uint8),
                "val": torch.frombuffer(bytearray(val), dtype=torch.uint8)}, tmp)
    tmp.replace(cache)
    return train, val


# --- the trainer's batches -------------------------------------------------------------------------

def batch_for(step: int, train: torch.Tensor, *, batch: int, accum: int, seed: int, rank: int = 0,
              world: int = 1) -> list:
    """This rank's micro-batches of step `step`: a fixed permutation per epoch, consecutive global
    batches of `batch` sequences, each rank a contiguous share, split into `accum` micro-batches."""
    n = train.shape[0]
    start = step * batch
    epoch, offset = divmod(start, n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    idx = torch.cat([perm, torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch + 1))])
    rows = idx[offset:offset + batch]
    share = rows[rank * batch // world:(rank + 1) * batch // world]
    return [train[part] for part in share.chunk(accum)]


__all__ = ["TextUnavailable", "exit_code", "CACHE", "JOHN", "BEFORE_JOHN", "AFTER_JOHN", "kjv_split", "token_split", "pack", "byte_tokens",
           "debian_package", "austen_novels", "gcide_entries", "mixed_corpus", "batch_for"]
