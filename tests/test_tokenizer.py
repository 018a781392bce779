"""ClipTokenizer against OpenAI CLIP's own tokenizer algorithm, transformers' CLIPTokenizer and golden ids."""
from __future__ import annotations

import gzip
import html
import json
import logging
import subprocess
import sys
import unicodedata
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from ldm_export.runtime import tokenizer as tokmod
from ldm_export.runtime.errors import LdmExportError
from ldm_export.runtime.tokenizer import ClipTokenizer, default_tokenizer_dir, write_tokenizer_files

regex = pytest.importorskip("regex")  # the reference's regex engine (OpenAI uses it; transformers depends on it)
try:
    import ftfy
except ImportError:
    ftfy = None

ROOT = Path(__file__).resolve().parents[1]


# --- Golden reference: OpenAI's clip/simple_tokenizer.py (github.com/openai/CLIP, MIT, (c) 2021 OpenAI),
# ported verbatim except that it reads vocab.json/merges.txt instead of the .gz, and that without ftfy the
# caller must pass only text on which ftfy.fix_text acts as NFC (INERT_PROMPTS; checked when ftfy exists).
def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _get_pairs(word):
    pairs = set()
    prev_char = word[0]
    for char in word[1:]:
        pairs.add((prev_char, char))
        prev_char = char
    return pairs


def _basic_clean(text):
    text = ftfy.fix_text(text) if ftfy is not None else unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def _whitespace_clean(text):
    text = regex.sub(r"\s+", " ", text)
    return text.strip()


class OpenAISimpleTokenizer:
    def __init__(self, folder: Path):
        self.byte_encoder = _bytes_to_unicode()
        merges = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = merges[1 : 49152 - 256 - 2 + 1]
        merges = [tuple(merge.split()) for merge in merges]
        self.encoder = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        self.bpe_ranks = dict(zip(merges, range(len(merges))))
        self.cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}
        self.pat = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE)

    def bpe(self, token):
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = _get_pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                    new_word.extend(word[i:j])
                    i = j
                except ValueError:
                    new_word.extend(word[i:])
                    break
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = _get_pairs(word)
        word = " ".join(word)
        self.cache[token] = word
        return word

    def encode(self, text):
        bpe_tokens = []
        text = _whitespace_clean(_basic_clean(text)).lower()
        for token in regex.findall(self.pat, text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            bpe_tokens.extend(self.encoder[bpe_token] for bpe_token in self.bpe(token).split(" "))
        return bpe_tokens

    def tokenize(self, texts, context_length=77, pad_id=0):
        """OpenAI's clip.tokenize(..., truncate=True), with the pad value a parameter (OpenAI pads 0)."""
        sot, eot = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]
        result = np.full((len(texts), context_length), pad_id, dtype=np.int64)
        for i, text in enumerate(texts):
            tokens = [sot] + self.encode(text) + [eot]
            if len(tokens) > context_length:
                tokens = tokens[:context_length]
                tokens[-1] = eot
            result[i, : len(tokens)] = tokens
        return result


LONG = ("a highly detailed matte painting of a futuristic city at sunset, volumetric lighting, octane render, "
        "trending on artstation, by greg rutkowski and alphonse mucha, 8k, ultra realistic, intricate details, "
        "sharp focus, cinematic composition, dramatic clouds, reflections in the water, flying cars, neon signs")

