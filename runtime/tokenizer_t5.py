"""T5's SentencePiece-Unigram tokenizer through HF ``tokenizers``, from the ``tokenizer.json`` in the bundle.

The file carries T5's whole pipeline (normaliser, Metaspace pre-tokeniser, Unigram model, the ``$A </s>``
post-processor), so ids equal transformers' ``T5TokenizerFast`` on the same file, which runs the same Rust
tokenizer with truncation to ``max_length`` (keeping ``</s>``) and padding with ``<pad>``, as diffusers' SD3 and
FLUX pipelines call it. What is cut beyond the maximum length is logged as a warning, as those pipelines do.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import LdmExportError
from .tokenizer import _first_warning, current_role, cut_shown, prompt_start

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"


class T5Tokenizer:
    """``input_ids`` (B, max_length) int32 of T5 (eos-terminated, padded with the pad id)."""

    def __init__(self, folder: str | Path, max_length: int = 256):
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        path = self.folder / TOKENIZER_FILE
        if not path.is_file():
            raise LdmExportError(f"T5 tokenizer file {path} is missing; a T5 tokenizer folder needs tokenizer.json "
                                 "(diffusers folders have it in tokenizer_3/ for SD3, tokenizer_2/ for FLUX)")
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception on malformed files
            raise LdmExportError(f"cannot load {path}: {e}; copy the tokenizer.json of the model again") from e
        config = _read_config(self.folder)
        self.pad_token = _content(config.get("pad_token")) or "<pad>"
        self.eos_token = _content(config.get("eos_token")) or "</s>"
        self.pad_id = self._required_id(self.pad_token)
        self.eos_id = self._required_id(self.eos_token)
        if max_length < 2:
            raise LdmExportError(f"max_length must be at least 2 (a token and </s>), got {max_length}")
        self.max_length = int(max_length)
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()

    def _required_id(self, token: str) -> int:
        i = self._tokenizer.token_to_id(token)
        if i is None:
            raise LdmExportError(f"token {token!r} is not in {self.folder / TOKENIZER_FILE}; use T5's tokenizer.json")
        return i

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """(B, max_length) int32: the prompt's pieces, ``</s>``, then pad; cut to max_length keeping ``</s>``."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise LdmExportError("prompts must be a non-empty list of strings")
        out = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int32)
        warned = set()
        for b, prompt in enumerate(prompts):
            ids = self._tokenizer.encode(prompt).ids  # with the file's post-processor: ... </s>
            if len(ids) > self.max_length:
                body = ids[:-1] if ids[-1] == self.eos_id else ids  # the post-processor's </s> goes back on last
                keep = self.max_length - 1
                if prompt not in warned and _first_warning((prompt, "t5", self.max_length)):  # once (see ClipTokenizer)
                    logger.warning("the %s %s was truncated by %d tokens because T5 takes at most %d tokens here; "
                                   "the cut text: %s", current_role(), prompt_start(prompt), len(body) - keep,
                                   self.max_length,
                                   cut_shown(self.decode(body[keep:])))
                    warned.add(prompt)
                ids = body[:keep] + [self.eos_id]
            out[b, :len(ids)] = ids
        return out


def _content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_config(folder: Path) -> dict:
    merged: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        p = folder / name
        if p.is_file():
            try:
                merged.update(json.loads(p.read_text(encoding="utf-8")))
            except (OSError, ValueError) as e:
                raise LdmExportError(f"cannot read {p}: {e}; copy the tokenizer folder again") from e
    return merged
