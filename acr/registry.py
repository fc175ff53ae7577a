"""The tables of what can be configured by name: backbones (with the output strides each supports) and dataset
formats. The config's types and rules (acr.config), the network builders (acr.models.backbones) and the dataset
readers (acr.data.shards) are all keyed by these names; each checks at import that it covers the table."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackboneSpec:
    output_strides: tuple[int, ...]
    description: str


BACKBONES: dict[str, BackboneSpec] = {
    "resnet38d": BackboneSpec((8,), "wide ResNet-38 of psa / AffinityNet (ACR's, MXNet .params or converted .pth)"),
    "resnet50": BackboneSpec((8, 16), "torchvision ResNet-50, dilated"),
    "resnet101": BackboneSpec((8, 16), "torchvision ResNet-101, dilated"),
    "resnet18": BackboneSpec((8, 16), "torchvision ResNet-18, dilated (CPU-sized runs)"),
}

DATASET_FORMATS: dict[str, str] = {
    "synthetic": "the embedded dataset, generated in VOC layout on first use",
    "voc": "PASCAL VOC 2012 layout (JPEGImages, SegmentationClass, ImageSets/Segmentation, Annotations)",
    "coco": "MS COCO 2014 (annotations/instances_<split>.json beside <split>/)",
}
