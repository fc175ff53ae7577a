"""The runtime under every Ray job: starting or joining Ray (cluster), the one TorchTrainer builder (trainer), the
checkpoint contract and the worker's session (session), the resumable training loop of the batch jobs' networks
(loop), the per-image Ray Data stage runner (stages), the error boundary (boundary) and logging (logs). It knows the
config tree and the storage, nothing of ACR's method."""
