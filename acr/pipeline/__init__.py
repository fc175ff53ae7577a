"""The whole pipeline as one job (ray_jobs/pipeline.py): classifier -> pseudo-labels -> DeepLab -> DeepLab on the
ground truth -> report.

    job.py  the driver: each stage in its folder through the single jobs' library functions, skip and resume, report
"""
