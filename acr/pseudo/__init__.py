"""The pseudo-label job (ray_jobs/pseudo_labels.py): CAMs -> dense CRF -> IRN -> masks, as IRN's steps (make_cam,
cam_to_ir_label, train_irn, make_sem_seg_labels), each stage a module of its own:

    make_cams.py     [1] multi-scale + flip CAMs of every image (Ray Data actor pool; the classifier loads once per actor)
    seed_and_crf.py  [2] the seed level's background threshold; [3] the +CRF level and IRN's confident labels (tasks)
    train_irn.py     [4] IRN's class-boundary branch, trained with Ray Train (resumable, fault tolerant)
    make_masks.py    [5] boundary map, random walk and the final masks (actor pool)
    evaluate.py      [6] seed, +CRF and mask mIoU / precision / recall where ground truth exists (Table 3), overlays
    job.py           the driver: the job's config, the stages in order, summary.json

Every stage writes one file per image into the job folder (local or s3://...; acr.runtime.stages) and a rerun
redoes only what is missing.
"""