# Prompts on which ftfy.fix_text followed by CLIP's HTML unescaping equals NFC followed by it
# (test_inert_prompts_are_inert_under_ftfy checks it).
INERT_PROMPTS = [
    "", " ", "a photo of a cat", "A Photo Of A CAT", "  lots   of \t spaces\nand\nnewlines  ",
    "hello, world! (masterpiece:1.2), [best quality], {blue|red} <lora:x:0.8>",
    "1girl, 2boys, 3.14159, 1920x1080, $100, 50% off, #hashtag @user",
    "don't can't I'm you're we've they'll he'd it's DON'T IT'S",
    "café crème brûlée, naïve façade, Ångström, São Paulo, Zürich, œuvre, ß",
    "cafe\u0301 (decomposed accent)", "emoji 🐱🐶🚀 👍🏽 ❤️ 🇫🇷 family 👨‍👩‍👧",
    "日本語のテキスト, 中文提示, 한국어", "Ελληνικά ΟΔΟΣ σοφία, русский текст, עברית, العربية",
    "a<|endoftext|>b <|startoftext|>", "tom & jerry &amp; friends &lt;3",
    "!!!???...,,,---___***", "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "numbers 0123456789 ٣ ४ ① ²", "mixed\u00a0nbsp\u2009thin\u3000ideographic", "İstanbul",
    LONG, LONG + ", " + LONG, ", ".join(["masterpiece"] * 80),
]
# Prompts ftfy changes beyond NFC: curly quotes, ligatures, full-width forms, control chars, mojibake.
FTFY_PROMPTS = [
    "it\u2019s a \u201cquoted\u201d word", "\ufb01ne \ufb02oral \ufb03ce ǅ", "ＬＯＵＤ　ＮＯＩＳＥＳ ｶﾀｶﾅ",
    "bell\x07 and \x00null", "mojibake: cafÃ© and donâ€™t", "&amp;amp; triple-escaped &amp;lt;", "&lt;b&gt;bold&lt;/b&gt; <i>tag</i> &amp;",
]


@pytest.fixture(scope="module")
def tok():
    return ClipTokenizer()


@lru_cache(maxsize=None)
def _reference() -> OpenAISimpleTokenizer:
    return OpenAISimpleTokenizer(default_tokenizer_dir())


@pytest.fixture(scope="module")
def ref():
    return _reference()


def test_golden_ids(tok):
    # Independently known CLIP ids (OpenAI CLIP / HF CLIPTokenizer documentation and SD pipelines).
    ids = tok(["a photo of a cat", "a photo of a dog", "Hello world"])
    assert ids.shape == (3, 77) and ids.dtype == np.int32
    assert ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]
    assert ids[1, :7].tolist() == [49406, 320, 1125, 539, 320, 1929, 49407]
    assert ids[2, :4].tolist() == [49406, 3306, 1002, 49407]
    assert (ids[0, 7:] == 49407).all()


def test_packaged_vocab_follows_clip_construction():
    vocab = json.loads((default_tokenizer_dir() / "vocab.json").read_text(encoding="utf-8"))
    lines = (default_tokenizer_dir() / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert lines[0] == "#version: 0.2" and lines[-1] == ""
    merges = [tuple(line.split()) for line in lines[1:-1]]
    assert len(merges) == 49152 - 256 - 2 and len(vocab) == 49408
    chars = list(_bytes_to_unicode().values())
    assert [vocab[c] for c in chars] == list(range(256))
    assert [vocab[c + "</w>"] for c in chars] == list(range(256, 512))
    assert [vocab[a + b] for a, b in merges] == list(range(512, 512 + len(merges)))
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407


def test_derive_tool_rebuilds_the_packaged_files(tmp_path):
    # A .gz in OpenAI's layout (a header line, the merges, further unused merges) made from the packaged
    # merges must give back the packaged files byte for byte.
    data = default_tokenizer_dir()
    merges = (data / "merges.txt").read_text(encoding="utf-8").split("\n")[1:-1]
    gz = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    gz.write_bytes(gzip.compress("\n".join(["bpe_simple_vocab_16e6.txt#version: 0.2", *merges, "x y", "z w"]).encode()))
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(ROOT / "tools" / "derive_clip_vocab.py"), str(gz), str(out)],
                   check=True, capture_output=True)
    assert (out / "vocab.json").read_bytes() == (data / "vocab.json").read_bytes()
    assert (out / "merges.txt").read_bytes() == (data / "merges.txt").read_bytes()


@pytest.mark.parametrize("prompt", INERT_PROMPTS)
def test_ids_match_openai_reference(tok, ref, prompt):
    assert tok.encode(prompt) == ref.encode(prompt)


