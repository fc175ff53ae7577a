"""ACR training as a Ray job (ray_jobs/train.py):

    worker.py    the per-worker training function: build, restore, train_one_epoch, evaluate (the CAMs)
    evaluate.py  CAM scoring on the eval split inside the workers (each a strided share, confusions summed)
    job.py       the driver: shards, the training stream, the TorchTrainer, summary.json and pictures
"""
