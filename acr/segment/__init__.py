"""DeepLab on pseudo-labels (or on the ground truth: the upper bound), as a Ray job (ray_jobs/segment.py):

    train_deeplab.py  [1] DeepLab trained with Ray Train on (image, label map) crops, resumable and fault tolerant
    predict.py        [2] each val image single scale, multi-scale + flip, + dense CRF (actor pool); [3] their scores
    job.py            the driver: labels, checks, the stages, summary.json and pictures (a local folder or a URI)
"""
