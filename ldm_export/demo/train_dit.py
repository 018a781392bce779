"""Train the embedded demo DiT: an SD3-class MMDiT by flow matching on the demo's latents (VAE, CLIP frozen).

    python -m ldm_export.demo.train_dit --out DIR [--device cuda|cpu] [--seconds S] [--batch N] [--eval]

Rectified flow as in SD3 (Esser et al. 2024): x_s = (1 - s) x0 + s noise, the transformer predicts the velocity
noise - x0 at timestep 1000 s, with s drawn logit-normal (mean 0, std 1); 10 % of the captions are dropped to the
empty prompt for classifier-free guidance; EMA weights are saved. The VAE and CLIP text encoder are the demo U-Net
model's (``ldm_export/assets/demo``), frozen. Writes ``DIR/model/transformer`` and ``DIR/model/scheduler``
(diffusers folders), ``train_log.jsonl``, a sample grid and, with ``--eval``, the adherence table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ldm_export.demo import dit_config as config
from ldm_export.demo.data import caption, make_dataset
from ldm_export.demo.train import _autocast, encode_all, load_text_encoder, load_tokenizer, log_line, lr_at, tokenize

DEMO_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "demo"


@torch.no_grad()
def encode_text(text_encoder, ids: torch.Tensor, batch: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP (N, 77) ids -> context (N, 32, D) and pooled (N, D); the first 32 of 77 causal outputs are a 32-token run."""
    ctx, pooled = [], []
    for start in range(0, ids.shape[0], batch):
        out = text_encoder(ids[start:start + batch, :config.MAX_LENGTH])
        ctx.append(out.last_hidden_state)
        pooled.append(out.pooler_output)
    return torch.cat(ctx), torch.cat(pooled)


def train(lat_mean, lat_std, scale, ctx, pooled, empty_ctx, empty_pooled, args, log_path: Path, device):
    """Flow matching with logit-normal sigmas, CFG dropout, AdamW, EMA; returns the EMA transformer."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(args.seed + 2)
    model = SD3Transformer2DModel(**config.TRANSFORMER).to(device).train()
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 3)
    n_images, n_caps = ctx.shape[0], ctx.shape[1]
    t0, window, step = time.time(), [], 0
    for step in range(args.steps):
        if args.seconds and time.time() - t0 > args.seconds:
            log_line(log_path, {"stage": "dit", "stopped_at_time_budget": step})
            break
        b = args.batch
        idx = torch.randint(0, n_images, (b,), generator=gen)
        cap = torch.randint(0, n_caps, (b,), generator=gen)
        drop = (torch.rand(b, generator=gen) < args.cond_dropout).to(device)
        sigmas = torch.sigmoid(torch.randn(b, generator=gen)).to(device)  # logit-normal(0, 1)
        noise = torch.randn((b, 4, lat_mean.shape[2], lat_mean.shape[3]), generator=gen).to(device)
        eps_post = torch.randn(noise.shape, generator=gen).to(device)  # a draw from the VAE's posterior
        idx_d, cap_d = idx.to(device), cap.to(device)
        x0 = (lat_mean[idx_d] + lat_std[idx_d] * eps_post) * scale  # (B, 4, 8, 8)
        s = sigmas.view(-1, 1, 1, 1)
        xs = (1 - s) * x0 + s * noise
        c = torch.where(drop[:, None, None], empty_ctx[None], ctx[idx_d, cap_d])  # (B, 32, D)
        p = torch.where(drop[:, None], empty_pooled[None], pooled[idx_d, cap_d])  # (B, D)
        with _autocast(device):
            pred = model(hidden_states=xs, encoder_hidden_states=c, pooled_projections=p,
                         timestep=sigmas * 1000, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise - x0)
        progress = max(step / max(1, args.steps), (time.time() - t0) / args.seconds if args.seconds else 0.0)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.lr, args.warmup, progress)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [q.detach() for q in params], 1.0 - decay)
        window.append(loss.detach())
        if (step + 1) % args.log_every == 0:
            log_line(log_path, {"stage": "dit", "step": step + 1, "loss": float(torch.stack(window).mean()),
                                "seconds": round(time.time() - t0, 1)})
            window = []
    else:
        step = args.steps
    with torch.no_grad():
        for q, e in zip(params, ema):
            q.copy_(e)
    return model.eval(), step, time.time() - t0


def save_folder(out: Path, transformer, dtype=torch.float16) -> None:
    """transformer/ (fp16 safetensors) and scheduler/ of the demo DiT; the rest is read from assets/demo."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    transformer.to("cpu", dtype).save_pretrained(out / "transformer")
    transformer.float()
    FlowMatchEulerDiscreteScheduler.from_config({k: v for k, v in config.SCHEDULER.items() if k != "_class_name"}) \
        .save_pretrained(out / "scheduler")


