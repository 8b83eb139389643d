"""TransFusion against the official code's outputs (the shared fixture), per precision and reverse mode.

Prints max |ours - official| for the anomaly map, the image score and the intermediates, for the chosen
images. Not a timing benchmark (the network is slow in float64 on a small CPU: use few images).

    .venv/bin/python benchmarks/transfusion_official.py --dtype float32 --images 0 4 --reverse official all_steps
        [--fixture ../shared/reference/transfusion_official] [--tiny] [--out DIR]
        (--tiny: loads the fixture's checkpoint and arrays only, no reverse process; a fixture that is absent
         gives a section saying so; without --tiny an absent fixture is a clean exit, code 0)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from common import bench_parser, md_table, write_section

from mvtec_seg.models.base import parameter_count
from mvtec_seg.models.transfusion import TransFusionModel
from mvtec_seg.models.transfusion.official import infer_official_net

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "transfusion_official"
TERMS = ("mask_disc", "mask_recon", "mask_disc_smoothed", "mask_recon_smoothed", "reconstruction_raw")
FILES = ("model.pkl", "images.npy", "expected.npz")
TITLE = "TransFusion against the official code (shared fixture)"


def tiny_section(args) -> None:
    """Smoke run: the fixture's files, its checkpoint loaded strictly, the arrays' shapes (seconds)."""
    missing = [f for f in FILES if not (args.fixture / f).is_file()]
    if missing:
        rows = [["fixture", f"absent: {', '.join(missing)} not found in `{args.fixture}`"]]
        note = "The fixture is absent on this machine: nothing was compared."
    else:
        state = torch.load(args.fixture / "model.pkl", map_location="cpu", weights_only=True)
        net = ", ".join(f"{k}={v}" for k, v in infer_official_net(state).items())
        model = TransFusionModel.from_official_state(state, image_size=128)  # strict load
        images = np.load(args.fixture / "images.npy")
        expected = np.load(args.fixture / "expected.npz")
        rows = [
            ["fixture", f"present: `{args.fixture}`"],
            ["checkpoint loads strictly", f"yes, {parameter_count(model) / 1e6:.2f} M parameters ({net})"],
            ["images", f"{list(images.shape)} {images.dtype}"],
            ["expected arrays", ", ".join(f"{k} {list(expected[k].shape)}" for k in ("anomaly_map", *TERMS))],
        ]
        note = (
            "Tiny mode loads the fixture only; the reverse process (tens of seconds per 128 px image on a CPU) "
            "is not run, so no differences are reported. Run without `--tiny` for them."
        )
    write_section(args, "transfusion_official", TITLE, md_table(["check", "result"], rows) + f"\n\n{note}")


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--fixture", type=Path, default=FIXTURE)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--images", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--reverse", nargs="+", default=["official", "all_steps"])
    args = parser.parse_args()
    if args.tiny:
        tiny_section(args)
        return
    if not (args.fixture / "model.pkl").is_file():
        print(json.dumps({"skipped": f"{args.fixture / 'model.pkl'} not found"}))
        sys.exit(0)
    expected = np.load(args.fixture / "expected.npz")
    images = torch.from_numpy(np.load(args.fixture / "images.npy"))[args.images]  # official [-1, 1]
    dtype = getattr(torch, args.dtype)
    rows = []
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
        rows.append([mode, args.dtype, *(f"{v:.2g}" for v in row.values())])
    write_section(
        args,
        "transfusion_official",
        TITLE,
        f"Largest |ours - official| over fixture images {args.images} (128 px, the fixture's checkpoint), per "
        "reverse mode:\n\n" + md_table(["reverse", "dtype", "anomaly_map", "image_score", *TERMS], rows),
    )


if __name__ == "__main__":
    main()
