"""One typed configuration tree for every job.

A config is built from (1) the dataclass defaults below, (2) a YAML file, (3) dotted ``key=value`` overrides from the
command line, applied in that order. Unknown keys and values of the wrong type raise :class:`ConfigError` naming the
key. Nothing here reads the environment or the file system except the YAML file it is asked to load.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from acr.errors import ConfigError
from acr.registry import BACKBONES, DATASET_FORMATS

# The names a config may give (acr.registry's tables).
BackboneName = Literal[tuple(BACKBONES)]
CNNBackboneName = Literal[tuple(n for n, s in BACKBONES.items() if not s.transformer)]
DatasetFormat = Literal[tuple(DATASET_FORMATS)]



# --------------------------------------------------------------------------------------------------------------------
# The tree


@dataclass
class SyntheticConfig:
    """The embedded dataset (see :mod:`acr.data.synthetic`)."""

    num_classes: int = 6
    image_size: int = 128
    train_images: int = 320
    val_images: int = 96
    seed: int = 0
    # Classes (by 0-based index) that usually appear with a typical background context ("boat on water").
    context_classes: list[int] = field(default_factory=lambda: [0, 1])
    context_probability: float = 0.9
    max_objects: int = 2


@dataclass
class DataConfig:
    # Where the images come from. Training always reads Parquet shards (acr.data.shards): `data.shards` names prepared
    # ones (a folder or an s3:// URI with manifest.json); otherwise the `format` folder at `root` is converted first,
    # into `cache_dir` (reused while the source is unchanged).
    format: DatasetFormat = "synthetic"
    # Dataset root. For `synthetic` it may stay null: the dataset is generated into cache_dir and reused.
    root: str | None = None
    # Prepared shards (ray_jobs/prepare_data.py output: a folder or URI holding manifest.json). Overrides format/root.
    shards: str | None = None
    # Where generated datasets and converted shards go; never inside `root`. null = $ACR_CACHE or ~/.cache/acr.
    cache_dir: str | None = None
    train_split: str = "train"
    # Image-level labels for VOC: `auto` (labels file if given, else XML, else masks), `xml`, `masks`, `file`.
    labels: Literal["auto", "xml", "masks", "file"] = "auto"
    # A JSON {id: [class ids 1..C]} or .npy (psa/IRN cls_labels.npy, {id: multi-hot}) labels file.
    labels_file: str | None = None
    num_classes: int = 20
    # COCO crowd annotations (iscrowd=1) in the semantic masks: `ignore` paints them 255 (under the non-crowd objects),
    # `class` paints them as their class. Their classes count as image-level labels either way.
    coco_crowd: Literal["ignore", "class"] = "ignore"
    # Rows (images) per Parquet shard file.
    shard_rows: int = 256
    # A row whose bytes do not decode (or a source image that does not): false = stop with an error naming the shard
    # and row id; true = skip it, count it, and report the count in summary.json.
    skip_corrupt: bool = False
    # Ray Data actors that read, decode and augment training images, and the CPUs each reserves.
    decode_actors: int = 1
    decode_cpus: float = 1.0
    # Batches each training worker prefetches from Ray Data (decoded, augmented).
    prefetch_batches: int = 2


@dataclass
class AugmentConfig:
    # `long_side`: the long side is drawn uniformly from resize_range (pixels; the released code, 384-512).
    # `scale`: the image is rescaled by a factor drawn from resize_range (the paper, 0.5-1.3).
    resize_mode: Literal["long_side", "scale"] = "long_side"
    resize_range: list[float] = field(default_factory=lambda: [384.0, 512.0])
    crop_size: int = 256
    flip: bool = True


@dataclass
class ViTConfig:
    """The ViT classifier (model.backbone deit_tiny | deit_small): MCTformer-v2 (acr/models/mctformer.py). Values
    from MCTformer's code (github.com/xulianuwa/MCTformer, commit 355a4aa: main.py, run.sh, models.py)."""

    # The map ACR decomposes into A_t in training (it must carry the classifier's gradient): `patchcam` (the conv
    # head on the patch tokens, trained by global average pooling like the ResNet CAM), `fused` (class-to-patch
    # attention x ReLU(PatchCAM), both with gradient), `class_attention`. The ACR paper does not say which it used.
    train_cam: Literal["patchcam", "fused", "class_attention"] = "patchcam"
    # The map of inference (CAM evaluation, pseudo-labels): run.sh `--attention-type fused`.
    cam: Literal["patchcam", "fused", "class_attention"] = "fused"
    # Class-to-patch attention summed over the last this many blocks: run.sh `--layer-index 3`.
    attention_layers: int = 3
    # Refine the map of inference by the patch-to-patch attention of all blocks: run.sh `--patch-attn-refine`.
    affinity_refine: bool = True
    # Stochastic depth rate (the last block's; linear from 0): main.py `--drop-path 0.1`.
    drop_path: float = 0.1
    # The reconstructor's encoder G_E: `cnn`, the CNN encoder_backbone with its own weights (a file, `standin` or
    # null); `vit_blocks`, a DeiT of the classifier's size (one class token) whose blocks' patch tokens, reshaped to
    # maps, are its taps (`model.encoder_taps`: block1..block12, final), from the classifier's model.pretrained file.
    # The ACR paper does not say; its released encoder is a CNN.
    encoder: Literal["cnn", "vit_blocks"] = "cnn"
    encoder_backbone: CNNBackboneName = "resnet38d"
    encoder_pretrained: str | None = None


