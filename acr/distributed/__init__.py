"""Ray glue: the per-worker training loop and the TorchTrainer driver."""