def test_batch_padding_and_truncation_match_openai(tok, ref):
    got = tok(INERT_PROMPTS)
    want = ref.tokenize(INERT_PROMPTS, pad_id=49407)
    np.testing.assert_array_equal(got, want)
    assert len(ref.encode(LONG + ", " + LONG)) > 75  # the batch did exercise truncation


def test_inert_prompts_are_inert_under_ftfy():
    if ftfy is None:
        pytest.skip("ftfy not installed: cannot confirm the reference's NFC stand-in")
    def rest_of_clean(t):  # OpenAI's clean-up after fix_text
        return _whitespace_clean(html.unescape(html.unescape(t)).strip()).lower()

    for p in INERT_PROMPTS:
        assert rest_of_clean(ftfy.fix_text(p)) == rest_of_clean(unicodedata.normalize("NFC", p)), p


@pytest.mark.parametrize("prompt", FTFY_PROMPTS)
def test_ftfy_prompts_match_openai_reference(tok, ref, prompt):
    if ftfy is None:
        pytest.skip("ftfy not installed: OpenAI's clean-up needs it for this prompt")
    assert tok.encode(prompt) == ref.encode(prompt)


@pytest.mark.parametrize("raw, cleaned", [
    ("it\u2019s a \u201cquoted\u201d \u2018word\u2019", "it's a \"quoted\" 'word'"),
    ("\ufb01ne \ufb02oral o\ufb03ce \u01c5", "fine floral office dž"),
    ("ＬＯＵＤ　ＮＯＩＳＥＳ", "loud noises"),
    ("bell\x07 and \x00null\ufeff", "bell and null"),
    ("tom &amp;amp; jerry", "tom & jerry"),
    ("  ΟΔΟΣ  ", "οδος"),  # Python's str.lower keeps the final sigma, as CLIP's clean-up does
])
def test_clean_prompt(raw, cleaned):
    assert tokmod.clean_prompt(raw) == cleaned


def test_the_runtime_uses_ftfy_itself():
    """ftfy is a base dependency: the runtime calls it, and carries no hand port of its fixes."""
    import ftfy as real

    assert tokmod.fix_text is real.fix_text
    assert not any(n.startswith("_fix_text_without") or n in ("_LIGATURES", "_WIDTH_MAP") for n in vars(tokmod))


def test_truncation_warns_with_count_and_cut_text(tok, caplog):
    words = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
             "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()
    prompt = ", ".join(words + [w + "s" for w in words])
    n = len(tok.encode(prompt))
    with caplog.at_level(logging.WARNING, logger=tokmod.__name__):
        ids = tok([prompt, "short"])
    assert ids[0, -1] == tok.eos_id and ids[0, 0] == tok.bos_id
    (rec,) = caplog.records
    msg = rec.getMessage()
    assert n > 75 and f"by {n - 75} tokens" in msg and "zulus" in msg and "alpha ," not in msg
    # once per prompt, named by its start: a batch repeats a prompt per image and carries the negative prompts
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=tokmod.__name__):
        tok([prompt] * 3)
    (rec,) = caplog.records
    assert rec.getMessage().startswith("the prompt 'alpha, bravo, charlie, delta, echo, foxtrot, ...' was truncated")


def test_pad_token_read_from_folder(tmp_path):
    folder = write_tokenizer_files(tmp_path / "tokenizer", pad_token="!")
    tok = ClipTokenizer(folder)
    assert tok.pad_id == 0
    ids = tok(["a photo of a cat"])
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407] and (ids[0, 7:] == 0).all()
    # special_tokens_map.json wins over tokenizer_config.json, as in transformers; AddedToken dicts are read
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "<|endoftext|>"}}))
    assert ClipTokenizer(folder).pad_id == 49407
    assert ClipTokenizer(folder, pad_id=7).pad_id == 7


