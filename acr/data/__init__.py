"""Datasets: the embedded synthetic benchmark, VOC-layout readers, transforms and keyed-randomness datasets."""