@dataclass
class ModelConfig:
    backbone: BackboneName = "resnet38d"
    output_stride: Literal[8, 16] = 8
    # ImageNet weights: a torchvision state dict (.pth) for resnets; an MXNet `.params` or converted `.pth` for
    # resnet38d. null = random init. Never downloaded. `standin`: the project's stand-in (the backbone pre-trained on
    # other synthetic images, made on first use and cached: acr/train/standin.py), the embedded demo's default.
    pretrained: str | None = None
    # `two_layer`: 1x1 conv -> ReLU -> 1x1 conv (the released code); `linear`: one 1x1 conv (the paper).
    cam_head: Literal["two_layer", "linear"] = "two_layer"
    cam_head_hidden: int = 256
    freeze_bn: bool = True
    # Without pretrained weights, frozen BN would be the identity: its statistics are first estimated from this many
    # training images (the same ones on every worker). 0 keeps the default statistics.
    bn_calibration_images: int = 64
    # Switches every Dropout/Dropout2d off (deterministic tests); the rates are the released code's.
    dropout: bool = True
    # Encoder taps: backbone stages whose outputs are projected and concatenated into X (see models/backbones.py).
    encoder_taps: list[str] = field(default_factory=lambda: ["stage4", "stage5", "final"])
    encoder_tap_channels: list[int] = field(default_factory=lambda: [64, 128, 256])
    # pix2pix U-Net: `decoder_depth` stride-2 levels, so the crop side must be a multiple of 2**decoder_depth.
    decoder_depth: int = 8
    decoder_width: int = 64
    vit: ViTConfig = field(default_factory=ViTConfig)


@dataclass
class SRFConfig:
    """Stochastic Remnant Feeding (paper Sec. 4.2.2, Eq. 8-10)."""

    enabled: bool = True
    grid_size: int = 16
    # q = probability that a grid cell carries a remnant. `fixed`: q_start always (the paper);
    # `per_epoch`: q = clip(q_start + q_per_epoch * epoch, 0, 1) (the released code: 0.80 - 0.01 * epoch).
    q_schedule: Literal["fixed", "per_epoch"] = "per_epoch"
    q_start: float = 0.8
    q_per_epoch: float = -0.01


@dataclass
class MethodConfig:
    # `adversarial`: ACR. `pretrained`: the reconstructor is loaded from `pretrained_reconstructor` and frozen
    # (paper Table 1). `none`: classification only (the baseline).
    reconstructor: Literal["adversarial", "pretrained", "none"] = "adversarial"
    pretrained_reconstructor: str | None = None
    # Start the classifier from this checkpoint's classifier (e.g. a baseline run) instead of ImageNet weights.
    init_classifier: str | None = None
    # false: skip the CU phase, i.e. train only the reconstructor against the frozen classifier (paper Sec. 5.3,
    # the first half of the "pre-trained" ablation).
    train_classifier: bool = True
    # `image`: A_t and X are upsampled to the crop and multiplied there (released code);
    # `feature`: Eq. 3 at the feature resolution h x w, the masked features are upsampled for the decoder (paper).
    decompose_at: Literal["image", "feature"] = "image"
    # `normalized`: the ImageNet-normalised input (released code); `unit_range`: the image in [0, 1] (paper).
    reconstruction_target: Literal["normalized", "unit_range"] = "normalized"
    # `tensor_size`: mean over B*3*H*W (released code); `mask_area`: per image, sum / (3 * mask area) (paper's |.|_1
    # read as a masked mean), then mean over the batch.
    l1_normalization: Literal["tensor_size", "mask_area"] = "tensor_size"
    srf: SRFConfig = field(default_factory=SRFConfig)
    # Eq. 7 weights. The released code hard-codes 0.5 (target-region recon) and 0.3 (non-target-region recon).
    ru_target_weight: float = 0.5
    ru_nontarget_weight: float = 0.3
    # Eq. 14 weights; 0 switches a term off (and skips its decoder pass): paper Table 2.
    cu_target_weight: float = 0.8
    cu_nontarget_weight: float = 0.3
    # V_t^CU: `soft` = 1 - A_t (paper) or `zero_cam` = 1[A_t == 0] (released code).
    cu_target_mask: Literal["soft", "zero_cam"] = "zero_cam"
    # V_nt^CU: `cam` = A_t (paper) or `cam_where_top` = A_t * 1[argmax_c CAM = t] (released code).
    cu_nontarget_mask: Literal["cam", "cam_where_top"] = "cam_where_top"
    # Released-code terms not in the paper: encoder classification BCE and decoder-only auto-encoding L1.
    encoder_cls_weight: float = 1.0
    autoencode_weight: float = 0.2
    # false: the auto-encoding term trains the decoder only (X detached, released code); true: it trains the encoder
    # too, so that X carries the image from the start (a classification backbone's features, projected by freshly
    # initialised 1x1 taps, do not: at a short budget the masked terms alone never make them informative).
    autoencode_trains_encoder: bool = False
    # Released code: the RU non-target-region term ignores images whose input mask has <= this many pixels.
    min_valid_pixels: int = 50
    # Classifier steps that use L_cls alone while the reconstructor already trains (RU every step): the CU
    # reconstruction terms start once the adversary has learnt something. 0 = from the first step (released code,
    # the paper).
    adversarial_warmup_steps: int = 0


