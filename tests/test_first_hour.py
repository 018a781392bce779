"""A user's first hour: bad input refused up front in one line, nothing lost, the conventions users expect."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from ldm_export.runtime import checks
from ldm_export.runtime.bundle import Bundle, sha256_file
from ldm_export.runtime.errors import LdmExportError
from ldm_export.runtime.image import parse_parameters, read_parameters, save_image
from ldm_export.runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    return Pipeline.from_bundle(tiny_bundle)


@pytest.fixture(scope="module")
def demo_pipe(demo_bundle):
    return Pipeline.from_bundle(demo_bundle)


class NoWork:
    """An engine that fails the test when run: the request had to be refused before any work."""

    def __init__(self, spec):
        self.spec = spec

    def run(self, feeds):
        raise AssertionError("an engine ran; the request should have been refused before any work")


def _no_work(p: Pipeline) -> Pipeline:
    q = Pipeline(p.bundle, {c: NoWork(e.spec) for c, e in p.engines.items()}, tokenizer=p.tokenizer)
    for c, e in p.engines.items():  # keep where they run (host memory estimate)
        q.engines[c].providers = getattr(e, "providers", None)
    return q


def _one_line_error(r: subprocess.CompletedProcess, code: int, text: str) -> None:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and text in r.stderr, r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("error")]) == 1, r.stderr


# --- sizes ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(8, 8), (16, 16), (64, 72)])
def test_sizes_the_unet_cannot_take_name_the_valid_multiple(demo_pipe, size):
    with pytest.raises(LdmExportError, match="multiple of 32 px") as e:
        _no_work(demo_pipe)("a red circle", width=size[0], height=size[1], num_inference_steps=1)
    assert "\n" not in str(e.value)


def test_size_rule_comes_from_the_unet_depth():
    from ldm_export.runtime.families import get_family

    vae = {"block_out_channels": [128, 256, 512, 512], "latent_channels": 4}
    sd1 = get_family("sd1")
    assert sd1.size_multiple({"unet": {"block_out_channels": [320, 640, 1280, 1280]}, "vae": vae}) == 64  # SD 1.5
    assert sd1.size_multiple({"unet": {"block_out_channels": [64, 128, 128]}, "vae": vae}) == 32  # the demo model


def test_generate_cli_refuses_a_size_in_one_line(demo_bundle, tmp_path):
    r = run_cli("generate", str(demo_bundle), "x", "--size", "8x8", "--out", str(tmp_path / "a.png"))
    _one_line_error(r, 2, "multiple of 32 px")
    assert not (tmp_path / "a.png").exists()


def test_valid_off_model_sizes_work_and_warn_once(demo_pipe, caplog):
    img = demo_pipe("a red circle", width=96, height=64, num_inference_steps=1, seed=0)[0]
    assert img.size == (96, 64)
    checks._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="ldm_export.runtime.checks"):
        for _ in range(2):
            assert demo_pipe("a red circle", width=128, height=128, num_inference_steps=1, seed=0)[0].size == (128, 128)
    assert len([r for r in caplog.records if "far from the 64 px" in r.getMessage()]) == 1


@pytest.mark.parametrize("size", [(4096, 4096), (100000, 100000)])
def test_sizes_that_cannot_fit_are_refused_before_any_work(demo_pipe, size, caplog):
    t0 = time.perf_counter()
    checks._WARNED.clear()
    with pytest.raises(LdmExportError, match="activations per UNet call") as e, caplog.at_level(logging.WARNING):
        _no_work(demo_pipe)("a red circle", width=size[0], height=size[1], num_inference_steps=1)
    assert time.perf_counter() - t0 < 2.0 and "smaller --size" in str(e.value)
    assert "far from the 64 px" not in caplog.text  # the refusal comes alone, without the off-model warning


def test_memory_estimate_scales_and_fused_attention_drops_the_scores():
    model = {"vae_scale_factor": 8, "resolution": 512}
    configs = {"unet": {"block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8,
                        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]},
               "vae": {"block_out_channels": [128] * 4}}
    small = checks.estimate_memory(model, configs, 512, 512, 2, fused_attention=False)
    # 512x512 on SD 1.5: its attention scores are 1 GB of fp32 (2 x 8 heads x 4096^2), alive 4 times in unfused
    # attention (measured on the demo model: 4.66 GiB peak RSS at 512x512 against 1.0 GiB for one score matrix)
    assert checks.SCORE_COPIES == 4 and 4 * 2**30 < small < 4.5 * 2**30
    assert checks.estimate_memory(model, configs, 4096, 4096, 2, False) > 1e12
    assert checks.estimate_memory(model, configs, 4096, 4096, 2, True) < checks.estimate_memory(model, configs, 4096, 4096, 2, False)
    with pytest.raises(LdmExportError, match="more than the 8.0 GB available"):
        checks.check_memory(model, configs, 4096, 4096, 2, False, 8 * 2**30, "on this machine")
    checks.check_memory(model, configs, 512, 512, 2, False, 8 * 2**30, "on this machine")


def test_memory_estimate_takes_each_attention_levels_own_head_count():
    """SD 2.x has 5 heads at full size and 20 at 1/8: counting 20 at full size refused SD 2.1 at its own 768 px on a
    32 GB machine ("50.8 GB"). SDXL has no attention at full size: its scores are the 1/2 level's (10 heads)."""
    from ldm_export.zoo import get_model

    for name, level, heads in (("sd21", 0, 5), ("sdxl", 1, 10)):
        spec = get_model(name)
        model = {"vae_scale_factor": spec.vae_scale_factor, "resolution": spec.resolution}
        tokens = (spec.resolution // spec.vae_scale_factor) ** 2
        scores = 4 * 2 * heads * (tokens // 4 ** level) ** 2 * 4  # 4 copies, CFG batch 2, fp32
        got = checks.estimate_memory(model, spec.configs, spec.resolution, spec.resolution, 2, fused_attention=False)
        assert scores <= got < scores + 2**30, (name, got / 2**30)
    spec = get_model("sd21")
    checks.check_memory({"vae_scale_factor": 8, "resolution": 768}, spec.configs, 768, 768, 2, False, 32 * 2**30,
                        "on this machine")  # 13.6 GB: fits


@pytest.mark.parametrize("name,tokens", [("sd3-medium", 64 * 64 + 77 + 256), ("flux-dev", 64 * 64 + 512)])
def test_dit_memory_estimate_counts_patch_and_text_tokens(name, tokens):
    """DiTs were estimated as U-Nets (8 heads over every latent, no patches): a tiny FLUX at 1536 px was refused as
    needing 40 GB. Now: joint attention over 2x2 patches (SD3's patch size, FLUX's packing) and the text tokens."""
    from ldm_export.zoo import get_model

    spec = get_model(name)
    model = {"vae_scale_factor": spec.vae_scale_factor, "latent_channels": spec.vae["latent_channels"],
             "max_length": spec.max_length, "family": spec.family, "resolution": spec.resolution}
    heads = spec.configs["transformer"]["num_attention_heads"]
    scores = 2 * heads * tokens ** 2 * 4  # the fp32 scores of one joint attention, CFG batch 2
    full = checks.estimate_memory(model, spec.configs, 1024, 1024, 2, fused_attention=False)
    assert checks.SCORE_COPIES * scores < full < 1.5 * checks.SCORE_COPIES * scores
    assert checks.estimate_memory(model, spec.configs, 1024, 1024, 2, fused_attention=True) < 0.8 * full
    tiny = get_model("tiny-" + name.split("-")[0])  # the reported case: tiny-flux at 1536 px was "40.8 GB"
    model_tiny = {**model, "max_length": tiny.max_length}
    assert checks.estimate_memory(model_tiny, tiny.configs, 1536, 1536, 2, False) < 12 * 2**30
    with pytest.raises(LdmExportError, match="activations per transformer call"):
        checks.check_memory(model, spec.configs, 2048, 2048, 2, False, 8 * 2**30, "on this machine")


# --- guidance, seeds, text -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    ({"guidance_scale": 1e30}, "guidance scale must be from 0 to 100"),
    ({"guidance_scale": -2.0}, "guidance scale must be from 0 to 100"),
    ({"guidance_scale": float("nan")}, "guidance scale must be a finite number"),
    ({"guidance_rescale": 1.5}, "guidance rescale must be from 0 to 1"),
    ({"guidance_rescale": -0.1}, "guidance rescale must be from 0 to 1"),
    ({"seed": -2}, "seed must be an integer from 0 to 4294967295 (or -1"),
    ({"seed": 2**32}, "seed must be an integer from 0 to 4294967295"),
    ({"prompt": "bad \udcff bytes"}, "prompt is not valid UTF-8"),
    ({"negative_prompt": "\udcc3"}, "negative prompt is not valid UTF-8"),
])
def test_requests_that_make_no_sense_are_refused_before_any_work(pipe, kwargs, message):
    kwargs = {"prompt": "a red circle", **kwargs}
    with pytest.raises(LdmExportError, match=message.replace("(", r"\(")):
        _no_work(pipe)(num_inference_steps=2, **kwargs)


