"""Derive CLIP's ``vocab.json`` and ``merges.txt`` from OpenAI's ``bpe_simple_vocab_16e6.txt.gz``.

Usage: ``python tools/derive_clip_vocab.py WHEEL_OR_GZ OUTDIR``

WHEEL_OR_GZ is either the gzip file itself or a wheel that holds it (``open_clip_torch``'s does:
``pip download open-clip-torch --no-deps -d /tmp/oc``). The encoder is built exactly as
``SimpleTokenizer.__init__`` in OpenAI's ``clip/simple_tokenizer.py`` builds it: the 256 byte-unicode
characters, their ``</w>`` forms, the first 49152-256-2 merges joined, then ``<|startoftext|>`` (49406)
and ``<|endoftext|>`` (49407). ``merges.txt`` keeps those merges under HF's ``#version: 0.2`` header.
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
import zipfile
from pathlib import Path


GZ_NAME = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # OpenAI: merges[1:49152-256-2+1]
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 utf-8 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def read_bpe_gz(source: Path) -> bytes:
    """The gzip bytes, read from the .gz itself or from the member of a wheel/zip that ends in its name."""
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as zf:
            names = [n for n in zf.namelist() if n.endswith("/" + GZ_NAME) or n == GZ_NAME]
            if not names:
                raise SystemExit(f"error: {source} holds no {GZ_NAME}; pass the open_clip_torch wheel or the .gz file")
            return zf.read(names[0])
    return source.read_bytes()


def derive(gz_bytes: bytes) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(encoder, merges) exactly as OpenAI's SimpleTokenizer builds them."""
    lines = gzip.decompress(gz_bytes).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise SystemExit(f"error: expected {N_MERGES} two-symbol merges after the header, the file does not hold them")
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += list(SPECIAL_TOKENS)
    encoder = dict(zip(vocab, range(len(vocab))))
    if len(encoder) != len(vocab) or len(encoder) != 49408:
        raise SystemExit(f"error: derived {len(encoder)} distinct tokens from {len(vocab)}, expected 49408")
    return encoder, merges


def write(encoder: dict[str, int], merges: list[tuple[str, str]], outdir: Path) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    # Same layout as the vocab.json of HF's openai/clip-* repositories: compact, non-ASCII kept.
    (outdir / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    with open(outdir / "merges.txt", "w", encoding="utf-8", newline="\n") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help=f"open_clip_torch wheel or {GZ_NAME}")
    parser.add_argument("outdir", type=Path, help="folder to write vocab.json and merges.txt into")
    args = parser.parse_args(argv)
    encoder, merges = derive(read_bpe_gz(args.source))
    write(encoder, merges, args.outdir)
    print(f"wrote {len(encoder)} tokens and {len(merges)} merges to {args.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