def flow_generate(text_encoder, transformer, vae, tok, device, shift: float | None = None):
    """The flow-matching Euler loop with CFG over diffusers' FlowMatchEulerDiscreteScheduler (no pipeline class:
    StableDiffusion3Pipeline needs three text encoders)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from PIL import Image

    from ldm_export.demo.adherence import initial_latents

    sched_cfg = {k: v for k, v in config.SCHEDULER.items() if k != "_class_name"}
    if shift is not None:
        sched_cfg["shift"] = shift
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(sched_cfg)
    scale = vae.config.scaling_factor
    side = config.RESOLUTION // 8

    @torch.no_grad()
    def generate(prompts: Sequence[str], guidance_scale: float, steps: int, seed: int):
        n = len(prompts)
        ids = tokenize(tok, list(prompts) + [""] * n).to(device)
        ctx, pooled = encode_text(text_encoder, ids)
        ctx = torch.cat([ctx[n:], ctx[:n]])  # uncond first, as diffusers' pipelines batch CFG
        pooled = torch.cat([pooled[n:], pooled[:n]])
        latents = torch.from_numpy(initial_latents(n, seed, side)).to(device)
        scheduler.set_timesteps(steps, device=device)
        for t in scheduler.timesteps:
            v = transformer(hidden_states=torch.cat([latents, latents]), encoder_hidden_states=ctx,
                            pooled_projections=pooled, timestep=t.expand(2 * n), return_dict=False)[0]
            v_u, v_c = v.chunk(2)
            latents = scheduler.step(v_u + guidance_scale * (v_c - v_u), t, latents).prev_sample
        images = vae.decode(latents / scale).sample
        images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(im) for im in images]

    return generate


def grid(images, columns: int = 4, scale: int = 2):
    """Images side by side in rows (PIL only: the GPU machine may lack matplotlib); prompts in the log."""
    from PIL import Image

    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * w * scale, rows * h * scale), (255, 255, 255))
    for k, im in enumerate(images):
        sheet.paste(im.resize((w * scale, h * scale), Image.Resampling.NEAREST),
                    ((k % columns) * w * scale, (k // columns) * h * scale))
    return sheet


def load_demo_parts(device):
    """The demo U-Net model's CLIP text encoder, VAE and tokenizer (frozen)."""
    from diffusers import AutoencoderKL

    text_encoder = load_text_encoder(DEMO_ASSETS / "text_encoder").to(device).eval().requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(DEMO_ASSETS / "vae").float().to(device).eval().requires_grad_(False)
    return text_encoder, vae, load_tokenizer(DEMO_ASSETS / "tokenizer")