def test_guidance_rescale_is_in_the_metadata(pipe):
    img = pipe("a red circle", num_inference_steps=2, seed=3, guidance_rescale=0.7)[0]
    assert parse_parameters(img.info["parameters"])["extra"]["CFG Rescale φ"] == "0.7"
    plain = pipe("a red circle", num_inference_steps=2, seed=3)[0]
    assert "Rescale" not in plain.info["parameters"]


def test_seed_minus_one_is_a_random_seed_recorded_in_the_image(pipe):
    a, b = (pipe("a red circle", num_inference_steps=1, seed=-1)[0] for _ in range(2))
    sa, sb = (parse_parameters(i.info["parameters"])["seed"] for i in (a, b))
    assert sa != sb and 0 <= sa < 2**32 and 0 <= sb < 2**32
    again = pipe("a red circle", num_inference_steps=1, seed=sa)[0]
    assert np.array_equal(np.asarray(a), np.asarray(again))


def test_image_k_gets_seed_plus_k_and_can_be_made_again_alone(pipe):
    images = pipe("a red circle", num_inference_steps=2, seed=5, num_images=3, scheduler="Euler a")
    assert [parse_parameters(i.info["parameters"])["seed"] for i in images] == [5, 6, 7]
    alone = pipe("a red circle", num_inference_steps=2, seed=6, scheduler="Euler a")[0]
    diff = np.abs(np.asarray(images[1], np.int16) - np.asarray(alone, np.int16)).max()
    assert diff <= 1, diff  # a batch of 3 and a batch of 1 differ only by float rounding
    assert "Batch pos" not in images[1].info["parameters"]


