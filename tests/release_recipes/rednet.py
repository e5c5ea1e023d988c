"""The five RedNet configs' recipes as d-li14/involution's mmcls configs and mmcls/mmcv's code define them.

Release read at 21c3158: cls/configs/rednet/rednet{D}_b32x64_warmup_coslr_imagenet.py is
_base_/models/rednet{D}.py + datasets/imagenet_bs32.py + _base_/schedules/imagenet_bs2048_coslr_130e.py +
default_runtime.py; the dataset and runtime files are mmcls's own (not in the release) and are cited at mmcls v0.8.0
(`mmcls/...`, identical in v0.7.0); the runner and its hooks at mmcv v1.2.7 (`mmcv/...`), the versions of the
release's time (it pins neither; reference/paper_tables.yaml involution.source.framework). Line numbers are at those
tags; the schedule file's (`schedule L<n>`) at the release commit.

Which command stands behind every row: README "64 GPUs" and the config name b32x64 (64 processes of
samples_per_gpu 32 through mmcls tools/dist_train.sh, one process per GPU).
"""
import functools
import math

import torch

__all__ = ['RECIPES', 'release_loader_len', 'release_lr_per_update', 'release_lr_by_hook_protocol']

TRAIN_SIZE = 1281167  # ImageNet-1k train images (the plan's default --plan-train-size)
WORLD_SIZE = 64  # README: 64 GPUs; config name b32x64
BATCH = 32  # mmcls configs/_base_/datasets/imagenet_bs32.py L23 samples_per_gpu
LR = 0.8  # schedule L3: SGD lr 0.8
MOMENTUM = 0.9  # schedule L3
WEIGHT_DECAY = 1e-4  # schedule L3
NESTEROV = True  # schedule L3
MIN_LR = 0.0  # schedule L7-8: CosineAnnealing, min_lr=0
WARMUP_ITERS = 3130  # schedule L9-10 (linear warm-up, iterations: mmcv warmup_by_epoch defaults to False)
WARMUP_RATIO = 0.25  # schedule L11
EPOCHS = 130  # schedule L12: EpochBasedRunner max_epochs
LABEL_SMOOTHING = 0.1  # _base_/models/rednet{D}.py L15-19: LabelSmoothLoss(label_smooth_val=0.1, num_classes=1000)
MODELS = ('rednet26', 'rednet38', 'rednet50', 'rednet101', 'rednet152')


def release_loader_len(train_size, world_size, batch_size):
    """len(data_loader): mmcls's DistributedSampler(round_up=True) pads every rank to ceil(N / W) samples
    (mmcls/datasets/samplers/distributed_sampler.py L12-17, torch's num_samples) and the DataLoader keeps the last
    partial batch (mmcls/datasets/builder.py L89-98: no drop_last; mmcls/apis/train.py L47-55 passes round_up=True)."""
    return math.ceil(math.ceil(train_size / world_size) / batch_size)


def _regular_lr(epoch, base_lr, min_lr, epochs):
    """CosineAnnealingLrUpdaterHook.get_lr with by_epoch (mmcv/runner/hooks/lr_updater.py L236-248): progress is
    runner.epoch out of runner.max_epochs; annealing_cos (L401-416)."""
    cos_out = math.cos(math.pi * (epoch / epochs)) + 1
    return min_lr + 0.5 * 1 * (base_lr - min_lr) * cos_out


def _warmup_lr(regular, cur_iter, warmup_iters, warmup_ratio):
    """LrUpdaterHook.get_warmup_lr, 'linear' (lr_updater.py L86-88): the epoch's regular LR times a ratio rising
    from warmup_ratio at iteration 0 towards 1 at warmup_iters."""
    k = (1 - cur_iter / warmup_iters) * (1 - warmup_ratio)
    return regular * (1 - k)


def release_lr_per_update(loader_len, epochs=EPOCHS, base_lr=LR, min_lr=MIN_LR, warmup_iters=WARMUP_ITERS,
                          warmup_ratio=WARMUP_RATIO):
    """The LR of every optimizer.step(), closed form: iteration t = epoch * len(loader) + i runs at the epoch's
    cosine value times the warm-up ratio while t < warmup_iters, at the cosine value from then on. One step per
    iteration (mmcv/runner/hooks/optimizer.py L25-34: OptimizerHook.after_train_iter), with the LR that
    before_train_iter left (lr_updater.py L124-140; mmcv/runner/epoch_based_runner.py L45-52)."""
    lrs = []
    for epoch in range(epochs):
        regular = _regular_lr(epoch, base_lr, min_lr, epochs)
        for i in range(loader_len):
            t = epoch * loader_len + i
            lrs.append(_warmup_lr(regular, t, warmup_iters, warmup_ratio) if t < warmup_iters else regular)
    return lrs


def release_lr_by_hook_protocol(loader_len, epochs=EPOCHS, base_lr=LR, min_lr=MIN_LR, warmup_iters=WARMUP_ITERS,
                                warmup_ratio=WARMUP_RATIO):
    """The same LRs from the hook calls in the runner's order, keeping the optimizer group's state as mmcv does:
    before_run records initial_lr (lr_updater.py L94-111); each epoch calls before_train_epoch (L113-122: sets the
    regular LR), then for each iteration before_train_iter (L124-140, by_epoch branch: warm-up LR while
    cur_iter < warmup_iters, the regular LR at cur_iter == warmup_iters, nothing after), the step, and
    runner._iter += 1 (epoch_based_runner.py L40-56)."""
    group = {'lr': base_lr}
    group.setdefault('initial_lr', group['lr'])
    base = group['initial_lr']
    runner_iter, lrs = 0, []
    for epoch in range(epochs):
        regular = _regular_lr(epoch, base, min_lr, epochs)
        group['lr'] = regular
        for _ in range(loader_len):
            if runner_iter < warmup_iters:
                group['lr'] = _warmup_lr(regular, runner_iter, warmup_iters, warmup_ratio)
            elif runner_iter == warmup_iters:
                group['lr'] = regular
            lrs.append(group['lr'])
            runner_iter += 1
    return lrs


