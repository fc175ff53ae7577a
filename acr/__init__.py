"""ACR: weakly supervised semantic segmentation by adversarial learning of a classifier and a reconstructor."""
