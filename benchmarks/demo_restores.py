"""Does the offline demo restore its held-out photo? Its settings against the same demo trained on
the whole photos only (no tiles), over training seeds, with the default 8 sampling steps and with
1, beside restorers from outside the method fitted to the same training pairs (the demo's own
images at the same seed), each an answer to "how much can be restored here at all":

- the best linear filters (least squares): 7x7 in pixel space (per output channel, on all three
  input channels), and 3x3 in the stand-in VAE's latent space (16 channels in, decoded);
- a 7-layer residual CNN (48 channels, 3x3) trained on random 48 px crops for ``--fit-seconds``;
- the stand-in itself with **every** weight trained (not a LoRA) for ``--fit-seconds``, on the
  bridge objective with random 64 px crops, restored in 1 and 8 Euler steps.

Each demo run is ``python -m kontext_train demo`` in a fresh process (the command a user runs);
the 1-step figures re-run the finished demo, which restores again without training. Run from the
repository root with the test host's Python and ComfyUI:

    COMFYUI_PATH=.host/0.33.0/ComfyUI .host/0.33.0/venv/bin/python benchmarks/demo_restores.py

``--json PATH`` keeps the per-run numbers. About 20 minutes on a 2-core CPU (two jobs at a time).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import ROOT, machine_info, md_table, write_json

# The demo with its training photos whole only (last round's demo): the same command with the
# export's tiles switched off before it runs.
WHOLE_ONLY = "import sys, kontext_train.app.demo as d; d.DEMO_TILE_GRIDS = (); from kontext_train.app import cli; sys.exit(cli.main(sys.argv[1:]))"
CONFIGS = {"demo defaults": ["-m", "kontext_train"], "whole photos only": ["-c", WHOLE_ONLY]}


def run_demo(out: Path, seed: int, program: list[str], restore_steps: int | None = None) -> dict:
    cmd = [sys.executable, *program, "demo", "--output-dir", str(out), "--seed", str(seed)]
    if restore_steps is not None:
        cmd += ["--restore-steps", str(restore_steps)]
    # One thread per run: two runs share the two cores without oversubscribing them.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    mean = json.loads((out / "evaluation.json").read_text())["mean"]
    return {
        "seconds": time.perf_counter() - start,
        **{k: mean[k] for k in ("psnr_restored", "psnr_degraded", "ssim_restored", "ssim_degraded")},
    }


def one_seed(config: str, seed: int, root: Path) -> list[dict]:
    out = root / f"{config.replace(' ', '_')}_{seed}"
    rows = []
    for steps in (None, 1):  # None: the LoRA's own (8 for bridge); then the finished run again at 1
        row = run_demo(out, seed, CONFIGS[config], steps)
        rows.append({"config": config, "seed": seed, "restore_steps": steps or 8, **row})
    return rows


def bounds(demo_images: Path, seed: int, fit_seconds: float) -> dict:
    """PSNR of the held-out photo: degraded, and restored by each restorer from outside the method
    (see the module's docstring), all fitted to the demo's training pairs at ``seed``."""
    import torch
    import torch.nn.functional as F

    from kontext_train.app.demo import DEMO_DEFAULTS, DEMO_HELD_OUT
    from kontext_train.app.standin import read_standin
    from kontext_train.comfyui import photo_vae
    from kontext_train.data.dataset import build_dataset

    torch.manual_seed(seed)
    ds = build_dataset(
        demo_images,
        val_count=1,
        seed=seed,
        bucket_scale=float(DEMO_DEFAULTS["bucket_scale"]),
        held_out_first=DEMO_HELD_OUT,
    )
    pairs = [ds.load_pair(sample, 0, seed) for sample in ds.train]
    clean, degraded = ds.load_pair(ds.val[0], 0, seed)
    pca = {k: v.float() for k, v in read_standin()[0].items()}

    def psnr(a: torch.Tensor) -> float:
        return -10 * math.log10(F.mse_loss(a.float().clamp(0, 1), clean).item())

    def least_squares(k: int, space) -> torch.Tensor:
        """The best k x k linear filter in ``space`` ((to, back) maps), applied to the held-out photo."""
        to, back = space

        def features(x: torch.Tensor) -> torch.Tensor:
            patches = F.unfold(to(x)[None].double(), k, padding=k // 2)[0]
            return torch.cat([patches, torch.ones(1, patches.shape[1], dtype=patches.dtype)]).T

        xs = torch.cat([features(d) for _, d in pairs])
        ys = torch.cat([to(c).reshape(to(c).shape[0], -1).T.double() for c, _ in pairs])
        weights = torch.linalg.lstsq(xs, ys).solution
        return back((features(degraded) @ weights).T.reshape(to(clean).shape).float())

    pixels = (lambda x: x, lambda x: x)
    latents = (
        lambda x: photo_vae.encode(pca, x[None])[0],
        lambda z: photo_vae.decode(pca, z[None])[0],
    )
    out = {
        "degraded": psnr(degraded),
        "linear 7x7 pixels": psnr(least_squares(7, pixels)),
        "linear 3x3 latents": psnr(least_squares(3, latents)),
        "cnn": psnr(cnn_restore(pairs, degraded, fit_seconds, seed)),
    }
    out.update(finetune_restore(pairs, degraded, pca, fit_seconds, seed, psnr))
    return out


def cnn_restore(pairs: list, degraded, seconds: float, seed: int):
    """A residual CNN trained on random crops of the pairs for ``seconds``, applied to ``degraded``."""
    import random

    import torch
    import torch.nn.functional as F

    rng = random.Random(seed)
    layers = [torch.nn.Conv2d(3, 48, 3, padding=1), torch.nn.ReLU()]
    for _ in range(5):
        layers += [torch.nn.Conv2d(48, 48, 3, padding=1), torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers, torch.nn.Conv2d(48, 3, 3, padding=1))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        xs, ys = [], []
        for _ in range(8):
            clean, deg = rng.choice(pairs)
            top, left = rng.randint(0, clean.shape[1] - 48), rng.randint(0, clean.shape[2] - 48)
            xs.append(deg[:, top : top + 48, left : left + 48])
            ys.append(clean[:, top : top + 48, left : left + 48])
        x, y = torch.stack(xs), torch.stack(ys)
        loss = F.mse_loss(x + net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return degraded + net(degraded[None])[0]


def finetune_restore(pairs: list, degraded, pca: dict, seconds: float, seed: int, psnr) -> dict:
    """The stand-in with every weight trained on the bridge objective (v = degraded - clean at
    x = sigma * degraded + (1 - sigma) * clean, the demo's guidance and prompt) for ``seconds``, on
    random 16x16-latent crops in batches of 4; PSNR restored in 1 and 8 Euler steps."""
    import random

    import torch

    from kontext_train import comfyui
    from kontext_train.app import standin
    from kontext_train.comfyui import photo_vae
    from kontext_train.comfyui.tiny_models import full_training, load_tiny_flux
    from kontext_train.method.flow import flux_shift_mu, image_tokens, sample_training_sigmas

    comfyui.bootstrap_comfyui(cpu=True)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    meta = standin.read_standin()[1]
    arch = meta["settings"]["arch"]
    base = load_tiny_flux({**arch, "seed": 0}, standin.ASSET).model
    net = base.diffusion_model
    net.requires_grad_(True)
    context, pooled = standin.task_conditioning("restore", arch["context_in_dim"])

    def latent(image):
        return base.process_latent_in(photo_vae.encode(pca, image[None]))

    def velocity(x, sigma, options):
        n = len(x)
        return net(
            x,
            sigma,
            context.expand(n, -1, -1),
            y=pooled.expand(n, -1),
            guidance=torch.full((n,), 1.5),
            transformer_options=options,
        )

    with torch.no_grad():
        latents = [(latent(c), latent(d)) for c, d in pairs]
    mu = flux_shift_mu(image_tokens(16, 16))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)
    out = {}
    with full_training(net) as options:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            cs, ds_ = [], []
            for _ in range(4):
                c, d = rng.choice(latents)
                top = rng.randrange(0, c.shape[-2] - 16 + 1, 2)
                left = rng.randrange(0, c.shape[-1] - 16 + 1, 2)
                cs.append(c[0, :, top : top + 16, left : left + 16])
                ds_.append(d[0, :, top : top + 16, left : left + 16])
            c, d = torch.stack(cs), torch.stack(ds_)
            sigma = sample_training_sigmas(4, "shifted_uniform", mu, gen)
            s = sigma.view(-1, 1, 1, 1)
            loss = ((velocity(s * d + (1 - s) * c, sigma, options).float() - (d - c)) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
        with torch.no_grad():
            for steps in (1, 8):
                x = latent(degraded)
                sigmas = torch.linspace(1, 0, steps + 1)
                for i in range(steps):
                    x = x + (sigmas[i + 1] - sigmas[i]) * velocity(x, sigmas[i : i + 1], options)
                out[f"stand-in fully trained, {steps} step{'s' if steps > 1 else ''}"] = psnr(
                    photo_vae.decode(pca, base.process_latent_out(x))[0]
                )
    return out


def mean_sd(xs: list[float], fmt: str) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):{fmt}} ± {sd:{fmt.lstrip('+')}}"


def bounds_in_child(root: Path, seed: int, fit_seconds: float) -> dict:
    """``bounds`` in a fresh one-thread process (it shares the cores with a demo run)."""
    cmd = [sys.executable, __file__, "--bounds-of", str(root / f"bounds_{seed}"), "--seeds", str(seed)]
    cmd += ["--fit-seconds", str(fit_seconds)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return {"seed": seed, **json.loads(done.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fit-seconds", type=float, default=120.0)
    parser.add_argument("--json")
    parser.add_argument("--bounds-of", type=Path, help=argparse.SUPPRESS)  # the child's job
    args = parser.parse_args()
    if args.bounds_of:
        from kontext_train.app.demo import export_sample_photos

        export_sample_photos(args.bounds_of)
        print(json.dumps(bounds(args.bounds_of, args.seeds[0], args.fit_seconds)))
        return
    root = Path(tempfile.mkdtemp(prefix="kr_demo_bench_"))
    jobs = [(one_seed, (c, s, root)) for c in CONFIGS for s in args.seeds]
    jobs += [(bounds_in_child, (root, s, args.fit_seconds)) for s in args.seeds]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: job[0](*job[1]), jobs))
    rows = [r for rs in results[: -len(args.seeds)] for r in rs]
    fitted = results[-len(args.seeds) :]

    table = []
    for config in CONFIGS:
        for steps in (8, 1):
            sel = [r for r in rows if r["config"] == config and r["restore_steps"] == steps]
            gains = [r["psnr_restored"] - r["psnr_degraded"] for r in sel]
            table.append(
                [
                    f"{config} (LoRA)",
                    steps,
                    mean_sd([r["psnr_degraded"] for r in sel], ".2f"),
                    mean_sd([r["psnr_restored"] for r in sel], ".2f"),
                    mean_sd(gains, "+.2f"),
                    mean_sd([r["ssim_degraded"] for r in sel], ".4f"),
                    mean_sd([r["ssim_restored"] for r in sel], ".4f"),
                    f"{statistics.mean(r['seconds'] for r in sel):.0f}",
                ]
            )
    for name in [k for k in fitted[0] if k not in ("seed", "degraded")]:
        table.append(
            [
                name,
                "",
                mean_sd([b["degraded"] for b in fitted], ".2f"),
                mean_sd([b[name] for b in fitted], ".2f"),
                mean_sd([b[name] - b["degraded"] for b in fitted], "+.2f"),
                "",
                "",
                "",
            ]
        )
    headers = [
        "restorer",
        "steps",
        "PSNR degraded",
        "PSNR restored",
        "gain dB",
        "SSIM degraded",
        "SSIM restored",
        "s/run",
    ]
    print(f"seeds {args.seeds}; fit seconds {args.fit_seconds:g}; machine: {machine_info()}")
    print(md_table(headers, table))
    write_json(args.json, {"rows": rows, "bounds": fitted, "machine": machine_info()})


if __name__ == "__main__":
    main()