def _param_groups(model_name):
    """mmcv/runner/optimizer/default_constructor.py L239-240: without paramwise_cfg the optimizer gets
    model.parameters(), one group with the optimizer's weight_decay: every parameter decayed, BN and biases too."""
    import timm

    import models  # noqa: F401  (registers the RedNet entrypoints)
    with torch.device('meta'):
        model = timm.create_model(model_name)
    return [{'weight_decay': WEIGHT_DECAY, 'lr_scale': 1.0, 'params': [n for n, _ in model.named_parameters()]}]


def _normalize():
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from torchvision import transforms
    # imagenet_bs32.py L3-4 (img_norm_cfg): mean [123.675, 116.28, 103.53], std [58.395, 57.12, 57.375] on 0-255 RGB (to_rgb) =
    # ImageNet mean/std on 0-1 tensors
    return transforms.Normalize(mean=torch.tensor(IMAGENET_DEFAULT_MEAN), std=torch.tensor(IMAGENET_DEFAULT_STD))


def _train_transform():
    """imagenet_bs32.py L5-13 with mmcls/datasets/pipelines/transforms.py defaults, each as today's equivalent
    torchvision/timm step (mmcls decodes and resizes with cv2, which is not compared here)."""
    from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation
    from torchvision import transforms
    steps = [
        # RandomResizedCrop(size=224): scale (0.08, 1.0), ratio (3/4, 4/3), bilinear (transforms.py L160-165)
        RandomResizedCropAndInterpolation((224, 224), scale=(0.08, 1.0), ratio=(3. / 4., 4. / 3.),
                                          interpolation='bilinear'),
        transforms.RandomHorizontalFlip(p=0.5),  # RandomFlip(flip_prob=0.5, direction='horizontal')
        MaybeToTensor(),  # ImageToTensor
        _normalize(),  # Normalize (applied before ImageToTensor in mmcls; the same values)
    ]
    return [repr(t) for t in steps]


def _eval_transform():
    """imagenet_bs32.py L14-21: Resize(size=(256, -1)): short side 256, bilinear (transforms.py L368);
    CenterCrop(224); Normalize; ImageToTensor."""
    from timm.data.transforms import MaybeToTensor
    from torchvision import transforms
    steps = [
        transforms.Resize(256, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop((224, 224)),
        MaybeToTensor(),
        _normalize(),
    ]
    return [repr(t) for t in steps]


@functools.cache
def _transforms():
    return _train_transform(), _eval_transform()


def _recipe(name, train_size=TRAIN_SIZE):
    loader_len = release_loader_len(train_size, WORLD_SIZE, BATCH)
    train_transform, eval_transform = _transforms()
    return {
        'model': name,
        'model_kwargs': {},  # the depth is the entrypoint's (_base_/models/rednet{D}.py backbone depth)
        'world_size': WORLD_SIZE,
        'batch_size': BATCH,
        'grad_accum_steps': 1,  # OptimizerHook steps every iteration
        'global_batch': WORLD_SIZE * BATCH,
        'train_size': train_size,
        'updates_per_epoch': loader_len,
        'epochs': EPOCHS,
        'total_updates': loader_len * EPOCHS,
        # schedule L2-3: torch SGD(lr=0.8, momentum=0.9, weight_decay=1e-4, nesterov=True) built by mmcv's
        # build_optimizer; the decay is compared in param_groups
        'optimizer': {'type': 'SGD', 'lr': LR, 'momentum': MOMENTUM, 'dampening': 0, 'nesterov': NESTEROV},
        'param_groups': _param_groups(name),
        'lr': release_lr_per_update(loader_len),
        'temperature': None,
        # mmcls/models/losses/label_smooth_loss.py L9-30: target 1 - 0.1 + 0.1/1000 on the label, 0.1/1000
        # elsewhere, summed cross-entropy divided by the batch (mmcls/models/heads/cls_head.py L34-38 avg_factor,
        # mmcls/models/losses/utils.py L43-48): timm's LabelSmoothingCrossEntropy(0.1)
        'loss': {'type': 'label_smoothing_cross_entropy', 'label_smoothing': LABEL_SMOOTHING, 'mixup': None},
        'aux_losses': [],
        'clip_grad': None,  # schedule L4: optimizer_config grad_clip=None
        'ema': None,  # no EMA hook in the config set
        'amp': None,  # no fp16 key in the config set
        'drop_rate': 0.0,  # LinearClsHead has no dropout
        'drop_path_rate': None,  # RedNet has none
        'sync_bn': False,  # RedNet norm_cfg BN (rednet.py), no SyncBN conversion in mmcls/apis/train.py
        # mmcls/apis/train.py L63-67: MMDistributedDataParallel(broadcast_buffers=False) and nothing reduces BN
        # statistics: each process keeps its own, rank 0 saves its own
        'dist_bn': '',
        'train_transform': train_transform,
        'eval_transform': eval_transform,
    }


RECIPES = {f'configs/rednet/{name}.yaml': functools.partial(_recipe, name) for name in MODELS}