def install(src: str | Path, dest: str | Path | None = None) -> Path:
    """Copy a trained ``DIR/model`` (transformer/, scheduler/) into the package's ``assets/demo_dit`` with the
    model_index.json that points the text encoder, VAE and tokenizer at the demo U-Net model's folders."""
    src = Path(src)
    dest = Path(dest) if dest else DEMO_ASSETS.parent / "demo_dit"
    for sub in ("transformer", "scheduler"):
        if not (src / sub / "config.json").is_file() and not (src / sub / "scheduler_config.json").is_file():
            raise SystemExit(f"{src / sub} is missing; pass the model/ folder train_dit.py wrote")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for sub in ("transformer", "scheduler"):
        shutil.copytree(src / sub, dest / sub)
    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.35.2",
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "transformer": ["diffusers", "SD3Transformer2DModel"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "vae": ["diffusers", "AutoencoderKL"],
             # read by ldm_export.export.dit_weights: these modules are the demo U-Net model's, not copies
             "_ldm_export_shared": {"text_encoder": "../demo/text_encoder", "vae": "../demo/vae",
                                    "tokenizer": "../demo/tokenizer"}}
    (dest / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return dest


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the embedded demo DiT (SD3-class MMDiT, flow matching).")
    p.add_argument("--out", help="output folder (model/, train_log.jsonl, grid.png)")
    p.add_argument("--install", metavar="MODEL_DIR", help="only copy a trained DIR/model into ldm_export/assets/demo_dit")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=60000)
    p.add_argument("--captions-per-image", type=int, default=4)
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--seconds", type=float, default=0, help="stop after this long (0: no limit); the LR schedule "
                   "follows whichever of steps and seconds runs out first")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--cond-dropout", type=float, default=0.1)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--eval", action="store_true", help="after training, the adherence table (torch, diffusers' "
                   "FlowMatchEulerDiscreteScheduler) at guidance 1..10")
    p.add_argument("--eval-shifts", type=float, nargs="*", default=[1.0], help="scheduler shifts to evaluate")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.install:
        print(f"installed the demo DiT into {install(args.install)}")
        return
    if not args.out:
        raise SystemExit("--out is required for training")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.jsonl"
    log_path.write_text("")
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    t0 = time.time()
    data = make_dataset(args.images, args.seed, config.RESOLUTION,
                        workers=min(16, os.cpu_count() or 1) if device.type == "cuda" else 1)
    log_line(log_path, {"stage": "start", "args": vars(args), "torch": torch.__version__,
                        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                        "transformer": config.TRANSFORMER})
    text_encoder, vae, tok = load_demo_parts(device)
    texts = [data.captions[i] if k == 0 else caption(data.scenes[i], np.random.default_rng([args.seed, i, k]))
             for i in range(args.images) for k in range(args.captions_per_image)]
    longest = max(len(tok(t).input_ids) for t in set(texts))
    if longest > config.MAX_LENGTH:
        raise SystemExit(f"a caption has {longest} tokens, more than the DiT's {config.MAX_LENGTH}")
    ids = tokenize(tok, texts).to(device)
    ctx, pooled = encode_text(text_encoder, ids)
    ctx = ctx.view(args.images, args.captions_per_image, config.MAX_LENGTH, -1)
    pooled = pooled.view(args.images, args.captions_per_image, -1)
    empty_ctx, empty_pooled = (x[0] for x in encode_text(text_encoder, tokenize(tok, [""]).to(device)))
    images_u8 = torch.from_numpy(data.images).to(device)
    lat_mean, lat_std = encode_all(vae, images_u8)
    scale = float(vae.config.scaling_factor)
    del images_u8
    log_line(log_path, {"stage": "data", "images": args.images, "distinct_captions": len(set(texts)),
                        "longest_caption_tokens": longest, "seconds": round(time.time() - t0, 1)})
    transformer, steps, seconds = train(lat_mean, lat_std, scale, ctx, pooled, empty_ctx, empty_pooled, args,
                                        log_path, device)
    n_params = sum(p.numel() for p in transformer.parameters())
    log_line(log_path, {"stage": "dit_done", "steps": steps, "seconds": round(seconds, 1), "parameters": n_params})
    save_folder(out / "model", transformer)

    from diffusers import SD3Transformer2DModel

    from ldm_export.demo import adherence

    transformer = SD3Transformer2DModel.from_pretrained(out / "model" / "transformer").float().to(device).eval()
    for shift in args.eval_shifts:
        generate = flow_generate(text_encoder, transformer, vae, tok, device, shift=shift)
        if shift == args.eval_shifts[0]:
            grid(generate(list(adherence.GRID_PROMPTS), config.DEFAULT_GUIDANCE, config.DEFAULT_STEPS, 0)) \
                .save(out / "grid.png")
        if args.eval:
            result = adherence.evaluate(generate, batch_size=120)
            log_line(log_path, {"stage": "adherence", "shift": shift, **result})
            print(adherence.table_markdown(result), flush=True)
    log_line(log_path, {"stage": "done", "seconds": round(time.time() - t0, 1)})


if __name__ == "__main__":
    main()
