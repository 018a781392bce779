"""A stand-in T5 tokenizer (SentencePiece-style Unigram, T5's special tokens and post-processor) trained with HF
``tokenizers`` on a small built-in corpus: for bundles built with random weights and for tests, where T5's own
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
    """Train and write tokenizer.json, tokenizer_config.json and special_tokens_map.json (T5TokenizerFast's files)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    # every printable ASCII character is a piece, so no plain-English prompt meets <unk>
    alphabet = [chr(c) for c in range(33, 127)]
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), unk_token="<unk>",
                                      initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
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
