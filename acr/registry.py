"""The tables of what can be configured by name: backbones (with the output strides each supports) and dataset
formats. The config's types and rules (acr.config), the network builders (acr.models.backbones) and the dataset
readers (acr.data.shards) are all keyed by these names; each checks at import that it covers the table."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackboneSpec:
    output_strides: tuple[int, ...]
    description: str
    transformer: bool = False  # a ViT: the classifier is MCTformer-v2 (acr.models.mctformer), the encoder a CNN


BACKBONES: dict[str, BackboneSpec] = {
    "resnet38d": BackboneSpec((8,), "wide ResNet-38 of psa / AffinityNet (ACR's, MXNet .params or converted .pth)"),
    "resnet50": BackboneSpec((8, 16), "torchvision ResNet-50, dilated"),
    "resnet101": BackboneSpec((8, 16), "torchvision ResNet-101, dilated"),
    "resnet18": BackboneSpec((8, 16), "torchvision ResNet-18, dilated (CPU-sized runs)"),
    "deit_tiny": BackboneSpec((16,), "DeiT-Ti/16 as MCTformer-v2 (timm-format weights; CPU-sized runs)", True),
    "deit_small": BackboneSpec((16,), "DeiT-S/16 as MCTformer-v2 (MCTformer's and the ACR paper's ViT)", True),
}

DATASET_FORMATS: dict[str, str] = {
    "synthetic": "the embedded dataset, generated in VOC layout on first use",
    "voc": "PASCAL VOC 2012 layout (JPEGImages, SegmentationClass, ImageSets/Segmentation, Annotations)",
    "coco": "MS COCO 2014 (annotations/instances_<split>.json beside <split>/)",
}
