"""Supervised segmenters (U-Net, DeepLabv3+) from segmentation-models-pytorch."""

from mvtec_seg.models.segmenter.lightning_model import Segmenter
from mvtec_seg.models.segmenter.torch_model import SegmentationNet

__all__ = ["SegmentationNet", "Segmenter"]