def test_bad_input_raises_ldm_export_error(tok, tmp_path):
    with pytest.raises(LdmExportError, match="prompt must be a string, got int"):
        tok(["ok", 3])
    with pytest.raises(LdmExportError, match="non-empty list"):
        tok([])
    with pytest.raises(LdmExportError, match="merges.txt"):
        ClipTokenizer(tmp_path)
    with pytest.raises(LdmExportError, match="not in"):
        write_tokenizer_files(tmp_path / "t", pad_token="<pad>")


def test_decode_inverts_encode_on_clean_text(tok):
    assert tok.decode(tok.encode("A photo of a Cat, café 🐱!")) == "a photo of a cat , café 🐱!"


# --- transformers' slow CLIPTokenizer as a second, independent reference. Without ftfy it falls back to
# BERT's BasicTokenizer (splits CJK characters apart, drops format characters such as the emoji ZWJ,
# skips HTML unescaping), with ftfy it skips HTML unescaping only, so it is compared on the prompts
# where those paths agree with CLIP's.
def _transformers_comparable(p: str) -> bool:
    if ftfy is None and any(unicodedata.category(c) == "Cf" for c in p):
        return False
    return "&" not in p and not any(unicodedata.name(c, "").startswith(("CJK", "HIRAGANA", "KATAKANA", "HANGUL")) for c in p)


@pytest.mark.parametrize("pad_token, pad_id", [("<|endoftext|>", 49407), ("!", 0)])
def test_transformers_loads_written_files_and_agrees(tmp_path, pad_token, pad_id):
    transformers = pytest.importorskip("transformers")
    folder = write_tokenizer_files(tmp_path / "tokenizer", pad_token=pad_token)
    hf = transformers.CLIPTokenizer.from_pretrained(folder)
    assert hf.model_max_length == 77 and hf.pad_token_id == pad_id
    ours = ClipTokenizer(folder)
    prompts = [p for p in INERT_PROMPTS if _transformers_comparable(p)]
    if pad_token == "!":
        # transformers splits "!" out of the text as the special pad token (diffusers issue #4153) where
        # OpenAI/OpenCLIP, which SD 2 was trained with, read it as ordinary text: compared without "!".
        prompts = [p for p in prompts if "!" not in p]
    # diffusers' StableDiffusionPipeline._encode_prompt call:
    want = hf(prompts, padding="max_length", max_length=hf.model_max_length, truncation=True,
              return_tensors="np").input_ids
    np.testing.assert_array_equal(ours(prompts), want)


def test_the_truncation_warning_shows_a_long_cut_text_by_its_start(caplog):
    """A pasted page as a prompt: the warning showed all of the cut text (25 KB for a long calibration prompt)."""
    import logging

    from ldm_export.runtime import tokenizer as tokmod

    tok = ClipTokenizer()
    prompt = " ".join(f"word{i}" for i in range(3000))
    with caplog.at_level(logging.WARNING, logger=tokmod.__name__):
        tok([prompt])
    (rec,) = caplog.records
    msg = rec.getMessage()
    assert len(msg) < 600 and "'... (" in msg and "more characters)" in msg
    assert "word52 word53" in msg and "2999" not in msg  # the typed text, not CLIP's decode ("word 5 2")


def test_the_cut_text_is_the_typed_text_and_a_negative_prompt_is_named(caplog):
    """CLIP reads digits one by one and lower-cases: decoding the cut ids showed 'in 2 0 2 4 ... h 2 o'."""
    import logging

    from ldm_export.runtime import tokenizer as tokmod

    tok = ClipTokenizer()
    prompt = "a " * 75 + "in 2024 the  year 1999 we saw H2O"
    with caplog.at_level(logging.WARNING, logger=tokmod.__name__):
        tok([prompt])
    (rec,) = caplog.records
    assert rec.getMessage().endswith("the cut text: 'in 2024 the year 1999 we saw H2O'")  # CLIP's spaces, typed case
    assert tok.cut_text(prompt, 200) == ""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=tokmod.__name__), tokmod.prompt_role("negative prompt"):
        tok(["b " * 80 + "Zed"])
    (rec,) = caplog.records
    assert rec.getMessage().startswith("the negative prompt 'b b b b b b ...' was truncated by 6 tokens")
    assert rec.getMessage().endswith("the cut text: 'b b b b b Zed'")
    assert tokmod.current_role() == "prompt"