@dataclass
class OptimConfig:
    lr: float = 0.01
    weight_decay: float = 5e-4
    momentum: float = 0.9
    # The released code passes weight_decay into SGD's momentum slot (momentum = 5e-4). true reproduces that.
    momentum_equals_weight_decay: bool = False
    # `layer_type`: conv weights 1x, conv biases 2x (no decay), deconv weights 10x, deconv biases 20x (released code);
    # `uniform`: every parameter at lr (the paper states no multipliers).
    lr_multipliers: Literal["layer_type", "uniform"] = "layer_type"
    poly_power: float = 0.9
    # Length of the schedule in epochs (null = train.epochs). The released code: 40, while it trains 100.
    schedule_epochs: int | None = None
    # The learning-rate schedule of both ACR networks: `poly` (the released code's, poly_power) or `cosine_warmup`
    # (MCTformer's, main.py: timm's cosine scheduler, `--warmup-epochs 5` linear from `--warmup-lr 1e-6`, floor
    # `--min-lr 1e-5`; here per step and as fractions of optim.lr, applied to the reconstructor's lr too).
    lr_schedule: Literal["poly", "cosine_warmup"] = "poly"
    warmup_epochs: float = 5.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    # The reconstructor's optimiser. `sgd`: as the classifier's (the released code, both PolyOptimizer SGD).
    # `adam`: Adam(betas=adam_betas) at reconstructor_lr with the same poly decay and no per-layer multipliers
    # (pix2pix trains this U-Net with Adam 2e-4, betas (0.5, 0.999)); an SGD-trained U-Net from scratch needs far
    # more steps than a CPU budget gives before it reconstructs better than the mean colour.
    reconstructor_optimizer: Literal["sgd", "adam"] = "sgd"
    # The classifier's optimiser. `sgd`: the released code's (above). `adamw`: AdamW at `lr` with
    # `adamw_weight_decay`, none on biases, norms, tokens and position embedding: the ViT's (MCTformer main.py:
    # timm's create_optimizer, adamw, weight decay 0.05, lr 5e-4 x batch / 512, decayed by a cosine with 5
    # warm-up epochs: lr_schedule cosine_warmup).
    classifier_optimizer: Literal["sgd", "adamw"] = "sgd"
    adamw_weight_decay: float = 0.05
    reconstructor_lr: float | None = None  # null: `lr`
    adam_betas: list[float] = field(default_factory=lambda: [0.5, 0.999])


@dataclass
class TrainConfig:
    epochs: int = 40
    # The global batch, divided evenly among the workers.
    batch_size: int = 8
    seed: int = 4242
    # Stop an epoch after this many steps (null = the whole epoch); for smoke tests and benchmarks.
    max_steps_per_epoch: int | None = None
    # A checkpoint is written after every epoch, and also every this many steps within an epoch (null = only per
    # epoch): what a failed worker or an interrupted run loses at most. Each holds both networks, both optimisers,
    # the step counters (LR and SRF schedules) and every worker's RNG state.
    checkpoint_every_steps: int | None = None
    # Progress line from rank 0 every this many steps (0 = only per epoch).
    log_every_steps: int = 10
    # Checkpoints kept in the run folder (the newest; older ones are deleted): Ray Train's CheckpointConfig(num_to_keep).
    keep_checkpoints: int = 2
    # Compute threads per worker (null = torch's default).
    threads_per_worker: int | None = None
    # `auto`: bf16 autocast on CUDA, fp32 on the CPU. `bf16`: autocast to bfloat16 on any device. `bf16_where_fast`:
    # bf16 autocast where the device has fast bf16 kernels (CUDA, or a CPU with oneDNN's AVX512-BF16 / AMX ones),
    # fp32 elsewhere (the demo configs: same CAM mIoU as fp32 in BENCHMARKS.md's ablations). `fp64`: everything in
    # float64, for numerical checks (max-normalised CAMs with a tiny range amplify float32 rounding noise).
    precision: Literal["auto", "fp32", "bf16", "bf16_where_fast", "fp64"] = "auto"
    # Networks and images in NHWC memory layout (torch.channels_last): oneDNN's fast convolution path on CPUs, tensor
    # cores on GPUs. The same computation as NCHW, in another summation order.
    channels_last: bool = True
    # Run the classifier's trunk (every block before its first dropout) once per iteration: the RU phase computes it
    # with gradient and the CU phase reuses it, instead of running it twice with the same weights on the same images.
    # Applies with model.freeze_bn (the trunk is then the same in train and eval mode); holds the trunk's activations
    # through the RU phase (more peak memory). The same numbers either way (tests/test_phases.py).
    share_classifier_trunk: bool = True
    # A non-finite loss skips that optimiser step (released code); one more than this many in a row stops the run
    # with an error, keeping the last good checkpoint (0 = stop at the first).
    max_consecutive_nonfinite: int = 10


@dataclass
class EvalConfig:
    enabled: bool = True
    # The split whose CAM scores are reported (it must have masks; the VOC presets use train, as the paper's tables;
    # a search selects its trials on tune.select_split, which must be another split).
    split: str = "val"
    scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0])
    flip: bool = True
    # Background threshold sweep: start, stop (inclusive), step. The whole useful range by default (the sweep costs
    # one pass over the pixels whatever its length); a best value at either end is flagged (`threshold_at_edge`).
    thresholds: list[float] = field(default_factory=lambda: [0.01, 0.99, 0.01])
    max_images: int | None = None
    overlays: int = 8
    # Also score the CAMs after every epoch (reported with the epoch's metrics; what Tune's scheduler reads).
    every_epoch: bool = False


@dataclass
class TuneConfig:
    """ray_jobs/tune.py: Ray Tune + Optuna (TPE) over a search space file (search_spaces/)."""

    num_samples: int = 4
    # Trials at the same time, each a TorchTrainer with scaling.num_workers workers (null: as many as the cluster's
    # CPUs, and GPUs where used, hold; a locally started Ray is sized for one).
    max_concurrent: int | None = None
    # Trials are scored (CAM mIoU per epoch) on this split, whose pixel labels are used for the selection; the best
    # trial is then scored on eval.split, which must be a different split, and that is the number to report.
    select_split: str = "train"
    select_max_images: int | None = 64
    seed: int = 0
    # Asynchronous successive halving: stop trials whose CAM mIoU is in the lower part at an epoch milestone.
    asha: bool = True
    grace_period: int = 1
    reduction_factor: int = 2
    # The Optuna study: a SQLAlchemy URL (null = sqlite:///<output-dir>/study.db), openable with optuna-dashboard.
    storage: str | None = None
    study_name: str = "acr"
    # CPU reserved for each trial's driver (the function that starts its TorchTrainer); must be > 0.
    trial_cpus: float = 0.1


