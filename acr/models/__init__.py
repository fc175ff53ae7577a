"""Networks: backbones, the classifier with its CAM head, the reconstructor (encoder taps + U-Net decoder)."""