# --- A fine-tune's added tokens (textual inversion) -----------------------------------------------------------
ADDED_PROMPTS = [
    "a photo of <cat-toy>",
    "<cat-toy> and <Dog> on the left",
    "a <dog> is not <Dog>: the match is case-sensitive",
    "<cat-toy><Dog>,<cat-toy>s and x<cat-toy>y",
    "  <Dog>  ",
    "<cat-toy-long> beats <cat-toy>",
    " ".join(["<cat-toy> red"] * 40),  # truncated: the added ids count as one token each
]


@pytest.fixture(scope="module")
def added_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = write_tokenizer_files(tmp_path_factory.mktemp("ti") / "tokenizer")
    ref = transformers.CLIPTokenizer.from_pretrained(str(folder))
    ref.add_tokens(["<cat-toy>", "<Dog>", "<cat-toy-long>"])
    ref.save_pretrained(str(folder))
    return folder, transformers.CLIPTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("prompt", ADDED_PROMPTS)
def test_added_tokens_get_the_ids_transformers_gives(added_folder, prompt):
    folder, ref = added_folder
    ours = ClipTokenizer(folder)
    assert ours.added == {"<cat-toy>": 49408, "<Dog>": 49409, "<cat-toy-long>": 49410} and ours.vocab_size == 49411
    want = ref([prompt], padding="max_length", max_length=77, truncation=True).input_ids
    assert ours([prompt]).tolist() == want
    assert ours.decode(ours.encode("a <cat-toy> on the left")) == "a <cat-toy> on the left"


def test_added_tokens_that_skip_ids_are_refused_in_one_line(tmp_path):
    folder = write_tokenizer_files(tmp_path / "tokenizer")
    (folder / "added_tokens.json").write_text(json.dumps({"<a>": 49408, "<b>": 49411}))
    with pytest.raises(LdmExportError, match=r"do not follow the 49408-token vocabulary without a gap"):
        ClipTokenizer(folder)


def test_the_cut_text_of_a_prompt_with_added_tokens(added_folder, caplog):
    ours = ClipTokenizer(added_folder[0])
    assert ours.cut_text("red <cat-toy> blue <Dog> green", 1) == "<cat-toy> blue <Dog> green"
    assert ours.cut_text("red <cat-toy> blue <Dog> green", 2) == "blue <Dog> green"
    assert ours.cut_text("red <cat-toy> blue <Dog> green", 4) == "green"
    assert ours.cut_text("red <cat-toy>", 2) == ""


def test_a_multi_vector_embeddings_tokens_expand_as_diffusers_writes_them(tmp_path):
    """diffusers' load_textual_inversion adds '<t>', '<t>_1', '<t>_2' for a 3-vector embedding and its pipelines
    rewrite '<t>' in a prompt as '<t> <t>_1 <t>_2' (maybe_convert_prompt) before tokenizing."""
    transformers = pytest.importorskip("transformers")
    loaders = pytest.importorskip("diffusers.loaders")
    folder = write_tokenizer_files(tmp_path / "tokenizer")
    ref = transformers.CLIPTokenizer.from_pretrained(str(folder))
    ref.add_tokens(["<cat-toy>", "<cat-toy>_1", "<cat-toy>_2", "<dog>"])
    ref.save_pretrained(str(folder))

    class Pipe(loaders.TextualInversionLoaderMixin):
        pass

    ours = ClipTokenizer(folder)
    for prompt in ("a photo of <cat-toy>", "<cat-toy> and <dog>, <cat-toy> again", "no token here",
                   " ".join(["<cat-toy> red"] * 30)):
        converted = Pipe().maybe_convert_prompt(prompt, ref)
        want = ref([converted], padding="max_length", max_length=77, truncation=True).input_ids
        assert ours([prompt]).tolist() == want, prompt
    assert ours.encode("a <cat-toy>")[-3:] == [49408, 49409, 49410]
