"""`python -m mvtec_seg.export run=<run folder or .ckpt> format=onnx [output=<file>]`: a trained model for
another runtime.

Writes an ONNX graph (dynamic batch axis, fixed spatial size = the run's `data.image_size`, opset
`OPSET`) and `<output>.json` beside it with the input size, the input normalisation, the outputs and the
run's decision threshold. Default output: `<run>/export/model.onnx` (beside a bare checkpoint:
`<checkpoint stem>.onnx`).

- U-Net / DeepLabv3+: input `image` float32 `[N,3,S,S]`, RGB in [0,1], resized to S x S (bilinear) as in
  training; the ImageNet normalisation `(x - mean) / std` is *inside* the graph. Outputs `anomaly_map`
  `[N,S,S]` (probabilities; `>= threshold` is a defect pixel) and `pred_score` `[N]` (its max).
- TransFusion: the graph is the **one-step network** only (inputs `x_t` `[N,3,S,S]` in [-1,1] i.e.
  `2*image - 1`, `prev_mask` `[N,1,S,S]`, `t` int64 `[N]`; outputs `noise`, `mean`, `mask_logits`). The
  reverse process (T-1 calls of it, `reverse_step`, the map `combine`) stays in Python
  (`TransFusionModel.reverse_process` / `combine`); the JSON records its schedule (`betas`) and settings so
  another runtime can reimplement the loop.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from mvtec_seg.cli import command_args, run_command
from mvtec_seg.errors import UserError
from mvtec_seg.inference import Trained, load_trained
from mvtec_seg.io_utils import atomic_write_json
from mvtec_seg.models.segmenter import Segmenter
from mvtec_seg.models.transfusion.lightning_model import TransFusion
from mvtec_seg.settings import folder_problem

log = logging.getLogger(__name__)

FORMATS = ("onnx",)
OPSET = 18


class SegmenterGraph(nn.Module):
    """U-Net / DeepLabv3+ as exported: [0,1] RGB in, probability map and image score out."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        amap = torch.sigmoid(self.net.logits(image))[:, 0]
        return amap, amap.flatten(1).amax(1)


