"""Train the embedded demo model: VAE first, then UNet + CLIP text encoder jointly (DDPM, epsilon).

    python -m ldm_export.demo.train --out DIR [--device cuda|cpu] [--seed 0]

Writes a diffusers folder (``StableDiffusionPipeline.from_pretrained(DIR/model)`` loads it), the
training log ``train_log.jsonl`` (losses), and a sample grid. Imports nothing of ldm_export beyond
``ldm_export.demo``, so it runs from a plain checkout with ``PYTHONPATH=.``. Seeded: the same seed,
step counts and device give the same weights up to GPU nondeterminism in cuDNN/attention kernels.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ldm_export.demo import config
from ldm_export.demo.data import caption, make_dataset

TOKENIZER_FILES = ("vocab.json", "merges.txt")
# "a photograph of an astronaut riding a horse" as OpenAI's CLIP tokenizer encodes it
_REFERENCE_IDS = [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]


def load_tokenizer(folder: str | Path):
    """transformers' CLIPTokenizer from vocab.json/merges.txt, padded with <|endoftext|> to 77 like SD 1.5."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    kwargs = dict(pad_token="<|endoftext|>", model_max_length=config.MAX_LENGTH)
    try:
        tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), **kwargs)
    except TypeError:  # transformers 5 takes the files by keyword only
        tok = CLIPTokenizer(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"), **kwargs)
    got = tok("a photograph of an astronaut riding a horse").input_ids
    if list(got) != _REFERENCE_IDS:
        raise RuntimeError(f"tokenizer gives {got}, CLIP gives {_REFERENCE_IDS}")
    return tok


def tokenize(tok, texts: list[str]) -> torch.Tensor:
    """(N, 77) int64 ids; each distinct text is tokenized once."""
    cache: dict[str, list[int]] = {}
    for t in set(texts):
        cache[t] = tok(t, padding="max_length", max_length=config.MAX_LENGTH, truncation=True).input_ids
    return torch.tensor([cache[t] for t in texts], dtype=torch.int64)


def log_line(path: Path, record: dict) -> None:
    print(json.dumps(record), flush=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def lr_at(step: int, lr: float, warmup: int, progress: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 10 % over ``progress`` in [0, 1] (steps or seconds done / budget)."""
    decay = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, progress)))
    return lr * min(1.0, (step + 1) / warmup) * decay


def _progress(step: int, steps: int, t0: float, seconds: float) -> float:
    done = step / max(1, steps)
    return max(done, (time.time() - t0) / seconds) if seconds else done


def _autocast(device: torch.device):
    """bf16 autocast on CUDA (the GPU run); plain fp32 on the CPU."""
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_vae(images_u8: torch.Tensor, args, log_path: Path, device: torch.device):
    """AutoencoderKL on L1 reconstruction + a small KL term (SD used 1e-6; no GAN/LPIPS at 64 px)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**config.VAE).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    n, t0, window = images_u8.shape[0], time.time(), []
    step = 0
    for step in range(args.vae_steps):
        if args.vae_seconds and time.time() - t0 > args.vae_seconds:
            log_line(log_path, {"stage": "vae", "stopped_at_time_budget": step})
            break
        idx = torch.randint(0, n, (args.vae_batch,), generator=gen).to(device)
        x = images_u8[idx].permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, 64, 64) in [-1, 1]
        with _autocast(device):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample.float()
        l1 = (rec - x).abs().mean()
        kl = post.kl().float().mean() / x[0].numel()
        # L1 keeps edges sharp; the squared term punishes the colour shifts the adherence check reads
        loss = l1 + (rec - x).pow(2).mean() + args.vae_kl * kl
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vae_lr, 200, _progress(step, args.vae_steps, t0, args.vae_seconds))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        window.append((l1.item(), kl.item()) if step % 10 == 0 else None)
        if (step + 1) % args.log_every == 0:
            w = [v for v in window if v is not None]
            log_line(log_path, {"stage": "vae", "step": step + 1, "l1": float(np.mean([v[0] for v in w])),
                                "kl": float(np.mean([v[1] for v in w])), "seconds": round(time.time() - t0, 1)})
            window = []
    else:
        step = args.vae_steps
    return vae.eval(), step, time.time() - t0


