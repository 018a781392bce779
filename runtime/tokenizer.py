"""CLIP's BPE tokenizer through HF ``tokenizers``, giving the ids of OpenAI's ``clip/simple_tokenizer.py``.

OpenAI's clean-up is ``ftfy.fix_text`` -> ``html.unescape`` twice -> whitespace clean -> ``str.lower``;
then its split regex, byte-level mapping and BPE with ``</w>`` word ends. The clean-up runs here in
Python, in that order, because tokenizers' normalisers cannot express it: HF's ``CLIPTokenizerFast``
(NFC, ``\\s+`` -> space, char-wise lowercase) does no HTML unescaping, no ftfy fixes (curly quotes,
ligatures, full-width forms, mojibake) and lowercases without Python's final-sigma rule, so its ids
differ from CLIP's on such prompts. Split, byte-level mapping and BPE run in ``tokenizers``.

ftfy is a dependency of the base install (OpenAI's clean-up is defined by it).
"""
from __future__ import annotations

import contextlib
import contextvars
import html
import json
import logging
import re
import shutil
import threading
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import LdmExportError

logger = logging.getLogger(__name__)

from ftfy import fix_text

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
# OpenAI's pattern less its special-token alternatives (tokenizers matches those as added tokens).
# It is compiled with IGNORECASE there; the text is lower-cased before it, so the flag is moot.
CLIP_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

def _clean_keeping_case(text: str) -> str:
    """OpenAI CLIP's ``whitespace_clean(basic_clean(text))``: the prompt as CLIP reads it, before lower-casing."""
    text = html.unescape(html.unescape(fix_text(text))).strip()
    return " ".join(text.split())


def clean_prompt(text: str) -> str:
    """OpenAI CLIP's clean-up: ``whitespace_clean(basic_clean(text)).lower()`` (clip/simple_tokenizer.py)."""
    return _clean_keeping_case(text).lower()


def default_tokenizer_dir() -> Path:
    """The packaged vocab.json and merges.txt (derived from OpenAI's bpe_simple_vocab_16e6 by tools/)."""
    return Path(str(resources.files("ldm_export.runtime") / "data"))


def _token_content(value) -> str | None:
    """A special token as HF stores it: a plain string or an AddedToken dict with ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_pad_token(folder: Path) -> str | None:
    """pad_token from special_tokens_map.json (which transformers lets win) or else tokenizer_config.json."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise LdmExportError(f"cannot read {path}: {e}; fix or delete the file") from e
        token = _token_content(data.get("pad_token")) if isinstance(data, dict) else None
        if token is not None:
            return token
    return None


ADDED_TOKENS_FILE = "added_tokens.json"


def read_added_tokens(folder: Path, base_size: int) -> dict[str, int]:
    """The tokens a fine-tune added past CLIP's ``base_size`` ids (textual inversion: ``<cat-toy>`` -> 49408), as a
    transformers tokenizer folder stores them: ``added_tokens.json``, ``tokenizer_config.json``'s
    ``added_tokens_decoder`` or ``tokenizer.json``'s ``added_tokens``. Their ids must follow the vocabulary without
    a gap (as ``add_tokens`` assigns them)."""
    found: dict[str, int] = {}

    def load(name: str):
        path = folder / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise LdmExportError(f"cannot read {path}: {e}; fix or delete the file") from e

    data = load(ADDED_TOKENS_FILE)
    if isinstance(data, dict):
        found.update({t: i for t, i in data.items() if isinstance(t, str) and isinstance(i, int)})
    data = load("tokenizer_config.json")
    if isinstance(data, dict) and isinstance(data.get("added_tokens_decoder"), dict):
        for i, tok in data["added_tokens_decoder"].items():
            content = _token_content(tok)
            if content is not None and str(i).isdigit():
                found.setdefault(content, int(i))
    data = load("tokenizer.json")
    if isinstance(data, dict) and isinstance(data.get("added_tokens"), list):
        for tok in data["added_tokens"]:
            if isinstance(tok, dict) and isinstance(tok.get("id"), int) and _token_content(tok) is not None:
                found.setdefault(_token_content(tok), tok["id"])
    added = dict(sorted(((t, i) for t, i in found.items() if i >= base_size), key=lambda kv: kv[1]))
    expected = list(range(base_size, base_size + len(added)))
    if list(added.values()) != expected:
        raise LdmExportError(f"{folder}: the added tokens' ids {list(added.values())[:8]} do not follow the "
                             f"{base_size}-token vocabulary without a gap; save the tokenizer again with transformers")
    return added