class TransFusionStep(nn.Module):
    """TransFusion's one-step network (the reverse process calls it T-1 times)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x_t: Tensor, prev_mask: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.net(x_t, prev_mask, t)


def export_graph(trained: Trained) -> tuple[nn.Module, tuple[Tensor, ...], list[str], list[str], dict]:
    """The module to export, example inputs, input and output names, and the model part of the JSON."""
    s = trained.image_size
    module = trained.module
    if isinstance(module, Segmenter):
        graph = SegmenterGraph(module.net).eval()
        example = (torch.rand(2, 3, s, s),)
        info = {
            "kind": "segmenter",
            "normalisation": {
                "input": "RGB float32 in [0, 1] (uint8 / 255), resized to image_size x image_size, bilinear",
                "inside_graph": "(x - mean) / std per channel",
                "mean": [float(v) for v in module.net.mean.flatten()],
                "std": [float(v) for v in module.net.std.flatten()],
            },
            "outputs": {
                "anomaly_map": "float32 [N,S,S]: defect probability; a pixel is a defect when >= threshold",
                "pred_score": "float32 [N]: max of anomaly_map; the image is anomalous when >= threshold",
            },
        }
        return graph, example, ["image"], ["anomaly_map", "pred_score"], info
    if isinstance(module, TransFusion):
        tm = module.model
        graph = TransFusionStep(tm.net).eval()
        example = (
            torch.rand(2, 3, s, s) * 2 - 1,
            torch.zeros(2, 1, s, s),
            torch.full((2,), 5, dtype=torch.long),
        )
        info = {
            "kind": "transfusion_one_step",
            "normalisation": {
                "input": "x_t = 2 * image - 1 (image RGB float32 in [0, 1], resized to image_size, bilinear)",
                "inside_graph": "none",
            },
            "outputs": {
                "noise": "float32 [N,3,S,S]: estimate of beta_t * M * e (model space [-1,1])",
                "mean": "float32 [N,3,S,S]: the normal appearance x0 (model space)",
                "mask_logits": "float32 [N,1,S,S]: anomaly mask logits",
            },
            "reverse_process": {
                "where": "Python: mvtec_seg.models.transfusion.torch_model.TransFusionModel.reverse_process "
                "and .combine (not in the graph)",
                "steps": f"t = {tm.num_steps - 1} .. 1, starting from x_t = 2*image-1 and prev_mask = 0; "
                "mask = sigmoid(mask_logits) > 0.5; x_(t-1) = x_t - (b_t-b_(t-1))/b_t * mask * noise "
                "+ (b_t-b_(t-1)) * mask * mean",
                "anomaly_map": "map_weight * box(mean of the step probabilities) + (1 - map_weight) * "
                "box(channel mean of (image - clip((x_1+1)/2, 0, 1))^2), box = smoothing_kernel mean filter",
                "num_steps": tm.num_steps,
                "betas": [float(b) for b in tm.betas],
                "map_weight": tm.map_weight,
                "smoothing_kernel": tm.smoothing_kernel,
            },
        }
        return graph, example, ["x_t", "prev_mask", "t"], ["noise", "mean", "mask_logits"], info
    raise UserError(
        f"{trained.checkpoint}: model {type(module).__name__} has no export — U-Net, DeepLabv3+ and "
        f"TransFusion checkpoints can be exported"
    )


def export_onnx(run: str | Path, output: str | Path | None = None, image_size: int | None = None) -> Path:
    """Export the run's model to ONNX (and the JSON beside it); returns the .onnx path."""
    if image_size is not None and image_size < 1:
        raise UserError(f"image_size={image_size} must be a positive whole number of pixels")
    trained = load_trained(run, image_size)
    if output is None:
        base = trained.run_dir / "export" / "model" if trained.run_dir else trained.checkpoint.with_suffix("")
        output = base.with_suffix(".onnx")
    out = Path(output)
    if out.suffix.lower() != ".onnx":
        raise UserError(f"output={out} must end in .onnx")
    if out.is_dir():
        raise UserError(f"output={out} is a folder — pass output=<file>.onnx")
    problem = folder_problem(out.parent)
    if problem:
        raise UserError(f"output={out}: its folder cannot be made: {problem} — pass another output=")
    out.parent.mkdir(parents=True, exist_ok=True)
    graph, example, inputs, outputs, info = export_graph(trained)
    batch = torch.export.Dim("batch", min=1)
    dynamic = {name: {0: batch} for name in inputs}
    tmp = out.with_name(out.name + ".partial")
    with torch.no_grad():
        torch.onnx.export(
            graph,
            example,
            str(tmp),
            input_names=inputs,
            output_names=outputs,
            dynamic_shapes=dynamic,
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    tmp.replace(out)
    atomic_write_json(
        out.with_suffix(".json"),
        {
            "format": "onnx",
            "opset": OPSET,
            "model": trained.model,
            "checkpoint": str(trained.checkpoint),
            "run_dir": str(trained.run_dir) if trained.run_dir else None,
            "image_size": trained.image_size,
            "inputs": {name: list(t.shape[1:]) for name, t in zip(inputs, example, strict=True)},
            "batch_axis": "dynamic (axis 0 of every input and output)",
            "threshold": trained.threshold,
            **info,
        },
    )
    return out


def _main(cfg: DictConfig) -> int:
    args = command_args(cfg, export_onnx, required=("run",))
    if args["format"] not in FORMATS:
        raise UserError(f"format={args['format']!r} is not supported — use one of {FORMATS}")
    path = export_onnx(args["run"], args["output"], args["image_size"])
    print(f"exported: {path} and {path.with_suffix('.json')}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: returns 0, or 2 with a one-line message on bad input (no traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_command("mvtec_seg.export", __doc__, argv, _main, config_name="export")


if __name__ == "__main__":
    sys.exit(main())