@dataclass
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # Worker restarts from the last checkpoint after a failure (Ray Train FailureConfig; -1 = unlimited).
    max_failures: int = 0


@dataclass
class RayConfig:
    # null: join the cluster named by RAY_ADDRESS if set, else start a local one.
    address: str | None = None
    # Logical CPUs of a locally started Ray (null = detected).
    num_cpus: int | None = None
    include_dashboard: bool = False  # a Tune search starts it regardless (Train needs its state API there)
    # Local folders that every node of the cluster mounts at the same path (EFS, NFS). On a cluster of several nodes
    # any other local path is on the driver's machine only: output folders there are refused, and the weights and
    # shards the workers read are copied into the run's storage.
    shared_dirs: list[str] = field(default_factory=list)


@dataclass
class PseudoConfig:
    """The pseudo-label job (ray_jobs/pseudo_labels.py): CAMs -> dense CRF -> IRN -> masks. Defaults are IRN's
    (jiwoon-ahn/irn run_sample.py) unless named otherwise."""
    # A checkpoint folder or state.pt, a train.py output folder (its summary.json names the checkpoint) or a tune.py
    # output folder (its best trial's checkpoint). The job runs with that checkpoint's config plus the overrides.
    checkpoint: str | None = None
    split: str = "train"  # the images to label (train_aug for DeepLab on VOC)
    max_images: int | None = None
    scales: list[float] = field(default_factory=lambda: [1.0, 0.5, 1.5, 2.0])  # IRN make_cam
    flip: bool = True
    # Background threshold of the seed and +CRF levels (null: the best of eval.thresholds on the ground truth of
    # the labelled images, which the summary says; needed explicitly where no ground truth exists).
    seed_threshold: float | None = None
    crf: str = "psa"  # the +CRF level's parameters (acr.refine.crf.CRF_PRESETS: psa, afa, deeplab)
    # IRN's confident foreground: CAM above this (IRN cam_to_ir_label 0.30, RIB: 0.35; null: the seed threshold, but
    # not below conf_bg_threshold, for CAMs whose background sits higher than VOC's; summary.json records the value).
    conf_fg_threshold: float | None = 0.30
    conf_bg_threshold: float = 0.05  # IRN (RIB: 0.17)
    irn_radius: int = 10  # IRN PathIndex radius for training pairs (at stride 4)
    irn_crop_size: int = 512
    irn_resize_range: list[float] = field(default_factory=lambda: [0.5, 1.5])
    irn_batch_size: int = 32
    irn_epochs: int = 3
    irn_lr: float = 0.1
    irn_weight_decay: float = 1e-4
    irn_width: int = 32
    # The frozen CNN under IRN's boundary branch, from the checkpoint: `classifier` (the classifier's backbone, this
    # project's choice for a CNN classifier), `encoder` (the reconstructor's encoder G_E, a CNN trained by the RU
    # phase), `pretrained` (the CNN built from the ImageNet weights file the run started from: IRN's own choice, an
    # ImageNet ResNet-50); `auto`: classifier for a CNN classifier, for a ViT one (MCTformer-v2 has no stride-4
    # features) encoder, or pretrained where the run had no reconstructor (acr.checkpoint.checkpoint_backbone).
    irn_backbone: Literal["auto", "classifier", "encoder", "pretrained"] = "auto"
    # IRN's own Ray Train scaling: workers (null: scaling.num_workers); a checkpoint every this many steps besides
    # the one after every epoch (null: per epoch only), what a lost worker or driver costs at most.
    irn_num_workers: int | None = None
    irn_checkpoint_every_steps: int | None = None
    beta: float = 10.0  # IRN make_sem_seg_labels
    exp_times: int = 8  # 2**exp_times random-walk steps
    walk_radius: int = 5
    cam_power: float = 1.0  # CAMs**power before the walk (RIB: 1.3)
    # The mask's background: where no walked CAM (divided by the maximum) reaches this (IRN: 0.25, RIB: 0.27;
    # null: the seed level's threshold, which is chosen on the ground truth where pseudo.seed_threshold is null).
    sem_seg_bg_threshold: float | None = 0.25
    # The walked scores refined by the dense CRF of the +CRF level (pseudo.crf) before the argmax (IRN: no CRF): the
    # walk runs on a stride-4 grid, so its mask's edges are 4-pixel steps that the CRF snaps to the image's edges.
    mask_crf: bool = False
    actors: int = 2  # CAM / mask actor pool size (each holds its model once)
    actor_cpus: float = 1.0
    overlays: int = 6