@torch.no_grad()
def measure_scale(vae, images_u8: torch.Tensor, n: int = 4096) -> float:
    """1 / std of the VAE's latents over a data sample: how SD's 0.18215 was computed."""
    zs = []
    gen = torch.Generator(device=images_u8.device).manual_seed(0)
    for start in range(0, min(n, images_u8.shape[0]), 512):
        x = images_u8[start:start + 512].permute(0, 3, 1, 2).float() / 127.5 - 1.0
        post = vae.encode(x).latent_dist
        zs.append(post.mean + post.std * torch.randn(post.mean.shape, generator=gen, device=x.device))
    return float(1.0 / torch.cat(zs).flatten().std())


@torch.no_grad()
def vae_ceiling(vae, device: torch.device, n: int = 600, seed: int = 4321) -> dict[str, float]:
    """Adherence of the VAE's own reconstructions of ``n`` unseen images: the most a diffusion model on its latents can reach."""
    from ldm_export.demo import adherence
    from ldm_export.demo.data import make_dataset

    data = make_dataset(n, seed, config.RESOLUTION)
    x = torch.from_numpy(data.images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    rec = torch.cat([vae.decode(vae.encode(x[i:i + 200]).latent_dist.mean).sample for i in range(0, n, 200)])
    rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    readings = [adherence.read_image(im) for im in rec]
    return adherence.score(readings, [("", s.colour, s.shape, s.position) for s in data.scenes])


@torch.no_grad()
def encode_all(vae, images_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for start in range(0, images_u8.shape[0], 1024):
        x = images_u8[start:start + 1024].permute(0, 3, 1, 2).float() / 127.5 - 1.0
        post = vae.encode(x).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)  # (N, 4, 8, 8) each


def train_diffusion(lat_mean, lat_std, ids, empty_ids, scale, args, log_path: Path, device: torch.device):
    """UNet + text encoder from scratch, epsilon objective on SD's scaled_linear schedule, 10% empty prompts."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(args.seed + 2)
    if args.resume:  # continue a run: its UNet and text encoder (and, in main, its VAE and latent scale)
        unet = UNet2DConditionModel.from_pretrained(Path(args.resume) / "unet").float().to(device).train()
        text_encoder = load_text_encoder(Path(args.resume) / "text_encoder").to(device).train()
    else:
        unet = UNet2DConditionModel(**config.UNET).to(device).train()
        text_encoder = CLIPTextModel(CLIPTextConfig(**config.TEXT_ENCODER)).to(device).train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    betas = torch.linspace(config.SCHEDULER["beta_start"] ** 0.5, config.SCHEDULER["beta_end"] ** 0.5,
                           config.SCHEDULER["num_train_timesteps"], dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, 0).float().to(device)
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 3)
    n_images, n_caps = ids.shape[0], ids.shape[1]
    t0, window, step = time.time(), [], 0
    for step in range(args.unet_steps):
        if args.unet_seconds and time.time() - t0 > args.unet_seconds:
            log_line(log_path, {"stage": "diffusion", "stopped_at_time_budget": step})
            break
        b = args.batch
        idx = torch.randint(0, n_images, (b,), generator=gen)
        cap = torch.randint(0, n_caps, (b,), generator=gen)
        drop = torch.rand(b, generator=gen) < args.cond_dropout
        t = torch.randint(0, config.SCHEDULER["num_train_timesteps"], (b,), generator=gen).to(device)
        noise = torch.randn((b, 4, lat_mean.shape[2], lat_mean.shape[3]), generator=gen).to(device)
        eps_post = torch.randn((b, 4, lat_mean.shape[2], lat_mean.shape[3]), generator=gen).to(device)
        idx_d = idx.to(device)
        latents = (lat_mean[idx_d] + lat_std[idx_d] * eps_post) * scale  # (B, 4, 8, 8)
        input_ids = torch.where(drop[:, None], empty_ids[None, :], ids[idx, cap]).to(device)  # (B, 77)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        with _autocast(device):
            encoder_hidden_states = text_encoder(input_ids)[0]  # (B, 77, D)
            pred = unet(noisy, t, encoder_hidden_states).sample
        loss = F.mse_loss(pred.float(), noise)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.lr, args.warmup, _progress(step, args.unet_steps, t0, args.unet_seconds))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)
        window.append(loss.detach())
        if (step + 1) % args.log_every == 0:
            log_line(log_path, {"stage": "diffusion", "step": step + 1, "loss": float(torch.stack(window).mean()),
                                "seconds": round(time.time() - t0, 1)})
            window = []
    else:
        step = args.unet_steps
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    return unet.eval(), text_encoder.eval(), step, time.time() - t0


def model_index() -> dict:
    """diffusers' model_index.json of the demo folder (the same as the zoo's ModelSpec.model_index())."""
    return {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.35.2",
        "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", config.SCHEDULER["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }


def save_folder(out: Path, text_encoder, unet, vae, tokenizer_dir: Path, dtype=torch.float16) -> None:
    """A diffusers folder; weights stored in ``dtype`` (fp16 keeps the repo small; they load into fp32 modules)."""
    from diffusers import EulerDiscreteScheduler

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name, module in (("text_encoder", text_encoder), ("unet", unet), ("vae", vae)):
        module.to("cpu", dtype).save_pretrained(out / name)  # safetensors by default
        module.float()
    EulerDiscreteScheduler.from_config({k: v for k, v in config.SCHEDULER.items() if k != "_class_name"}) \
        .save_pretrained(out / "scheduler")
    tok_out = out / "tokenizer"
    tok_out.mkdir()
    for f in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / f, tok_out / f)
    (tok_out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": config.MAX_LENGTH, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "do_lower_case": True, "errors": "replace", "add_prefix_space": False}, indent=2) + "\n")
    (tok_out / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>"}, indent=2) + "\n")
    (out / "model_index.json").write_text(json.dumps(model_index(), indent=2) + "\n")


def load_text_encoder(folder: str | Path):
    """CLIPTextModel in fp32 from a folder written by transformers 4.x or 5.x.

    transformers 5 saves CLIPTextModel's weights without the ``text_model.`` prefix that 4.x expects;
    re-keying them lets a folder written on the GPU machine (transformers 5) load here (4.57).
    """
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    state = {k: v.float() for k, v in load_file(folder / "model.safetensors").items()}
    model = CLIPTextModel(CLIPTextConfig(**config.TEXT_ENCODER))
    expected = set(model.state_dict())
    def rekey(k: str) -> str:  # either version's keys onto this version's model
        if k in expected:
            return k
        bare = k.removeprefix("text_model.")
        return next((c for c in (f"text_model.{k}", bare) if c in expected), k)

    state = {rekey(k): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"text encoder weights do not match: missing {missing}, unexpected {unexpected}")
    return model.eval()


def repackage(src: str | Path, dst: str | Path) -> None:
    """Re-save a trained folder with this machine's libraries (fp16 weights, fp32 modules on load)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    src = Path(src)
    save_folder(Path(dst), load_text_encoder(src / "text_encoder"),
                UNet2DConditionModel.from_pretrained(src / "unet").float(),
                AutoencoderKL.from_pretrained(src / "vae").float(), src / "tokenizer")


