"""Packed sequences for autoregressive training (`loader(..., pack=N)`): one joint vocabulary
(`Vocab`), the greedy placement of documents into rows of N tokens, and the assembly of a
packed batch. Pure functions of integers: the loader computes every rank's batch bounds from
the documents' lengths alone (the sample index holds the caption lengths), so packing keeps
the loader's guarantees (batches independent of num_workers, exact and elastic resume).

A document is one sample: `[bos] text [boi] image [eoi]`, text ids as they are, image codes
offset by the text vocabulary, special ids after both (`Vocab.joint`). Documents go into a
batch's rows in the rank's sample order: a document that does not fit what is left of a row
starts the next row (the rest of the row is padding), and a batch is closed when its rows are
used up, so every document lies whole in one batch and resume needs no partial state. A
document longer than N is, by the declared rule `too_long`, either split over as many whole
rows as it needs ("split"; it then starts a row, and it is skipped if it needs more rows than a
batch has) or skipped ("skip"); skipped documents are counted in the batch that holds their
place (`too_long` in the batch)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tokshard.errors import UsageError

SPECIALS = ("bos", "boi", "eoi", "pad")
TOO_LONG = ("split", "skip")
# The keys of a packed batch besides the documents' own (id, key, label, columns).
BATCH_KEYS = ("input_ids", "loss_mask", "position_ids", "document_ids", "token_type", "too_long")
# What each position of a packed row holds (`token_type` in the batch).
PAD, SPECIAL, TEXT, IMAGE = 0, 1, 2, 3


@dataclass(frozen=True)
class Vocab:
    """The joint vocabulary of packed sequences: text ids [0, text), image codes
    [text, text + image), and the special tokens' ids (`specials`: bos, boi, eoi, pad)."""

    text: int
    image: int
    specials: tuple[tuple[str, int], ...]

    @classmethod
    def joint(cls, text: int = 0, image: int = 0,
              specials: Sequence[str] | Mapping[str, int] = SPECIALS) -> Vocab:
        """Text ids first, then the image codes, then the special tokens: named (`specials` a
        list: ids after the codes, in that order) or at given ids (a mapping name -> id, each
        outside the text and image ranges). bos, boi, eoi and pad are required."""
        for name, v in (("text", text), ("image", image)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise UsageError(f"Vocab.joint: {name} must be a vocabulary size >= 0, got {v!r}")
        if image < 1:
            raise UsageError("Vocab.joint: image must be the image tokenizer's vocabulary size (>= 1)")
        base = int(text) + int(image)
        if isinstance(specials, Mapping):
            ids = dict(specials)
        elif isinstance(specials, str) or not all(isinstance(s, str) for s in specials):
            raise UsageError(f"Vocab.joint: specials must be a list of names or a mapping name -> id, got {specials!r}")
        else:
            ids = {name: base + i for i, name in enumerate(dict.fromkeys(specials))}
        missing = [s for s in SPECIALS if s not in ids]
        if missing:
            raise UsageError(f"Vocab.joint: specials lack {', '.join(missing)} (required: {', '.join(SPECIALS)})")
        seen: dict[int, str] = {}
        for name, i in ids.items():
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0:
                raise UsageError(f"Vocab.joint: special {name!r} has id {i!r}, not an id >= 0")
            if i < text:
                raise UsageError(f"Vocab.joint: special {name!r} id {i} collides with the text ids [0, {text})")
            if i < base:
                raise UsageError(f"Vocab.joint: special {name!r} id {i} collides with the image codes "
                                 f"[{text}, {base})")
            if int(i) in seen:
                raise UsageError(f"Vocab.joint: specials {seen[int(i)]!r} and {name!r} share id {i}")
            seen[int(i)] = name
        return cls(int(text), int(image), tuple(sorted((n, int(i)) for n, i in ids.items())))

    @property
    def ids(self) -> dict[str, int]:
        return dict(self.specials)

    @property
    def size(self) -> int:
        """Ids in use: max id + 1 (the embedding table's rows)."""
        return max([self.text + self.image - 1, *(i for _, i in self.specials)]) + 1

    def describe(self) -> dict:
        return {"text": self.text, "image": self.image, "specials": dict(self.specials)}

    def __str__(self) -> str:
        return json.dumps(self.describe(), sort_keys=True)


def document_lengths(text_lengths: np.ndarray, image_tokens: int | np.ndarray) -> np.ndarray:
    """Tokens of each document: bos, its text, boi, its image codes, eoi (`image_tokens`: one
    count for all, or each document's: variable grids)."""
    return np.asarray(text_lengths, np.int64) + np.asarray(image_tokens, np.int64) + 3


def place(lengths: np.ndarray, seq_len: int, rows: int, too_long: str = "split"
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy placement of documents of `lengths`, in order, into batches of `rows` rows of
    `seq_len` tokens: (batch, row, column) of each document's first token; row -1: skipped
    (too long), counted in the batch it would have been in. Deterministic, and the same for
    any batch's documents placed from that batch's start (what a loader worker does)."""
    n = len(lengths)
    batch = np.empty(n, np.int64)
    row = np.empty(n, np.int64)
    col = np.empty(n, np.int64)
    b = r = c = 0
    for i, size in enumerate(np.asarray(lengths, np.int64).tolist()):
        if size <= seq_len:
            if c + size > seq_len:
                r, c = r + 1, 0
            if r == rows:
                b, r, c = b + 1, 0, 0
            batch[i], row[i], col[i] = b, r, c
            c += size
            continue
        span = -(-size // seq_len)
        if too_long == "skip" or span > rows:
            batch[i], row[i], col[i] = b, -1, -1
            continue
        if c:
            r, c = r + 1, 0
        if r + span > rows:
            b, r, c = b + 1, 0, 0
        batch[i], row[i], col[i] = b, r, 0
        r, c = r + span - 1, size - (span - 1) * seq_len
    return batch, row, col


def pack_bounds(lengths: np.ndarray, seq_len: int, rows: int, too_long: str = "split") -> np.ndarray:
    """Batch bounds over the documents (batch k holds documents bounds[k]:bounds[k+1])."""
    if not len(lengths):
        return np.zeros(1, np.int64)
    batch, _, _ = place(lengths, seq_len, rows, too_long)
    return np.searchsorted(batch, np.arange(int(batch[-1]) + 2)).astype(np.int64)


def assemble(text: Sequence[np.ndarray], image: np.ndarray | Sequence[np.ndarray], vocab: Vocab, seq_len: int,
             rows: int, too_long: str = "split") -> dict[str, np.ndarray]:
    """One packed batch from its documents' text ids and (n, tokens) image codes (or one array of
    codes per document, of its own length: variable grids): input_ids
    (rows, seq_len) int64 (pad id where no document is), loss_mask (True on document tokens),
    position_ids (position in its document, 0 on padding), document_ids (the document's index
    in the batch, -1 on padding: block-diagonal attention), token_type (PAD, SPECIAL, TEXT,
    IMAGE), and too_long: how many of the documents were skipped."""
    ids = vocab.ids
    if isinstance(image, np.ndarray):
        n = image.shape[0]
        width = np.full(n, int(np.prod(image.shape[1:])), np.int64)
        codes = np.asarray(image, np.int64).reshape(n, int(width[0]) if n else 0)
    else:
        n = len(image)
        width = np.fromiter((np.size(a) for a in image), np.int64, count=n)
    lengths = np.fromiter((len(t) for t in text), np.int64, count=n) + width + 3
    batch, row, col = place(lengths, seq_len, rows, too_long)
    if n and batch[-1] != 0:
        raise AssertionError("a packed batch's documents spill over its rows")   # (bounds said they fit)
    flat_ids = np.full(rows * seq_len, ids["pad"], np.int64)
    flat_pos = np.zeros(rows * seq_len, np.int64)
    flat_doc = np.full(rows * seq_len, -1, np.int64)
    flat_type = np.zeros(rows * seq_len, np.int8)
    kept = np.flatnonzero(row >= 0)
    if len(kept):
        # Every kept document's tokens at once: its number and the position in it of each
        # token, what sits there (by position: bos, text, boi, image, eoi), and where it goes
        # (a split document runs on into the next rows).
        size = lengths[kept]
        doc = np.repeat(kept, size)
        first = np.cumsum(size) - size
        pos = np.arange(int(size.sum()), dtype=np.int64) - np.repeat(first, size)
        each = np.repeat(np.arange(len(kept)), size)
        n_text = (size - width[kept] - 3)[each]
        n_image = width[kept][each]
        kind = np.where(pos == 0, SPECIAL, np.where(pos <= n_text, TEXT, np.where(pos == n_text + 1, SPECIAL,
                        np.where(pos < n_text + 2 + n_image, IMAGE, SPECIAL)))).astype(np.int8)
        values = np.full(len(pos), ids["eoi"], np.int64)
        values[pos == 0] = ids["bos"]
        values[(pos == n_text + 1)] = ids["boi"]
        if (kind == TEXT).any():
            values[kind == TEXT] = np.concatenate([np.asarray(text[d], np.int64) for d in kept.tolist()])
        if not width[kept].any():
            pass
        elif isinstance(image, np.ndarray):     # one grid: one gather
            values[kind == IMAGE] = (codes[kept] + vocab.text).ravel()
        else:
            values[kind == IMAGE] = np.concatenate([np.asarray(image[d], np.int64).ravel()
                                                    for d in kept.tolist()]) + vocab.text
        at = (row * seq_len + col)[doc] + pos
        flat_ids[at], flat_type[at], flat_doc[at], flat_pos[at] = values, kind, doc, pos
    shape = (rows, seq_len)
    return {"input_ids": flat_ids.reshape(shape), "loss_mask": (flat_doc >= 0).reshape(shape),
            "position_ids": flat_pos.reshape(shape), "document_ids": flat_doc.reshape(shape),
            "token_type": flat_type.reshape(shape), "too_long": np.asarray((row < 0).sum(), np.int64)}


def unpack(input_ids: np.ndarray, document_ids: np.ndarray, token_type: np.ndarray, vocab: Vocab
           ) -> list[tuple[np.ndarray, np.ndarray]]:
    """A packed batch back into its documents: [(text ids, image codes)] by document index
    (the inverse of `assemble`, for tests and for looking at a batch)."""
    docs = int(document_ids.max(initial=-1)) + 1
    flat_ids, flat_doc, flat_type = input_ids.ravel(), document_ids.ravel(), token_type.ravel()
    out = []
    for d in range(docs):
        mine = flat_doc == d
        kinds, values = flat_type[mine], flat_ids[mine]
        out.append((values[kinds == TEXT], values[kinds == IMAGE] - vocab.text))
    return out
