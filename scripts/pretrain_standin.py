"""Pre-trains the demo's stand-in (kontext_train/app/standin.py) and writes its weights file.

    COMFYUI_PATH=.host/0.33.0/ComfyUI PYTHONPATH=. .host/0.33.0/venv/bin/python scripts/pretrain_standin.py

Defaults are the shipped file's settings (seed 0, 400 steps of batch 8, one thread); the file
records them, the photos and the time it took. Same settings, torch version and thread count give
the same weights.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kontext_train import comfyui  # noqa: E402
from kontext_train.app.standin import ASSET, PretrainSettings, pretrain  # noqa: E402


def main() -> None:
    defaults = PretrainSettings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ASSET)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--threads", type=int, default=defaults.threads)
    args = p.parse_args()
    comfyui.bootstrap_comfyui(cpu=True)
    logging.getLogger().setLevel(logging.WARNING)
    settings = PretrainSettings(
        seed=args.seed, steps=args.steps, batch_size=args.batch_size, threads=args.threads
    )
    meta = pretrain(settings, args.out, log=lambda line: print(line, flush=True))
    print(
        f"wrote {args.out} in {meta['seconds']:.0f} s: loss {meta['loss_first_50']:.4f} -> {meta['loss_last_50']:.4f}"
    )


if __name__ == "__main__":
    main()