@dataclass
class SegmentConfig:
    """ray_jobs/segment.py: DeepLab trained on pseudo-labels (or on the ground truth: the upper bound), evaluated on
    `val_split` single scale, multi-scale + flip, and + dense CRF. Defaults are the paper's (DeepLab-v2 head on
    ResNet-38, lr 0.001) and deeplab-pytorch's voc12.yaml where the paper is silent."""
    # A folder of <id>.png label maps (0 background, c+1 class c, 255 ignore; palette or grey PNGs): a pseudo-label
    # job's folder (its masks/ are read, and its config and split are used) or any such folder. `gt`: the split's
    # ground-truth masks, for the fully supervised upper bound.
    labels: str | None = None
    split: str = "train"  # the training images (VOC: train_aug)
    val_split: str = "val"
    max_images: int | None = None
    max_val_images: int | None = None
    # `aspp_v2`: DeepLab-v2's ASPP (3x3 convs at rates 6/12/18/24 to class scores, summed), the paper's DeepLab on
    # ResNet-38. `aspp_v3`: torchvision's DeepLabV3 head (ASPP with image pooling, 256 channels).
    head: Literal["aspp_v2", "aspp_v3"] = "aspp_v2"
    backbone: BackboneName = "resnet38d"
    output_stride: Literal[8, 16] = 8
    # ImageNet weights for the backbone (a file, as model.pretrained, or `standin`); never downloaded.
    pretrained: str | None = None
    # Or the backbone of an ACR classifier (a checkpoint, train.py or tune.py folder; it was trained with image-level
    # labels only). Used by the pipeline on the embedded dataset, where no ImageNet weights exist.
    init_backbone: str | None = None
    freeze_bn: bool = True  # backbone BatchNorm in eval mode (deeplab-pytorch); the head's trains
    epochs: int = 30
    max_steps_per_epoch: int | None = None
    batch_size: int = 10
    lr: float = 0.001  # the paper (Sec. 5.1)
    head_lr_multiplier: float = 10.0  # deeplab-pytorch: the ASPP at 10x
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    crop_size: int = 321
    scale_range: list[float] = field(default_factory=lambda: [0.5, 1.5])
    flip: bool = True
    eval_scales: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5])
    eval_flip: bool = True
    crf: str = "deeplab"  # acr.refine.crf.CRF_PRESETS
    # DeepLab's own Ray Train scaling: workers (null: scaling.num_workers; segment.batch_size must divide among
    # them); a checkpoint every this many steps besides the one after every epoch (null: per epoch only).
    num_workers: int | None = None
    checkpoint_every_steps: int | None = None
    actors: int = 2  # prediction actor pool size
    actor_cpus: float = 1.0  # per prediction actor and per training-crop task
    overlays: int = 6


@dataclass
class PipelineConfig:
    """ray_jobs/pipeline.py: [1] CAMs (Tune search, or one training run) -> [2] pseudo-labels -> [3] DeepLab on them
    -> [4] DeepLab on the ground truth (upper bound) -> report. A stage whose folder holds its summary.json is
    skipped; a stage that was interrupted resumes from its own files."""
    # Skip stage 1: an ACR checkpoint, train.py or tune.py folder.
    checkpoint: str | None = None
    # Stage 1 is a Tune search (tune.*, pipeline.space); false: one training run with this config.
    search: bool = True
    # The search space file (null: search_spaces/demo.yaml of this checkout).
    space: str | None = None
    # Skip stage 2: a folder of <id>.png pseudo-labels (or a pseudo-label job's folder).
    labels: str | None = None
    # Stage 4: DeepLab on the ground-truth masks of segment.split too (only where every image has one).
    upper_bound: bool = True
    # Without segment.pretrained / segment.init_backbone, start DeepLab's backbone from the stage-1 classifier's.
    init_segmentation_from_classifier: bool = True


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


# --------------------------------------------------------------------------------------------------------------------
# Building and validating


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints are accepted where floats are expected)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool) != any(isinstance(a, bool) for a in allowed if a == value):
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of sub-keys, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{key}: {value} is beyond the range of a float") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")  # pragma: no cover - a bug in this file


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"unknown config key '{where}' (known under '{prefix or '<root>'}': {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], f"{prefix}.{f.name}" if prefix else f.name)
    return cls(**kwargs)


def config_from_dict(data: dict, job: str | None = None) -> Config:
    """Rebuild a Config from `to_dict` output (e.g. inside a Ray worker): keys and types are checked; with `job`
    also that job's rules (a worker's config was validated by its job's driver)."""
    cfg = _build(Config, data)
    if job is not None:
        validate(cfg, job)
    return cfg


def to_dict(cfg: Any) -> dict:
    """The config as plain YAML-able data."""
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            raise ConfigError(f"unknown config key '{key}': '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """`a.b=value` strings -> (key, value); values are parsed as YAML (`1e-3`, `[1, 2]`, `null`, `true`)."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key}: cannot parse value {raw!r}: {exc}") from exc
        out.append((key, value))
    return out