def test_generate_cli_seed_minus_one_and_invalid_utf8_prompt(tiny_bundle, tmp_path):
    r = run_cli("generate", str(tiny_bundle), "x", "--steps", "1", "--seed", "-1", "--out", str(tmp_path / "s.png"))
    assert r.returncode == 0, r.stderr
    assert "Seed: " in r.stdout and "Seed: -1" not in r.stdout
    env = {**os.environ, "PYTHONUTF8": "1"}
    bad = subprocess.run([sys.executable, "-m", "ldm_export.cli", "generate", str(tiny_bundle), b"caf\xe9 \xff",
                          "--steps", "1", "--out", str(tmp_path / "u.png")], capture_output=True, env=env, timeout=300)
    err = bad.stderr.decode("utf-8", "replace")
    assert bad.returncode == 2 and "Traceback" not in err and "not valid UTF-8" in err, err
    assert not (tmp_path / "u.png").exists()


# --- threads -------------------------------------------------------------------------------------------

def test_threads_are_capped_at_the_cores(caplog):
    cores = os.cpu_count() or 1
    with caplog.at_level(logging.WARNING, logger="ldm_export.runtime.checks"):
        assert checks.cap_threads(1000) == cores
    assert any("1000 threads" in r.getMessage() for r in caplog.records)
    assert checks.cap_threads(1) == 1 and checks.cap_threads(None) is None
    with pytest.raises(LdmExportError, match="threads must be a positive integer"):
        checks.cap_threads(0)


def test_generate_cli_with_a_thousand_threads_finishes(tiny_bundle, tmp_path):
    r = run_cli("generate", str(tiny_bundle), "x", "--steps", "1", "--threads", "1000", "--out", str(tmp_path / "t.png"),
                timeout=120)
    assert r.returncode == 0 and (tmp_path / "t.png").is_file(), r.stderr


# --- bundles: changed files, swapped graphs, damage ---------------------------------------------------

