"""The text tokenizer: a Hugging Face `tokenizer.json`, read from a local file (never
downloaded), that turns each sample's caption into the `text_tokens` column (issue 17).

Its identity is the sha256 of the file's bytes: the bytes hashed are the bytes parsed
(`Tokenizer.from_str` on what was read, not a second read by path), and the dataset keeps
a copy of them, so the ids can always be decoded with exactly the tokenizer that wrote them.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from tokshard.errors import TokenizerError

# Every id of a real text vocabulary (32k-256k, and beyond 65,535) fits; one width for
# every dataset keeps the stored column one type.
TEXT_TOKEN_DTYPE = np.dtype(np.uint32)
DEFAULT_MAX_TEXT_TOKENS = 512
# A tokenizer.json of a 256k vocabulary is ~20 MB; this bounds what is read from a dataset.
MAX_TEXT_TOKENIZER_BYTES = 256 * 2**20


def hf_tokenizers() -> ModuleType:
    """Hugging Face's `tokenizers` module.

    A plain `import tokenizers` can find this repository's own `tokenizers/` folder
    (tokshard.tokenizers), or a copy of it, instead: `python -m ...` run from a checkout puts
    the working directory first on sys.path. So the module is the first `tokenizers` package
    on the search path that holds Hugging Face's compiled extension (tokenizers.abi3.so, or
    .pyd), registered under its own name (its submodules import it so)."""
    found = sys.modules.get("tokenizers")
    if found is not None and hasattr(found, "Tokenizer"):
        return found
    spec = None
    for entry in sys.path:
        if not isinstance(entry, str):
            continue
        candidate = importlib.machinery.PathFinder.find_spec("tokenizers", [entry])
        if candidate is not None and candidate.origin and any(
                f.name.startswith("tokenizers.") and f.suffix in (".so", ".pyd")
                for f in Path(candidate.origin).parent.iterdir()):
            spec = candidate
            break
    if spec is None or spec.loader is None:
        raise TokenizerError("--text-tokenizer needs Hugging Face's tokenizers package: pip install tokenizers")
    module = importlib.util.module_from_spec(spec)
    sys.modules["tokenizers"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        # (a module left half-imported would be found, broken, by the next import)
        if found is None:
            sys.modules.pop("tokenizers", None)
        else:
            sys.modules["tokenizers"] = found
        raise
    return module


def parse_tokenizer_json(data: bytes, where: str) -> Any:
    """A Hugging Face Tokenizer from tokenizer.json bytes; TokenizerError naming `where` and the cause."""
    hf = hf_tokenizers()
    try:
        tok = hf.Tokenizer.from_str(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise TokenizerError(f"text tokenizer {where}: not a tokenizer.json (not UTF-8: {e})") from None
    except Exception as e:  # the Rust parser raises a bare Exception
        raise TokenizerError(f"text tokenizer {where}: not a Hugging Face tokenizer.json ({e})"[:500]) from None
    # The file's own truncation or padding would cut or pad captions silently: the job cuts
    # at --max-text-tokens and counts each cut, and stores captions unpadded.
    tok.no_truncation()
    tok.no_padding()
    return tok


@dataclass
class TextTokenizer:
    """A loaded tokenizer.json and the job's cap on ids per caption; picklable (the Ray
    engine ships it to its commit tasks): it travels as its bytes and parses again there."""
    name: str               # "<folder>/<file>" it was read from: for people; the sha256 is the identity
    data: bytes             # the tokenizer.json bytes
    max_tokens: int
    model: str = ""         # the tokenizer model's type: BPE, Unigram, WordPiece, WordLevel
    vocab_size: int = 0     # every id is below it
    sha256: str = ""
    _tok: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def load(cls, path: str | Path, max_tokens: int = DEFAULT_MAX_TEXT_TOKENS) -> TextTokenizer:
        """The tokenizer.json at local path `path`; TokenizerError naming the path and the cause."""
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as e:
            raise TokenizerError(f"text tokenizer {path}: cannot read it ({e.strerror or e})") from None
        return cls.from_bytes(data, f"{p.parent.name}/{p.name}" if p.parent.name else p.name, max_tokens,
                              where=str(path))

    @classmethod
    def from_bytes(cls, data: bytes, name: str, max_tokens: int, where: str = "") -> TextTokenizer:
        tok = parse_tokenizer_json(data, where or name)
        vocab = tok.get_vocab(with_added_tokens=True)
        # Ids need not be dense (added tokens, hand-made vocabularies): the bound is the largest + 1.
        vocab_size = max(vocab.values(), default=-1) + 1
        if vocab_size > 2**32:
            raise TokenizerError(f"text tokenizer {where or name}: ids up to {vocab_size - 1} do not fit in uint32")
        try:
            model = str(json.loads(data)["model"]["type"])
        except (ValueError, KeyError, TypeError):
            model = type(tok.model).__name__
        return cls(name=name, data=data, max_tokens=int(max_tokens), model=model, vocab_size=vocab_size,
                   sha256=hashlib.sha256(data).hexdigest(), _tok=tok)

    @property
    def tokenizer(self) -> Any:
        """The Hugging Face Tokenizer (parsed again after a pickle round trip)."""
        if self._tok is None:
            self._tok = parse_tokenizer_json(self.data, self.name)
        return self._tok

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tok": None}

    def encode(self, captions: list[str | None]) -> tuple[list[np.ndarray], int, int]:
        """(one uint32 id array per caption, captions cut at max_tokens, captions that are None).

        Ids are the tokenizer's own encoding (its normaliser, pre-tokenizer and special
        tokens), the first max_tokens kept; a sample without a caption gets no ids."""
        out: list[np.ndarray] = []
        truncated = missing = 0
        empty = np.empty(0, TEXT_TOKEN_DTYPE)
        tok = self.tokenizer
        for caption in captions:
            if caption is None:
                missing += 1
                out.append(empty)
                continue
            # One caption at a time, not encode_batch: its thread pool would make every later
            # fork (DataLoader workers) warn and turn it off, and a caption costs microseconds
            # next to the milliseconds of decoding its image.
            ids = tok.encode(caption).ids
            truncated += len(ids) > self.max_tokens
            out.append(np.asarray(ids[: self.max_tokens], TEXT_TOKEN_DTYPE))
        return out, truncated, missing