def euler_generate(text_encoder, unet, vae, tok, device: torch.device):
    """SD's sampling loop with diffusers' EulerDiscreteScheduler and CFG, without the pipeline class."""
    from diffusers import EulerDiscreteScheduler
    from PIL import Image

    scheduler = EulerDiscreteScheduler.from_config({k: v for k, v in config.SCHEDULER.items() if k != "_class_name"})
    scale = vae.config.scaling_factor
    side = config.RESOLUTION // 8

    @torch.no_grad()
    def generate(prompts, guidance_scale, steps, seed):
        n = len(prompts)
        cond = text_encoder(tokenize(tok, list(prompts)).to(device))[0]
        uncond = text_encoder(tokenize(tok, [""] * n).to(device))[0]
        from ldm_export.demo.adherence import initial_latents

        latents = torch.from_numpy(initial_latents(n, seed, side)).to(device)
        scheduler.set_timesteps(steps, device=device)
        latents = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            eps_u, eps_c = unet(x, t, torch.cat([uncond, cond])).sample.chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
            latents = scheduler.step(eps, t, latents).prev_sample
        images = vae.decode(latents / scale).sample
        images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(im) for im in images]

    return generate


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the embedded demo model (VAE, then UNet + text encoder).")
    p.add_argument("--out", required=True, help="output folder: model/ (diffusers folder), train_log.jsonl, grid")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=str(Path(__file__).resolve().parent.parent / "assets" / "demo" / "tokenizer"),
                   help="folder with CLIP's vocab.json and merges.txt")
    p.add_argument("--images", type=int, default=60000)
    p.add_argument("--captions-per-image", type=int, default=4)
    p.add_argument("--vae-steps", type=int, default=5000)
    p.add_argument("--vae-batch", type=int, default=128)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-kl", type=float, default=1e-6)
    p.add_argument("--unet-steps", type=int, default=15000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=500, help="linear warm-up steps of the diffusion stage")
    p.add_argument("--resume", metavar="DIR", help="continue the diffusion stage from a trained folder DIR "
                   "(its VAE and latent scale are kept; no VAE training)")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--cond-dropout", type=float, default=0.1)
    p.add_argument("--vae-seconds", type=float, default=0, help="stop the VAE stage after this long (0: no limit)")
    p.add_argument("--unet-seconds", type=float, default=0, help="stop the diffusion stage after this long (0: no limit)")
    p.add_argument("--log-every", type=int, default=200)
    p.add_argument("--eval", action="store_true", help="after training, measure adherence with the Euler loop")
    p.add_argument("--repackage", metavar="SRC", help="only re-save the trained folder SRC into --out with this "
                   "machine's libraries (e.g. one written by transformers 5 on the GPU machine)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.repackage:
        repackage(args.repackage, args.out)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.jsonl"
    log_path.write_text("")
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolutions once
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    t0 = time.time()
    # worker processes fork before CUDA is initialised
    data = make_dataset(args.images, args.seed, config.RESOLUTION, workers=min(16, os.cpu_count() or 1))
    log_line(log_path, {"stage": "start", "args": vars(args), "torch": torch.__version__,
                        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"})
    tok = load_tokenizer(args.tokenizer)
    texts = [data.captions[i] if k == 0 else caption(data.scenes[i], np.random.default_rng([args.seed, i, k]))
             for i in range(args.images) for k in range(args.captions_per_image)]
    ids = tokenize(tok, texts).view(args.images, args.captions_per_image, config.MAX_LENGTH)
    empty_ids = tokenize(tok, [""])[0]
    images_u8 = torch.from_numpy(data.images).to(device)  # (N, 64, 64, 3) uint8
    log_line(log_path, {"stage": "data", "images": args.images, "distinct_captions": len(set(texts)),
                        "seconds": round(time.time() - t0, 1)})

    if args.resume:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(Path(args.resume) / "vae").float().to(device).eval()
        vae_steps, vae_s, scale = 0, 0.0, float(vae.config.scaling_factor)
    else:
        vae, vae_steps, vae_s = train_vae(images_u8, args, log_path, device)
        scale = measure_scale(vae, images_u8)
        vae.register_to_config(scaling_factor=scale)
    lat_mean, lat_std = encode_all(vae, images_u8)
    log_line(log_path, {"stage": "vae_done", "steps": vae_steps, "seconds": round(vae_s, 1), "scaling_factor": scale,
                        "reconstruction_adherence": vae_ceiling(vae, device)})

    unet, text_encoder, unet_steps, unet_s = train_diffusion(lat_mean, lat_std, ids, empty_ids, scale, args,
                                                             log_path, device)
    log_line(log_path, {"stage": "diffusion_done", "steps": unet_steps, "seconds": round(unet_s, 1)})

    save_folder(out / "model", text_encoder, unet, vae, Path(args.tokenizer))
    # sample from the weights as saved (fp16-rounded), in fp32
    from diffusers import AutoencoderKL, UNet2DConditionModel
    text_encoder = load_text_encoder(out / "model" / "text_encoder").to(device)
    unet = UNet2DConditionModel.from_pretrained(out / "model" / "unet").float().to(device)
    vae = AutoencoderKL.from_pretrained(out / "model" / "vae").float().to(device)
    generate = euler_generate(text_encoder.eval(), unet.eval(), vae.eval(), tok, device)
    from ldm_export.demo import adherence

    adherence.sample_grid(generate, out / "grid.png")
    if args.eval:
        result = adherence.evaluate(generate, batch_size=120)
        log_line(log_path, {"stage": "adherence_euler_loop", **result})
    log_line(log_path, {"stage": "done", "seconds": round(time.time() - t0, 1)})


if __name__ == "__main__":
    main()