def _read_yaml(path: Path, reference: dict, seen: tuple = ()) -> dict:
    """A config file as a tree; a top-level `base: FILE` (relative to this file) is read first and this file's keys
    are merged onto it. Unknown keys are errors naming the file."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file ({exc})") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc})") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = loaded.pop("base", None)
    _check_keys(loaded, reference, "", str(path))
    if base is None:
        return loaded
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a config file name, got {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in seen or base_path == path.resolve():
        raise ConfigError(f"{path}: 'base: {base}' makes a cycle")
    tree = _read_yaml(base_path, reference, seen + (path.resolve(),))
    _merge(tree, loaded)
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                job: str | None = "train") -> Config:
    """Defaults <- YAML file (and the files it names as `base`) <- `key=value` overrides, validated for `job`
    (None: keys and types only)."""
    tree = to_dict(Config())
    if path is not None:
        _merge(tree, _read_yaml(Path(path), tree))
    for key, value in parse_overrides(overrides or []):
        _check_keys({key: value}, tree, "", "command line", dotted=True)
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree)
    if job is not None:
        validate(cfg, job)
    return cfg


def _check_keys(given: dict, reference: dict, prefix: str, source: str, dotted: bool = False) -> None:
    for k, v in given.items():
        parts = k.split(".") if dotted else [k]
        node = reference
        path = prefix
        for p in parts:
            path = f"{path}.{p}" if path else p
            if not isinstance(node, dict) or p not in node:
                raise ConfigError(f"unknown config key '{path}' (from {source})")
            node = node[p]
        if isinstance(v, dict) and isinstance(node, dict):
            _check_keys(v, node, path, source)


def _merge(base: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


# --------------------------------------------------------------------------------------------------------------------
# Validation per job: each job checks the sections it uses (plus the shared scaling / ray / numerics rules), so that
# a setting of one job never stops another. A rule set is a function that calls `need(condition, message)`.


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _need_stride(section: str, backbone: str, stride: int) -> None:
    strides = BACKBONES[backbone].output_strides
    _need(stride in strides, f"{section}.backbone={backbone} has output stride {' or '.join(map(str, strides))} only, "
          f"got {section}.output_stride={stride}")


def _scaling_rules(cfg: Config) -> None:
    s = cfg.scaling
    _need(s.num_workers >= 1, f"scaling.num_workers must be >= 1, got {s.num_workers}")
    _need(s.cpus_per_worker > 0, f"scaling.cpus_per_worker must be > 0, got {s.cpus_per_worker}")
    _need(s.max_failures >= -1, f"scaling.max_failures must be >= 0, or -1 (unlimited), got {s.max_failures}")
    _need(cfg.ray.num_cpus is None or cfg.ray.num_cpus >= 1, f"ray.num_cpus must be >= 1 or null, got {cfg.ray.num_cpus}")
    _need(cfg.train.max_consecutive_nonfinite >= 0, "train.max_consecutive_nonfinite must be >= 0 (0 = stop at the "
          f"first), got {cfg.train.max_consecutive_nonfinite}")


def _data_rules(cfg: Config) -> None:
    d = cfg.data
    if d.format == "synthetic":
        _need(cfg.synthetic.num_classes >= 2, "synthetic.num_classes must be >= 2")
        _need(all(0 <= c < cfg.synthetic.num_classes for c in cfg.synthetic.context_classes),
              f"synthetic.context_classes {cfg.synthetic.context_classes} must be class indices "
              f"< synthetic.num_classes={cfg.synthetic.num_classes}")
    elif d.shards is None:
        _need(d.root is not None, f"data.format={d.format} needs data.root (or data.shards)")
    _need(d.shard_rows >= 1, f"data.shard_rows must be >= 1, got {d.shard_rows}")
    _need(d.decode_actors >= 1, f"data.decode_actors must be >= 1, got {d.decode_actors}")
    _need(d.decode_cpus > 0, f"data.decode_cpus must be > 0, got {d.decode_cpus}")
    _need(d.prefetch_batches >= 0, f"data.prefetch_batches must be >= 0, got {d.prefetch_batches}")
    _need(d.labels != "file" or d.labels_file, "data.labels=file needs data.labels_file")


def _vit_rules(cfg: Config) -> None:
    """model.vit, for a ViT classifier."""
    m, v = cfg.model, cfg.model.vit
    if not BACKBONES[m.backbone].transformer:
        _need(v.encoder == "cnn", f"model.vit.encoder={v.encoder} takes the encoder's taps from a ViT: it needs a ViT "
              f"model.backbone (deit_tiny, deit_small), got {m.backbone}")
        return
    blocks = [f"block{i}" for i in range(1, 13)] + ["final"]
    bad = [t for t in m.encoder_taps if t not in blocks]
    _need(v.encoder == "cnn" or not bad, f"model.vit.encoder=vit_blocks: model.encoder_taps {bad} are not ViT taps "
          "(block1..block12 or final; e.g. model.encoder_taps=[block4,block8,final])")
    _need(cfg.augment.crop_size % m.output_stride == 0, f"augment.crop_size={cfg.augment.crop_size} must be a "
          f"multiple of {m.backbone}'s patch size {m.output_stride}")
    _need(1 <= v.attention_layers <= 12, f"model.vit.attention_layers must be in 1..12 (the blocks of "
          f"{m.backbone}), got {v.attention_layers}")
    _need(0.0 <= v.drop_path < 1.0, f"model.vit.drop_path must be in [0, 1), got {v.drop_path}")


def _network_rules(cfg: Config) -> None:
    """model, augment and method: what the two networks and the step can be built with."""
    m, a, srf = cfg.model, cfg.augment, cfg.method.srf
    _need(2 <= m.decoder_depth <= 12, f"model.decoder_depth must be in 2..12, got {m.decoder_depth}")
    _need(len(m.encoder_taps) == len(m.encoder_tap_channels) and m.encoder_taps,
          "model.encoder_taps and model.encoder_tap_channels must be non-empty lists of the same length")
    _need_stride("model", m.backbone, m.output_stride)
    _vit_rules(cfg)
    _need(a.crop_size >= 1, f"augment.crop_size must be >= 1, got {a.crop_size}")
    _need(len(a.resize_range) == 2 and 0 < a.resize_range[0] <= a.resize_range[1],
          f"augment.resize_range must be [low, high] with 0 < low <= high, got {a.resize_range}")
    side = 2 ** m.decoder_depth
    _need(cfg.method.reconstructor == "none" or a.crop_size % side == 0,
          f"augment.crop_size={a.crop_size} must be a multiple of 2**model.decoder_depth={side} (the U-Net halves the "
          "side decoder_depth times)")
    _need(srf.grid_size >= 1 and a.crop_size % srf.grid_size == 0,
          f"method.srf.grid_size={srf.grid_size} must divide augment.crop_size={a.crop_size}")
    _need(0.0 <= srf.q_start <= 1.0, f"method.srf.q_start must be in [0, 1], got {srf.q_start}")
    _need(cfg.method.adversarial_warmup_steps >= 0,
          f"method.adversarial_warmup_steps must be >= 0, got {cfg.method.adversarial_warmup_steps}")
    _need(cfg.method.reconstructor != "pretrained" or cfg.method.pretrained_reconstructor,
          "method.reconstructor=pretrained needs method.pretrained_reconstructor (a checkpoint path)")
    _need(cfg.method.train_classifier or cfg.method.reconstructor == "adversarial",
          "method.train_classifier=false trains only the reconstructor: it needs method.reconstructor=adversarial")


def _train_rules(cfg: Config) -> None:
    """train and optim: the ACR training loop."""
    tr, o = cfg.train, cfg.optim
    _need(tr.epochs >= 1, f"train.epochs must be >= 1, got {tr.epochs}")
    _need(tr.batch_size >= 1, f"train.batch_size must be >= 1, got {tr.batch_size}")
    _need(tr.batch_size % cfg.scaling.num_workers == 0, f"train.batch_size={tr.batch_size} (the global batch) must "
          f"divide evenly among scaling.num_workers={cfg.scaling.num_workers}")
    _need(tr.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {tr.keep_checkpoints}")
    _need(tr.checkpoint_every_steps is None or tr.checkpoint_every_steps >= 1,
          f"train.checkpoint_every_steps must be >= 1 or null, got {tr.checkpoint_every_steps}")
    _need(tr.max_steps_per_epoch is None or tr.max_steps_per_epoch >= 1,
          f"train.max_steps_per_epoch must be >= 1 or null, got {tr.max_steps_per_epoch}")
    _need(tr.log_every_steps >= 0, f"train.log_every_steps must be >= 0, got {tr.log_every_steps}")
    _need(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    _need(o.reconstructor_lr is None or o.reconstructor_lr > 0,
          f"optim.reconstructor_lr must be > 0 (or null), got {o.reconstructor_lr}")
    _need(len(o.adam_betas) == 2 and all(0 <= b < 1 for b in o.adam_betas),
          f"optim.adam_betas must be two values in [0, 1), got {o.adam_betas}")
    length = o.schedule_epochs or tr.epochs
    _need(o.lr_schedule == "poly" or (0 <= o.warmup_epochs < length and 0 <= o.warmup_lr <= o.lr
                                      and 0 <= o.min_lr <= o.lr),
          f"optim.lr_schedule=cosine_warmup needs 0 <= optim.warmup_epochs ({o.warmup_epochs}) < the schedule's "
          f"{length} epochs and optim.warmup_lr ({o.warmup_lr}), optim.min_lr ({o.min_lr}) in [0, optim.lr={o.lr}]")


def _eval_rules(cfg: Config) -> None:
    t = cfg.eval.thresholds
    _need(len(t) == 3 and t[2] > 0 and t[0] <= t[1] and (t[1] - t[0]) / t[2] <= 10_000,
          f"eval.thresholds must be [start, stop, step] with step > 0 and at most 10000 steps, got {t}")
    _need(cfg.eval.scales and all(s > 0 for s in cfg.eval.scales), f"eval.scales must be positive, got {cfg.eval.scales}")


def _tune_rules(cfg: Config) -> None:
    t = cfg.tune
    _need(t.max_concurrent is None or t.max_concurrent >= 1, f"tune.max_concurrent must be >= 1 or null, got "
          f"{t.max_concurrent}")
    _need(t.num_samples >= 1, f"tune.num_samples must be >= 1, got {t.num_samples}")
    _need(t.trial_cpus > 0, f"tune.trial_cpus must be > 0 (Ray Tune rejects 0), got {t.trial_cpus}")
    _need(t.select_split != cfg.eval.split, f"tune.select_split and eval.split are both '{cfg.eval.split}': the split "
          "that selects the trial must differ from the split whose numbers are reported")


def _pseudo_rules(cfg: Config) -> None:
    ps = cfg.pseudo
    vit = BACKBONES[cfg.model.backbone].transformer
    _need(not (vit and ps.irn_backbone == "classifier"), f"pseudo.irn_backbone=classifier: the classifier is a ViT "
          f"({cfg.model.backbone}) and IRN's boundary branch needs a CNN's stride-4 features: choose auto, encoder "
          "(the reconstructor's) or pretrained")
    _need(not (ps.irn_backbone == "encoder" and cfg.method.reconstructor == "none"), "pseudo.irn_backbone=encoder: "
          "the classifier was trained without a reconstructor (method.reconstructor=none): choose auto or pretrained")
    _need(not (vit and ps.irn_backbone == "encoder" and cfg.model.vit.encoder != "cnn"), "pseudo.irn_backbone="
          "encoder: the reconstructor's encoder is a ViT's blocks (model.vit.encoder=vit_blocks), not a CNN: choose "
          "auto or pretrained")
    fg = ps.conf_fg_threshold
    _need(0 < ps.conf_bg_threshold < 1 and (fg is None or ps.conf_bg_threshold <= fg < 1),
          f"pseudo.conf_bg_threshold ({ps.conf_bg_threshold}) must be in (0, pseudo.conf_fg_threshold "
          f"({ps.conf_fg_threshold})] and both below 1")
    _need(ps.seed_threshold is None or 0 < ps.seed_threshold < 1,
          f"pseudo.seed_threshold must be in (0, 1), got {ps.seed_threshold}")
    _need(ps.scales and all(s > 0 for s in ps.scales), f"pseudo.scales must be positive, got {ps.scales}")
    _need(ps.irn_radius >= 2 and ps.walk_radius >= 2, "pseudo.irn_radius and pseudo.walk_radius must be >= 2")
    _need(ps.irn_crop_size >= 16 and ps.irn_crop_size % 4 == 0,
          f"pseudo.irn_crop_size must be a multiple of 4 (the boundary map's stride), got {ps.irn_crop_size}")
    _need(ps.irn_batch_size >= 1 and ps.irn_epochs >= 1 and ps.actors >= 1 and ps.actor_cpus > 0,
          "pseudo.irn_batch_size, pseudo.irn_epochs and pseudo.actors must be >= 1, pseudo.actor_cpus > 0")
    _need(ps.beta > 0 and ps.exp_times >= 0 and ps.cam_power > 0, "pseudo.beta and pseudo.cam_power must be > 0, "
          "pseudo.exp_times >= 0")
    _need(ps.sem_seg_bg_threshold is None or 0 <= ps.sem_seg_bg_threshold <= 1,
          f"pseudo.sem_seg_bg_threshold must be in [0, 1] or null (the seed threshold), got {ps.sem_seg_bg_threshold}")
    workers = stage_workers(cfg, "irn")
    _need(workers >= 1, f"pseudo.irn_num_workers must be >= 1 or null, got {ps.irn_num_workers}")
    _need(ps.irn_batch_size % workers == 0, f"pseudo.irn_batch_size={ps.irn_batch_size} must divide evenly among "
          f"{workers} IRN workers ({_workers_key(cfg, 'irn')})")
    _need(ps.irn_checkpoint_every_steps is None or ps.irn_checkpoint_every_steps >= 1,
          f"pseudo.irn_checkpoint_every_steps must be >= 1 or null, got {ps.irn_checkpoint_every_steps}")


def _segment_rules(cfg: Config) -> None:
    sg = cfg.segment
    workers = stage_workers(cfg, "segment")
    _need(sg.epochs >= 1 and sg.batch_size >= 1, f"segment.epochs and segment.batch_size must be >= 1, got "
          f"{sg.epochs} and {sg.batch_size}")
    _need(workers >= 1, f"segment.num_workers must be >= 1 or null, got {sg.num_workers}")
    _need(sg.batch_size % workers == 0, f"segment.batch_size={sg.batch_size} must divide evenly among {workers} "
          f"DeepLab workers ({_workers_key(cfg, 'segment')}; set segment.num_workers to give DeepLab its own)")
    _need(sg.head != "aspp_v3" or sg.batch_size // workers >= 2,
          "segment.head=aspp_v3 trains BatchNorm after global pooling: it needs at least 2 images per worker "
          f"(segment.batch_size={sg.batch_size}, {workers} workers)")
    _need(sg.lr > 0 and sg.head_lr_multiplier > 0, "segment.lr and segment.head_lr_multiplier must be > 0")
    _need(sg.crop_size >= 16, f"segment.crop_size must be >= 16, got {sg.crop_size}")
    _need(len(sg.scale_range) == 2 and 0 < sg.scale_range[0] <= sg.scale_range[1],
          f"segment.scale_range must be [low, high] with 0 < low <= high, got {sg.scale_range}")
    _need(sg.eval_scales and all(s > 0 for s in sg.eval_scales), f"segment.eval_scales must be positive, got "
          f"{sg.eval_scales}")
    _need(sg.actors >= 1 and sg.actor_cpus > 0, "segment.actors must be >= 1 and segment.actor_cpus > 0")
    _need_stride("segment", sg.backbone, sg.output_stride)
    _need(not (sg.pretrained and sg.init_backbone), "segment.pretrained and segment.init_backbone both set: choose one")
    _need(sg.checkpoint_every_steps is None or sg.checkpoint_every_steps >= 1,
          f"segment.checkpoint_every_steps must be >= 1 or null, got {sg.checkpoint_every_steps}")


def stage_workers(cfg: Config, stage: str) -> int:
    """Ray Train workers of a stage: `train` (ACR: scaling.num_workers), `irn` (pseudo.irn_num_workers) or
    `segment` (segment.num_workers); a stage's own null falls back to scaling.num_workers."""
    own = {"train": None, "irn": cfg.pseudo.irn_num_workers, "segment": cfg.segment.num_workers}[stage]
    return cfg.scaling.num_workers if own is None else own


