"""A stand-in T5 tokenizer (SentencePiece-style Unigram, T5's special tokens and post-processor) built with HF
``tokenizers`` from a small built-in corpus: for bundles built with random weights and for tests, where T5's own
``tokenizer.json`` cannot be downloaded. A bundle built from real weights copies the model's own file instead.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5


def corpus() -> list[str]:
    """English prompt-like sentences: the demo's captions plus a few general ones (deterministic)."""
    import numpy as np

    from ldm_export.demo.data import caption, sample_scene

    rng = np.random.default_rng(0)
    lines = [caption(sample_scene(rng), rng) for _ in range(3000)]
    lines += ["a photograph of an astronaut riding a horse on the moon", "a watercolor painting of a lighthouse at "
              "dusk, dramatic clouds, highly detailed", "portrait of an old man with a beard, studio lighting, 85mm",
              "a cat sitting on a windowsill in the morning sun", "an isometric illustration of a tiny city"] * 20
    return lines


def write_standin_t5_tokenizer(dest: str | Path, vocab_size: int = 1000) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (T5TokenizerFast's files).

    The Unigram vocabulary is built, not trained: T5's special tokens (ids 0-2), the corpus' words as whole pieces
    scored by their log frequency, then every printable ASCII character (and the word-start mark) scored below any
    word, so an unknown word splits into characters and no plain-English prompt meets <unk>. The same arguments give
    the same file: ``tokenizers``' Unigram trainer does not (its result changes from run to run), which made two
    builds of one seed draw different images."""
    import math
    import unicodedata
    from collections import Counter

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    words = Counter(w for line in corpus() for w in unicodedata.normalize("NFKC", line).split())
    total = sum(words.values())
    alphabet = ["\u2581"] + [chr(c) for c in range(33, 127)]
    n_words = max(0, int(vocab_size) - len(SPECIAL_TOKENS) - len(alphabet))
    ranked = sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))[:n_words]
    vocab = [(t, 0.0) for t in SPECIAL_TOKENS]
    vocab += [("\u2581" + w, math.log(c / total)) for w, c in ranked]
    floor = min((score for _, score in vocab[len(SPECIAL_TOKENS):]), default=0.0) - 10.0
    vocab += [(ch, floor - 0.001 * i) for i, ch in enumerate(alphabet)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=SPECIAL_TOKENS.index("<unk>"), byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tok.save(str(dest / "tokenizer.json"))
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (dest / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (dest / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 0, **special,
         "ldm_export_note": "stand-in tokenizer trained by ldm-export (random-weights build), not T5's own"},
        indent=2) + "\n")
    log.info("wrote a stand-in T5 tokenizer (%d pieces) to %s", tok.get_vocab_size(), dest)
    return dest