def test_a_changed_file_is_detected_on_load_and_the_model_hash_follows_the_file(tiny_bundle, tmp_path, caplog):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)  # copy2: keeps modification times
    assert Bundle.open(b).changed == []
    unet = b / "unet" / "model.onnx"
    data = bytearray(unet.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes, newer mtime
    built = unet.stat().st_mtime
    unet.write_bytes(bytes(data))
    os.utime(unet, (built + 10, built + 10))  # past the 2 s slack also when the fixture was built a second ago
    with caplog.at_level(logging.WARNING, logger="ldm_export.runtime.bundle"):
        opened = Bundle.open(b)
    assert opened.changed == ["unet/model.onnx"]
    assert any("unet/model.onnx changed since the build" in r.getMessage() and "--verify" in r.getMessage()
               for r in caplog.records)
    assert opened.model_hash == sha256_file(unet)[:10] != Bundle.open(tiny_bundle).model_hash
    with pytest.raises(LdmExportError, match="sha256 mismatch in unet/model.onnx") as e:
        Bundle.open(b, verify=True)
    assert e.value.exit_code == 1


def test_another_components_graph_in_place_of_the_unet_is_refused_at_load(tiny_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    shutil.copy(b / "text_encoder" / "model.onnx", b / "unet" / "model.onnx")
    with pytest.raises(LdmExportError, match="is not a unet graph: it takes \\['input_ids'\\]") as e:
        Pipeline.from_bundle(b)
    assert e.value.exit_code == 1
    r = run_cli("generate", str(b), "x", "--steps", "1", "--out", str(tmp_path / "x.png"))
    _one_line_error(r, 1, "is not a unet graph")


def test_inspect_prints_the_weights_table_and_a_damaged_bundle_exits_1(tiny_bundle, tmp_path):
    r = run_cli("inspect", str(tiny_bundle))
    assert r.returncode == 0, r.stderr
    assert "{'source'" not in r.stdout and "weights" in r.stdout
    assert any(ln.split("│")[1:3] and "source" in ln and "random" in ln for ln in r.stdout.splitlines()), r.stdout
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    (b / "tokenizer" / "merges.txt").unlink()
    _one_line_error(run_cli("inspect", str(b)), 1, "missing tokenizer/merges.txt")
    for text, kind in (("[]", "'list'"), ("{}", "None")):  # JSON, but no manifest
        (b / "ldm_export.json").write_text(text)
        _one_line_error(run_cli("inspect", str(b)), 1, f"is not an ldm-export manifest (format {kind}); rebuild the "
                                                       "bundle with `ldm-export build`")


# --- build --force, races, paths ----------------------------------------------------------------------

def test_force_never_replaces_the_weights_or_what_holds_them(tmp_path, monkeypatch):
    from ldm_export.export.build import BuildConfig, validate

    weights = tmp_path / "w"
    weights.mkdir()
    (weights / "model_index.json").write_text("{}")
    for out in (weights, tmp_path):
        with pytest.raises(LdmExportError, match="is the weights folder being read"):
            validate(BuildConfig(model="sd15", weights=weights, out=out, force=True))
    assert (weights / "model_index.json").read_text() == "{}"
    (tmp_path / "notes.txt").write_text("mine")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(LdmExportError, match="not an ldm-export bundle"):
        validate(BuildConfig(model="tiny", random_weights=True, out=other, force=True))
    monkeypatch.chdir(other)
    for out in (Path("."), Path("..")):
        with pytest.raises(LdmExportError, match="is the current folder or holds it"):
            validate(BuildConfig(model="tiny", random_weights=True, out=out, force=True))
    assert (other / "keep.txt").read_text() == "mine" and (tmp_path / "notes.txt").read_text() == "mine"


def test_build_cli_force_on_a_folder_of_other_files_keeps_them(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    r = run_cli("build", "--model", "tiny", "--random-weights", "--out", str(tmp_path), "--force")
    _one_line_error(r, 2, "")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_commits_racing_into_one_out_take_turns_and_leave_nothing(tmp_path, monkeypatch):
    from ldm_export.export import bundle_writer as bw

    out = tmp_path / "out"
    real_replace = os.replace

    def slow_replace(a, b):  # widen the window between moving the old bundle away and moving the new one in
        time.sleep(0.05)
        real_replace(a, b)

    monkeypatch.setattr(bw.os, "replace", slow_replace)
    errors = []

    def commit(k):
        try:
            with bw.staging(out, force=True) as stage:
                (stage / "ldm_export.json").write_text(json.dumps({"format": "ldm-export-bundle", "k": k}))
        except Exception as e:  # noqa: BLE001 - the test reports any
            errors.append(repr(e))

    (tmp_path / ".out.old-999999").mkdir()  # left by a build killed mid-commit
    out.mkdir()
    threads = [threading.Thread(target=commit, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert json.loads((out / "ldm_export.json").read_text())["k"] in range(4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_bundles_carry_no_paths_of_the_build_machine(demo_bundle):
    import ldm_export

    machine = [str(Path(ldm_export.__file__).resolve().parent.parent), str(Path.home()), str(demo_bundle.parent),
               os.path.realpath("/tmp")]
    for f in demo_bundle.rglob("*.json"):
        text = f.read_text()
        for p in machine:
            assert p not in text, (f, p)
    assert not [f for f in demo_bundle.rglob("*.json") if '"_name_or_path"' in f.read_text()]


# --- images: formats, atomic writes, batches ----------------------------------------------------------

@pytest.mark.parametrize("ext,fmt", [(".png", "PNG"), (".jpg", "JPEG"), (".jpeg", "JPEG"), (".webp", "WEBP")])
def test_the_extension_names_the_format_and_the_parameters_go_where_a1111_reads_them(tmp_path, ext, fmt):
    text = "a café, 猫\nNegative prompt: blur\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 8x8"
    path = save_image(Image.new("RGB", (8, 8), (200, 10, 10)), tmp_path / f"x{ext}", text)
    with Image.open(path) as im:
        assert im.format == fmt
    assert read_parameters(path) == text
    if fmt != "PNG":  # A1111's reader (modules/images.py read_info_from_image), run as it is: piexif
        piexif = pytest.importorskip("piexif")
        helper = pytest.importorskip("piexif.helper")

        with Image.open(path) as im:
            exif = piexif.load(im.info.get("exif") or b"")
        comment = exif.get("Exif", {}).get(piexif.ExifIFD.UserComment, b"")
        assert isinstance(comment, bytes), comment  # typed UNDEFINED: Pillow's BYTE came back as a tuple of ints
        assert helper.UserComment.load(comment) == text


def test_an_extension_that_names_no_format_is_refused_before_any_work(tiny_bundle, tmp_path):
    r = run_cli("generate", str(tiny_bundle), "x", "--out", str(tmp_path / "x.gif"))
    _one_line_error(r, 2, "use .png, .jpg, .jpeg, .webp")


def test_an_unwritable_out_fails_before_the_images_are_made(tiny_bundle):
    t0 = time.perf_counter()
    r = run_cli("generate", str(tiny_bundle), "x", "--steps", "500", "--out", "/proc/x.png")
    _one_line_error(r, 2, "cannot write /proc/x.png")
    assert time.perf_counter() - t0 < 30  # 500 steps were not run first


def test_an_interrupted_save_keeps_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "good.png"
    save_image(Image.new("RGB", (8, 8)), path, "old")
    before = path.read_bytes()

    def dies_midway(self, fp, format=None, **kw):
        Path(fp).write_bytes(b"\x89PNG\r\n")  # a few bytes, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save_image(Image.new("RGB", (8, 8), (255, 0, 0)), path, "new")
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["good.png"]


def test_sigterm_while_generating_keeps_whole_images_and_says_how_many(tiny_bundle, tmp_path):
    out = tmp_path / "img.png"
    proc = subprocess.Popen([sys.executable, "-m", "ldm_export.cli", "generate", str(tiny_bundle), "x", "--steps", "2",
                             "--num-images", "400", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob("img-*.png")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    written = sorted(tmp_path.glob("img-*.png"))
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert f"{len(written)} of 400 images were written" in err and "nothing was written" not in err, err
    assert 1 <= len(written) < 400 and not list(tmp_path.glob(".*"))
    for p in written:
        with Image.open(p) as im:
            im.load()  # a truncated file fails here
        assert "Seed: " in read_parameters(p)


def test_images_come_in_bounded_batches_as_they_are_done(tiny_bundle):
    from test_pipeline import CountingEngine

    p = Pipeline.from_bundle(tiny_bundle)
    p.engines["vae_decoder"] = CountingEngine(p.engines["vae_decoder"])
    it = p.iter_images("a red circle", num_inference_steps=1, seed=0, num_images=10, batch_size=4)
    k, first = next(it)
    assert k == 0 and p.engines["vae_decoder"].calls == [4]  # only the first batch has run
    rest = [k for k, _ in it]
    assert rest == list(range(1, 10)) and p.engines["vae_decoder"].calls == [4, 4, 2]
    assert p.images_per_batch() == 4  # a dynamic-shape bundle: DYNAMIC_BATCH images a batch


@pytest.fixture(scope="module")
def static_tiny(tmp_path_factory):
    from ldm_export.export.build import BuildConfig, build

    out = tmp_path_factory.mktemp("static") / "tiny-static"
    build(BuildConfig(model="tiny", precision="fp32", random_weights=True, seed=0, static_shape=True, out=out))
    return out


def test_a_static_bundle_runs_more_images_as_batches_of_its_own_batch(static_tiny, tiny_bundle):
    from test_pipeline import CountingEngine

    p = Pipeline.from_bundle(static_tiny)
    assert p.images_per_batch(7.5) == 1 and p.images_per_batch(1.0) == 2  # UNet batch 2: uncond + cond
    p.engines["unet"] = CountingEngine(p.engines["unet"])
    images = p("a red circle", num_inference_steps=2, seed=11, num_images=3, scheduler="Euler")
    assert p.engines["unet"].calls == [2] * 6  # 3 images x 2 steps, each the static batch exactly (no padding)
    dynamic = Pipeline.from_bundle(tiny_bundle)("a red circle", num_inference_steps=2, seed=13, num_images=1)[0]
    same_seed = p("a red circle", num_inference_steps=2, seed=13)[0]
    assert np.abs(np.asarray(dynamic, np.int16) - np.asarray(same_seed, np.int16)).max() <= 1
    assert [parse_parameters(i.info["parameters"])["seed"] for i in images] == [11, 12, 13]


def test_bench_without_a_bundle_builds_the_default_model(tmp_path):
    r = run_cli("bench", "--device", "cpu", "--backends", "ort", "--steps", "1", "--repeats", "1", "--e2e-repeats", "1",
                "--warmup", "0", "--out", str(tmp_path), timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "building demo" in r.stderr or "built demo" in r.stderr
    assert json.loads((tmp_path / "bench_demo_cpu.json").read_text())["backends"]["ort"]


def test_a_file_given_as_a_bundle_is_called_a_file(tiny_bundle, tmp_path):
    """`--refiner img/base.png` answered "build one with `ldm-export build --out img/base.png`"."""
    image = tmp_path / "base.png"
    image.write_bytes(b"\x89PNG")
    for args in (["generate", str(image), "a"], ["generate", str(tiny_bundle), "a", "--refiner", str(image),
                                                "--out", str(tmp_path / "o.png")]):
        r = run_cli(*args)
        assert r.returncode == 2 and f"{image} is a file, not a bundle" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_ctrl_c_that_cut_an_import_short_is_an_interruption_not_a_traceback(tmp_path, monkeypatch, capsys):
    """Ctrl-C while onnxruntime initialises surfaces as ImportError('initialization failed') raised from the
    KeyboardInterrupt: every command says 'interrupted' on one line and exits 130; a build also says nothing was
    written. Other ImportErrors still propagate."""
    import click
    from click.testing import CliRunner

    from ldm_export import cli
    from ldm_export.cli_common import _guard, interrupted_within

    def cut_import():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise ImportError("initialization failed")

    try:
        cut_import()
    except ImportError as e:
        assert interrupted_within(e)
    assert not interrupted_within(ImportError("No module named x"))

    @click.command()
    @_guard
    def command():
        cut_import()

    r = CliRunner().invoke(command, [])
    assert r.exit_code == 130 and "interrupted" in r.output and len(r.output.strip().splitlines()) == 1

    def build_cut_short(cfg, progress):
        cut_import()

    monkeypatch.setattr("ldm_export.export.build.build", build_cut_short)
    r = CliRunner().invoke(cli.cli, ["build", "--model", "tiny", "--random-weights", "--out", str(tmp_path / "b")])
    assert r.exit_code == 130, r.output
    assert "interrupted: the build stopped; nothing was written" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()

    @click.command()
    @_guard
    def other():
        raise ImportError("something else")

    r = CliRunner().invoke(other, [])
    assert r.exit_code == 1 and isinstance(r.exception, ImportError)


def test_a_truncated_graph_is_a_damaged_bundle(tiny_bundle, tmp_path):
    """A graph file cut short: exit 1 and 'the bundle is damaged, rebuild it', as for a missing or wrong graph (it
    printed ONNX Runtime's INVALID_PROTOBUF line and exited 2)."""
    import shutil

    damaged = shutil.copytree(tiny_bundle, tmp_path / "damaged")
    with open(damaged / "unet" / "model.onnx", "r+b") as f:
        f.truncate(1000)
    r = run_cli("generate", str(damaged), "a red circle", "--steps", "1", "--out", str(tmp_path / "x.png"))
    assert r.returncode == 1, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]  # the manifest check warns first: the file changed
    assert lines[-1].startswith("error:") and "Traceback" not in r.stderr, r.stderr
    assert "unet/model.onnx is not a readable ONNX graph (protobuf parsing failed: cut short or overwritten)" in lines[-1]
    assert "the bundle is damaged, rebuild it" in lines[-1]


def test_an_image_path_under_a_file_is_named(tmp_path):
    """--out a.png/x.png where a.png is a file: the file in the way is named (mkdir said only 'File exists')."""
    from ldm_export.runtime.image import check_writable

    (tmp_path / "a.png").write_bytes(b"png")
    with pytest.raises(LdmExportError, match=r"lies under .*a\.png, which is a file, not a folder; choose another --out"):
        check_writable(tmp_path / "a.png" / "sub" / "x.png")
    # a missing folder is made by the first save, not by the check: a command that fails before it leaves none
    assert check_writable(tmp_path / "new" / "x.png") == tmp_path / "new" / "x.png" and not (tmp_path / "new").exists()


def test_a_generate_that_fails_leaves_no_folder_it_made(tmp_path, demo_bundle):
    """`generate --out new/a/b.png` with a refused request (an unknown sampler, a size the model cannot take) left the
    empty folders `new/a/` behind."""
    for args in (("--sampler", "Euler z"), ("--size", "100x100")):
        r = run_cli("generate", str(demo_bundle), "a red circle", *args, "--out", str(tmp_path / "new" / "a" / "b.png"))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "new").exists()
    r = run_cli("generate", str(demo_bundle), "a red circle", "--steps", "2", "--out", str(tmp_path / "new" / "a" / "b.png"))
    assert r.returncode == 0 and (tmp_path / "new" / "a" / "b.png").is_file(), r.stderr


def test_sighup_unwinds_like_ctrl_c_unless_ignored(monkeypatch):
    """SIGHUP (the terminal closed) cleans up as Ctrl-C does (a build left its staging folder behind); where it is
    ignored (nohup) it stays ignored."""
    from ldm_export.runtime.errors import sigterm_as_interrupt

    before = signal.getsignal(signal.SIGHUP)
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        with pytest.raises(KeyboardInterrupt):
            with sigterm_as_interrupt():
                os.kill(os.getpid(), signal.SIGHUP)
                time.sleep(1)
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        with sigterm_as_interrupt():
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)  # ignored: nothing happens
            time.sleep(0.1)
    finally:
        signal.signal(signal.SIGHUP, before)


@pytest.mark.parametrize("args,message", [
    (["generate", "b", "a cat", "--steps", "abc"], "Invalid value for '--steps': 'abc' is not a valid integer."),
    (["build", "--model", "tiny", "--size", "512"], "No such option '--size'"),
    (["generate"], "Missing argument 'BUNDLE'."),
    (["generate", "b", "a cat", "--steps"], "Option '--steps' requires an argument."),  # click gives no context here
    (["frobnicate"], "No such command 'frobnicate'."),
])
def test_click_usage_errors_are_one_line_that_names_the_help(args, message):
    r = run_cli(*args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert lines[0].startswith("error:") and "Usage:" not in r.stderr
    assert lines[0].endswith(f"(see 'ldm-export {args[0]} --help')" if args[0] in ("generate", "build") else
                             "(see 'ldm-export --help')")


def test_a_bare_command_still_prints_its_help():
    r = run_cli()
    assert "Usage: ldm-export" in r.stdout + r.stderr and "Commands:" in r.stdout + r.stderr


def test_a_model_whose_weights_alone_exceed_the_memory_is_refused_before_loading(tmp_path, monkeypatch):
    from ldm_export.export.build import BuildConfig, build
    from ldm_export.runtime import checks as runtime_checks

    monkeypatch.setattr(runtime_checks, "available_memory", lambda: 2_000_000)  # 2 MB free
    monkeypatch.setattr(runtime_checks, "available_swap", lambda: 0)
    with pytest.raises(LdmExportError, match=r"tiny has 0\.\d\d B parameters: .* more than the 0\.0 GB of memory "
                                             r"and swap free here; build on a machine with more memory") as e:
        build(BuildConfig(model="tiny", random_weights=True, out=tmp_path / "b"))
    assert e.value.exit_code == 3 and not list(tmp_path.iterdir())
    monkeypatch.setenv("LDM_EXPORT_NO_MEMORY_CHECK", "1")  # the way out the message names
    build(BuildConfig(model="tiny", random_weights=True, out=tmp_path / "b"))
    assert (tmp_path / "b" / "ldm_export.json").is_file()


@pytest.mark.parametrize("layout", ["v1", "v2", "v2-swapless", "none"])
def test_free_memory_is_the_containers_where_its_cgroup_limits_it(tmp_path, monkeypatch, layout):
    from ldm_export.runtime import checks as runtime_checks

    gb = 1 << 30
    (tmp_path / "meminfo").write_text(f"MemTotal: {64 * gb // 1024} kB\nMemAvailable: {40 * gb // 1024} kB\n"
                                      f"SwapFree: {8 * gb // 1024} kB\n")
    cg = tmp_path / "cgroup"
    if layout == "v1":
        (tmp_path / "self").write_text("4:memory:/docker/abc\n0::/\n")
        (cg / "memory" / "docker" / "abc").mkdir(parents=True)
        (cg / "memory" / "docker" / "abc" / "memory.limit_in_bytes").write_text(str(16 * gb))
        (cg / "memory" / "docker" / "abc" / "memory.usage_in_bytes").write_text(str(6 * gb))
    elif layout.startswith("v2"):
        (tmp_path / "self").write_text("0::/kubepods/pod1\n")
        (cg / "kubepods" / "pod1").mkdir(parents=True)
        (cg / "kubepods" / "pod1" / "memory.max").write_text(str(16 * gb))
        (cg / "kubepods" / "pod1" / "memory.current").write_text(str(6 * gb))
        (cg / "kubepods" / "pod1" / "memory.swap.max").write_text("0" if layout == "v2-swapless" else "max")
    else:
        (tmp_path / "self").write_text("0::/\n")
        cg.mkdir()
        (cg / "memory.max").write_text("max")
    monkeypatch.setattr(runtime_checks, "MEMINFO", str(tmp_path / "meminfo"))
    monkeypatch.setattr(runtime_checks, "PROC_CGROUP", str(tmp_path / "self"))
    monkeypatch.setattr(runtime_checks, "CGROUP_ROOT", str(cg))
    assert runtime_checks.available_memory() == (40 if layout == "none" else 10) * gb
    assert runtime_checks.available_swap() == (0 if layout == "v2-swapless" else 8) * gb


@pytest.mark.parametrize("message,shown", [
    ("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
     "3221225472 bytes. Error code 12 (Cannot allocate memory)", "3.2 GB more"),
    ("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.10 GiB total capacity)", "2.00 GiB more"),
])
def test_torchs_allocation_failures_are_one_line_out_of_memory(monkeypatch, capsys, message, shown):
    from ldm_export.cli_common import _guard

    monkeypatch.delenv("LDM_EXPORT_DEBUG", raising=False)

    @_guard
    def command():
        raise RuntimeError(message)

    with pytest.raises(SystemExit) as e:
        command()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 3 and len(err.splitlines()) == 1 and f"could not get {shown})" in err, err

    @_guard
    def other():
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):  # any other error is not called memory
        other()
