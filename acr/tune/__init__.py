"""The search job (ray_jobs/tune.py): Ray Tune + Optuna over ACR's training runs.

    job.py  the driver: search space, trials (each a TorchTrainer run in the search's storage), outputs
"""