def cut_shown(text: str, limit: int = 300) -> str:
    """The cut part of a prompt as a warning shows it: whole up to ``limit`` characters (as diffusers prints it), else
    its start and how much more was cut (a pasted page would fill the terminal)."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text) - limit} more characters)"


def prompt_start(prompt: str, words: int = 6, chars: int = 60) -> str:
    """How a warning names a prompt: its first words (at most ``chars`` characters: a prompt without spaces, in
    Chinese or emoji, is one long word), quoted."""
    head = prompt.split()
    start = " ".join(head[:words])
    cut = len(head) > words or len(start) > chars
    return repr(start[:chars] + (" ..." if cut else ""))


_ROLE = contextvars.ContextVar("ldm_export_prompt_role", default="prompt")


@contextlib.contextmanager
def prompt_role(role: str):
    """Within the block, truncation warnings name the text they cut as ``role`` ("negative prompt")."""
    token = _ROLE.set(role)
    try:
        yield
    finally:
        _ROLE.reset(token)


def current_role() -> str:
    """What a truncation warning calls the text it cut: "prompt", or the role `prompt_role` set."""
    return _ROLE.get()


_SHARED_WARNINGS = threading.local()  # while `one_warning_per_prompt` runs in a thread: the cuts warned about so far


@contextlib.contextmanager
def one_warning_per_prompt(record: set | None = None):
    """Within the block, a prompt cut the same way by several CLIP tokenizers (SDXL's and SD3's two) is warned about
    once. Nested blocks share the outermost one's record (a whole ``Pipeline`` call or bench run warns once per
    prompt, however often it encodes); ``record`` keeps the cuts across blocks (a request's batches). Per thread: a
    server's replica encodes in worker threads."""
    outer = getattr(_SHARED_WARNINGS, "cuts", None)
    if outer is not None:
        yield
        return
    _SHARED_WARNINGS.cuts = record if record is not None else set()
    try:
        yield
    finally:
        _SHARED_WARNINGS.cuts = outer


def _first_warning(key) -> bool:
    cuts = getattr(_SHARED_WARNINGS, "cuts", None)
    if cuts is None:
        return True
    if key in cuts:
        return False
    cuts.add(key)
    return True


class ClipTokenizer:
    """CLIP BPE tokenizer (OpenAI's ids) padded and truncated to 77 the way SD 1.x/2.x pipelines do.

    ``folder`` holds vocab.json and merges.txt (a bundle's ``tokenizer/``); it defaults to the packaged
    CLIP vocabulary. The pad id is ``pad_id`` if given, else the folder's ``pad_token`` (SD 1.5:
    ``<|endoftext|>`` 49407; SD 2: ``!`` 0), else 49407.
    """

    def __init__(self, folder: str | Path | None = None, pad_id: int | None = None,
                 max_length: int = MODEL_MAX_LENGTH):
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

        self.folder = Path(folder) if folder is not None else default_tokenizer_dir()
        vocab_path, merges_path = self.folder / "vocab.json", self.folder / "merges.txt"
        for p in (vocab_path, merges_path):
            if not p.is_file():
                raise LdmExportError(f"tokenizer file {p} is missing; a tokenizer folder needs vocab.json and merges.txt")
        try:
            bpe = models.BPE.from_file(str(vocab_path), str(merges_path), continuing_subword_prefix="",
                                       end_of_word_suffix="</w>", unk_token=EOS_TOKEN, fuse_unk=False)
        except Exception as e:  # tokenizers raises plain Exception on malformed files
            raise LdmExportError(f"cannot load the BPE vocabulary in {self.folder}: {e}; "
                                 "write it again with write_tokenizer_files()") from e
        tok = Tokenizer(bpe)
        # The clean-up (clean_prompt) runs in Python before encoding, so no normaliser here.
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        # Literal "<|endoftext|>" in a prompt maps to the special id, as OpenAI's regex does.
        tok.add_special_tokens([BOS_TOKEN, EOS_TOKEN])
        self._tokenizer = tok

        self._base_size = tok.get_vocab_size()
        # A fine-tune's added tokens (textual inversion), matched in the prompt as typed before CLIP's clean-up, the
        # way transformers' CLIPTokenizer splits them out (case-sensitive, the longest first)
        self.added = read_added_tokens(self.folder, self._base_size) if (self.folder / ADDED_TOKENS_FILE).is_file() else {}
        self._added_by_id = {i: t for t, i in self.added.items()}
        self._added_re = (re.compile("|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True)))
                          if self.added else None)

        self.bos_id = self._required_id(BOS_TOKEN)
        self.eos_id = self._required_id(EOS_TOKEN)
        if pad_id is None:
            pad_token = _read_pad_token(self.folder)
            pad_id = self.eos_id if pad_token is None else self._required_id(pad_token)
        if not 0 <= int(pad_id) < self.vocab_size:
            raise LdmExportError(f"pad_id {pad_id} is outside the vocabulary of {self.vocab_size} tokens")
        self.pad_id = int(pad_id)
        if max_length < 2:
            raise LdmExportError(f"max_length must be at least 2 (bos + eos), got {max_length}")
        self.max_length = int(max_length)

    def _required_id(self, token: str) -> int:
        i = self._tokenizer.token_to_id(token)
        if i is None:
            raise LdmExportError(f"token {token!r} is not in {self.folder / 'vocab.json'}; use a CLIP vocabulary")
        return i

    @property
    def vocab_size(self) -> int:
        return self._base_size + len(self.added)

    def _pieces(self, prompt: str) -> list[tuple[str, list[int] | None]]:
        """``prompt`` as (text, None) runs for CLIP's BPE and (token, ids) for each added token in it. A multi-vector
        embedding's token ``<t>`` also brings ``<t>_1``, ``<t>_2``, ... where the tokenizer has them, as diffusers'
        ``maybe_convert_prompt`` writes them into the prompt."""
        if self._added_re is None:
            return [(prompt, None)]
        pieces, at = [], 0
        for m in self._added_re.finditer(prompt):
            token = m.group()
            ids, k = [self.added[token]], 1
            while f"{token}_{k}" in self.added:
                ids.append(self.added[f"{token}_{k}"])
                k += 1
            pieces += [(prompt[at:m.start()], None), (token, ids)]
            at = m.end()
        return pieces + [(prompt[at:], None)]

    def encode(self, prompt: str) -> list[int]:
        """Ids of ``prompt`` without bos/eos, untruncated (OpenAI's ``SimpleTokenizer.encode``; added tokens as
        diffusers' pipelines read them through transformers' CLIPTokenizer)."""
        if not isinstance(prompt, str):
            raise LdmExportError(f"prompt must be a string, got {type(prompt).__name__}")
        ids: list[int] = []
        for text, added in self._pieces(prompt):
            ids += added if added is not None else self._tokenizer.encode(clean_prompt(text), add_special_tokens=False).ids
        return ids

    def cut_text(self, prompt: str, keep: int) -> str:
        """The text of ``prompt`` from its token ``keep`` on, as the user typed it: the words, digits and case of the
        prompt after CLIP's whitespace clean-up (decoding the ids would space out digits and lower-case everything)."""
        if self._added_re is not None:
            pieces = self._pieces(prompt)
            for k, (text, added) in enumerate(pieces):
                n = len(added) if added is not None else len(self.encode(text))
                if keep < n:
                    rest = "".join(t for t, _ in pieces[k + 1:])
                    return " ".join(x for x in ((text if added is not None else self._cut_run(text, keep)), rest.strip())
                                    if x)
                keep -= n
            return ""
        return self._cut_run(prompt, keep)

    def _cut_run(self, prompt: str, keep: int) -> str:
        spaced = _clean_keeping_case(prompt)
        cleaned = spaced.lower()  # clean_prompt(prompt)
        offsets = self._tokenizer.encode(cleaned, add_special_tokens=False).offsets
        if keep >= len(offsets):
            return ""
        shown = spaced if len(spaced) == len(cleaned) else cleaned  # lower-casing can change a length ('İ')
        return shown[offsets[keep][0]:]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` with ``</w>`` read as a space (OpenAI's ``SimpleTokenizer.decode``, stripped)."""
        words, run = [], []
        for i in ids:
            if int(i) in self._added_by_id:
                words += [self._decode_run(run), self._added_by_id[int(i)]]
                run = []
            else:
                run.append(int(i))
        return " ".join(w for w in [*words, self._decode_run(run)] if w)

    def _decode_run(self, ids: list[int]) -> str:
        tokens = [self._tokenizer.id_to_token(i) for i in ids]
        if any(t is None for t in tokens):
            raise LdmExportError(f"ids outside the vocabulary of {self.vocab_size} tokens; decode ids this tokenizer made")
        return self._tokenizer.decoder.decode(tokens).replace("</w>", " ").strip()

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """``input_ids`` (B, max_length) int32: bos, tokens, eos, then pad; cut to max_length keeping eos."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise LdmExportError(f"prompts must be a non-empty list of strings, got {type(prompts).__name__}")
        input_ids = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int32)  # (B, 77)
        n_body = self.max_length - 2
        warned = set()
        for b, prompt in enumerate(prompts):
            ids = self.encode(prompt)
            if len(ids) > n_body:
                # As diffusers' pipelines do: say how much was cut and show the cut text (once per prompt: a batch
                # repeats it per image); named by its start, as negative prompts come through here too.
                if prompt not in warned and _first_warning((prompt, self.max_length)):
                    logger.warning("the %s %s was truncated by %d tokens because CLIP can only handle sequences up "
                                   "to %d tokens; the cut text: %s", current_role(), prompt_start(prompt),
                                   len(ids) - n_body, self.max_length, cut_shown(self.cut_text(prompt, n_body)))
                    warned.add(prompt)
                ids = ids[:n_body]
            row = [self.bos_id, *ids, self.eos_id]
            input_ids[b, : len(row)] = row
        return input_ids


def write_tokenizer_files(dest_dir: str | Path, pad_token: str = EOS_TOKEN, source_dir: str | Path | None = None) -> Path:
    """Write vocab.json, merges.txt, special_tokens_map.json and tokenizer_config.json for transformers' CLIPTokenizer."""
    source = Path(source_dir) if source_dir is not None else default_tokenizer_dir()
    dest = Path(dest_dir)
    vocab_path = source / "vocab.json"
    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LdmExportError(f"cannot read {vocab_path}: {e}; pass a folder with a CLIP vocab.json") from e
    for token in (BOS_TOKEN, EOS_TOKEN, pad_token):
        if token not in vocab:
            raise LdmExportError(f"token {token!r} is not in {vocab_path}; SD uses '<|endoftext|>' (1.x) or '!' (2.x)")
    if not (source / "merges.txt").is_file():
        raise LdmExportError(f"{source / 'merges.txt'} is missing; a tokenizer folder needs vocab.json and merges.txt")
    dest.mkdir(parents=True, exist_ok=True)
    if source.resolve() != dest.resolve():
        shutil.copyfile(vocab_path, dest / "vocab.json")
        shutil.copyfile(source / "merges.txt", dest / "merges.txt")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **special,
    }
    (dest / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return dest