def _workers_key(cfg: Config, stage: str) -> str:
    key = {"irn": "pseudo.irn_num_workers", "segment": "segment.num_workers"}[stage]
    own = cfg.pseudo.irn_num_workers if stage == "irn" else cfg.segment.num_workers
    return f"{key}={own}" if own is not None else f"{key}=null: scaling.num_workers={cfg.scaling.num_workers}"


# What each job checks: the sections it reads (every job also checks scaling, ray and the non-finite-loss limit).
JOBS: dict[str, tuple] = {
    "prepare_data": (_data_rules,),
    "train": (_data_rules, _network_rules, _train_rules, _eval_rules),
    "tune": (_data_rules, _network_rules, _train_rules, _eval_rules, _tune_rules),
    "pseudo_labels": (_data_rules, _eval_rules, _pseudo_rules),
    "segment": (_data_rules, _segment_rules),
}


def _pipeline_stages(cfg: Config) -> list[str]:
    """The jobs the pipeline runs as its stages (each is checked with that job's rules)."""
    pl = cfg.pipeline
    stages = [] if pl.checkpoint else ["tune" if pl.search else "train"]
    return stages + ([] if pl.labels else ["pseudo_labels"]) + ["segment"]


def validate(cfg: Config, job: str = "train") -> None:
    """Cross-field checks of what `job` uses (a key of JOBS, or `pipeline`: each of its stages by its own rules);
    the error names the job (or the pipeline's stage) and the key."""
    if job == "pipeline":
        for stage in _pipeline_stages(cfg):
            try:
                validate(cfg, stage)
            except ConfigError as exc:
                raise ConfigError(f"the pipeline's {stage} stage: {exc}") from None
        return
    if job not in JOBS:
        raise ConfigError(f"unknown job '{job}' (known: {', '.join([*JOBS, 'pipeline'])})")
    try:
        _scaling_rules(cfg)
        for rules in JOBS[job]:
            rules(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (refused by the {job} job)") from None


def num_classes(cfg: Config) -> int:
    """Foreground classes of the configured dataset."""
    return cfg.synthetic.num_classes if cfg.data.format == "synthetic" else cfg.data.num_classes


def apply_overrides(cfg: Config, values: dict[str, Any], source: str = "overrides", job: str | None = None) -> Config:
    """A new Config with dotted `key: value` pairs set (e.g. a Tune trial's sampled values): keys and types checked,
    and with `job` that job's rules."""
    tree = to_dict(cfg)
    for key, value in values.items():
        if not isinstance(key, str):
            raise ConfigError(f"config key {key!r} (from {source}) is not a string")
        _check_keys({key: value}, tree, "", source, dotted=True)
        _set_dotted(tree, key, value)
    return config_from_dict(tree, job)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
