"""TransFusion against the official code's outputs (the shared fixture), per precision and reverse mode.

Prints max |ours - official| for the anomaly map, the image score and the intermediates, for the chosen
images. Not a timing benchmark (the network is slow in float64 on a small CPU: use few images).

    .venv/bin/python benchmarks/transfusion_official.py --dtype float32 --images 0 4 --reverse official all_steps
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from mvtec_seg.models.transfusion import TransFusionModel

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "transfusion_official"
TERMS = ("mask_disc", "mask_recon", "mask_disc_smoothed", "mask_recon_smoothed", "reconstruction_raw")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixture", type=Path, default=FIXTURE)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--images", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--reverse", nargs="+", default=["official", "all_steps"])
    args = parser.parse_args()
    expected = np.load(args.fixture / "expected.npz")
    images = torch.from_numpy(np.load(args.fixture / "images.npy"))[args.images]  # official [-1, 1]
    dtype = getattr(torch, args.dtype)
    for mode in args.reverse:
        model = TransFusionModel.from_official(args.fixture / "model.pkl", image_size=128, reverse=mode)
        out = model.to(dtype).eval().predict(images.to(dtype) / 2 + 0.5, intermediates=True)
        ours = {"anomaly_map": out["anomaly_map"], "image_score": out["pred_score"]} | {
            k: out[k] for k in TERMS
        }
        row = {
            k: float((v.double() - torch.from_numpy(expected[k][args.images])).abs().max())
            for k, v in ours.items()
        }
        print(
            f"{mode} {args.dtype} images {args.images}: " + ", ".join(f"{k} {v:.2g}" for k, v in row.items())
        )


if __name__ == "__main__":
    main()
