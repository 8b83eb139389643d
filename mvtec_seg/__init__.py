"""mvtec_seg: TransFusion, pseudo masks and segmenters on MVTec-style data, scored on one split."""

from mvtec_seg.precision import register_resolvers

register_resolvers()  # before any config is composed: trainer/cpu.yaml asks ${cpu_precision:}
