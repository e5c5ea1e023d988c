"""The ImageNet recipes of the OSVAI/ODConv release, restated from its code, one per config in configs/odconv/.

Read at OSVAI/ODConv 0901cc1 (HEAD). Citations: `README L<n>` is README.md, `main.py L<n>` main.py,
`misc.py L<n>` utils/misc.py. The command behind every published row is the README's "Training" command for its
family (README L70-74 ResNet, L86-90 MobileNetV2), with the process count, dropout and kernel number of its examples
(README L79-82, L95-98); every option it leaves out takes main.py's argparse default.
"""
import math
from functools import partial

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation
from torchvision import transforms

__all__ = ['RECIPES', 'TRAIN_SIZE', 'release_recipe']

TRAIN_SIZE = 1281167  # ImageNet-1k train images, the size every plan here is computed for

# README L71/L79, L87/L95: `torch.distributed.launch --nproc_per_node=8`, one process per GPU (main.py L128-131).
WORLD_SIZE = 8
# main.py L52: --train-batch defaults to 256 and no README command sets it; it is the global batch.
TRAIN_BATCH = 256

# Per family: the README command's options (README L72-73 ResNet, L88-89 MobileNetV2).
FAMILY = {
    'resnet': {'epochs': 100, 'lr': 0.1, 'weight_decay': 1e-4, 'lr_decay': 'schedule', 'schedule': (30, 60, 90)},
    'mobilenetv2': {'epochs': 150, 'lr': 0.05, 'weight_decay': 4e-5, 'lr_decay': 'cos', 'schedule': None},
}
GAMMA = 0.1  # main.py L68: --gamma default, not set by the README commands
MOMENTUM = 0.9  # main.py L69: --momentum default
TEMP_INIT = 30.0  # main.py L101: --temp_init default
TEMP_EPOCH = 10  # main.py L100: --temp_epoch default
REDUCTION = 0.0625  # README L81/L97: --reduction 0.0625 (r = 1/16, README L37/L52)
# README L80/L96: --dropout 0.2 in both example commands (od_resnet18 4x, od_mobilenetv2_100 4x); the generic
# commands (L72, L88) leave it as "{dropout rate}" and no other row's value is published, so 0.2 stands for all.
DROPOUT = 0.2

# config stem -> (release --arch, --kernel_num, family); one per published ODConv row (README L43-64).
ROWS = {
    'od_mobilenetv2_100_1x': ('od_mobilenetv2_100', 1, 'mobilenetv2'),  # README L43
    'od_mobilenetv2_100_4x': ('od_mobilenetv2_100', 4, 'mobilenetv2'),  # README L44
    'od_mobilenetv2_075_1x': ('od_mobilenetv2_075', 1, 'mobilenetv2'),  # README L46
    'od_mobilenetv2_075_4x': ('od_mobilenetv2_075', 4, 'mobilenetv2'),  # README L47
    'od_mobilenetv2_050_1x': ('od_mobilenetv2_050', 1, 'mobilenetv2'),  # README L49
    'od_mobilenetv2_050_4x': ('od_mobilenetv2_050', 4, 'mobilenetv2'),  # README L50
    'od_resnet18_1x': ('od_resnet18', 1, 'resnet'),  # README L57
    'od_resnet18_4x': ('od_resnet18', 4, 'resnet'),  # README L58
    'od_resnet50_1x': ('od_resnet50', 1, 'resnet'),  # README L60
    'od_resnet50_4x': ('od_resnet50', 4, 'resnet'),  # README L61
    'od_resnet101_1x': ('od_resnet101', 1, 'resnet'),  # README L63
    'od_resnet101_2x': ('od_resnet101', 2, 'resnet'),  # README L64
}


def updates_per_epoch(train_size: int, world_size: int, batch_size: int) -> int:
    """Length of each process's training loader, one optimizer step per batch (main.py L277-323).

    main.py L183: DistributedSampler with its default drop_last=False gives every rank ceil(N / W) indices (padded
    by repeating the first ones); main.py L189: the DataLoader keeps the last partial batch (drop_last=False).
    """
    per_rank = math.ceil(train_size / world_size)
    return math.ceil(per_rank / batch_size)


def lr_per_update(family: dict, iters: int) -> list:
    """LR in force at every optimizer step.

    main.py L236: `adjust_learning_rate(optimizer, epoch, 0, train_loader_len)` runs once, before each epoch, with
    iteration 0, and nothing changes the LR inside train() (main.py L264-343): every step of epoch e uses the value
    main.py L425-438 gives for (e, 0): 'cos' lr (1 + cos(pi e L / (E L))) / 2, down to 0 and never reaching it;
    'schedule' lr x gamma^(number of milestones s <= e), so epoch 30 is the first at 0.1 lr.
    """
    epochs, base = family['epochs'], family['lr']
    max_iter = epochs * iters  # main.py L427
    lrs = []
    for epoch in range(epochs):
        current_iter = 0 + epoch * iters  # main.py L426 with iteration 0 (L236)
        if family['lr_decay'] == 'cos':
            lr = base * (1 + math.cos(math.pi * current_iter / max_iter)) / 2  # main.py L430
        else:
            count = sum(1 for s in family['schedule'] if s <= epoch)  # main.py L432
            lr = base * pow(GAMMA, count)  # main.py L433
        lrs.extend([lr] * iters)
    return lrs


def get_temperature(iteration: int, epoch: int, iter_per_epoch: int, temp_epoch: int, temp_init: float) -> float:
    """misc.py L54-58: 1 + max(0, (T0 - 1)(K - k) / K), k = iteration + epoch x L, K = L x temp_epoch."""
    total = iter_per_epoch * temp_epoch
    current = iteration + epoch * iter_per_epoch
    return 1.0 + max(0, (temp_init - 1.0) * ((total - current) / total))


def temperature_per_update(epochs: int, iters: int) -> list:
    """Temperature in force in the forward of every step.

    main.py L223-226: before the first epoch, get_temperature(0, start_epoch, L) (= T0 at epoch 0).
    main.py L279-282: in an epoch < temp_epoch, *before* the forward of batch b, get_temperature(b + 1, epoch, L):
    the step counts itself, so step 0 already runs at T0 - (T0 - 1) / (10 L), not at T0. This is the code as
    released now: commit 60a4691 "Fix temperature annealing" (2022-09-21) changed b to b + 1, five days after the
    code and trained models were released (acb771c, 2022-09-16, which passed b). From epoch temp_epoch on nothing
    sets it again: the last value set, get_temperature(L, temp_epoch - 1, L) = 1, stays.
    """
    temp = get_temperature(0, 0, iters, TEMP_EPOCH, TEMP_INIT)  # main.py L224
    temps = []
    for epoch in range(epochs):
        for batch_idx in range(iters):
            if epoch < TEMP_EPOCH:  # main.py L279
                temp = get_temperature(batch_idx + 1, epoch, iters, TEMP_EPOCH, TEMP_INIT)  # main.py L280
            temps.append(temp)
    return temps


def _param_names(model_name: str, model_kwargs: dict) -> list:
    import timm

    import models  # noqa: F401  (registers our entrypoints)
    with torch.device('meta'):
        model = timm.create_model(model_name, **model_kwargs)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _normalize():
    # main.py L172-173: Normalize(ImageNet mean/std); timm builds the same from tensors, which is what repr shows
    return transforms.Normalize(mean=torch.tensor(IMAGENET_DEFAULT_MEAN), std=torch.tensor(IMAGENET_DEFAULT_STD))


def train_transform() -> list:
    """main.py L177-182, each mapped to the timm/torchvision object that does the same."""
    return [repr(t) for t in (
        # L178 RandomResizedCrop(224): torchvision's defaults scale (0.08, 1), ratio (3/4, 4/3), bilinear
        RandomResizedCropAndInterpolation(224, scale=(0.08, 1.0), ratio=(3. / 4., 4. / 3.), interpolation='bilinear'),
        transforms.RandomHorizontalFlip(p=0.5),  # L179 RandomHorizontalFlip(), p=0.5 by default
        MaybeToTensor(),  # L180 ToTensor() (timm's MaybeToTensor converts PIL images the same way)
        _normalize(),  # L181
    )]


def eval_transform() -> list:
    """main.py L192-197."""
    return [repr(t) for t in (
        transforms.Resize(256, interpolation=transforms.InterpolationMode.BILINEAR),  # L194 Resize(256), bilinear
        transforms.CenterCrop(224),  # L195
        MaybeToTensor(),  # L196 ToTensor()
        _normalize(),  # L197
    )]


def release_recipe(stem: str, train_size: int = TRAIN_SIZE) -> dict:
    """The plan the release's main.py would have for the config `configs/odconv/<stem>.yaml`."""
    arch, kernel_num, family_name = ROWS[stem]
    family = FAMILY[family_name]
    batch_size = TRAIN_BATCH // WORLD_SIZE  # main.py L131: --train-batch divided among the processes
    iters = updates_per_epoch(train_size, WORLD_SIZE, batch_size)  # main.py L208 train_loader_len
    epochs = family['epochs']
    # main.py L100-103 + README L81/L97: what the model is built with; the temperature options are main.py's own
    model_kwargs = {'kernel_num': kernel_num, 'reduction': REDUCTION, 'temp_init': TEMP_INIT, 'temp_epochs': TEMP_EPOCH}
    return {
        'model': arch,  # README --arch
        'model_kwargs': model_kwargs,
        'world_size': WORLD_SIZE,
        'batch_size': batch_size,
        'grad_accum_steps': 1,  # main.py L316-323: one step per batch
        'global_batch': batch_size * WORLD_SIZE,
        'train_size': train_size,
        'updates_per_epoch': iters,
        'epochs': epochs,  # README L72/L88 --epochs; no cool-down (main.py L234)
        'total_updates': iters * epochs,
        # main.py L142-144: torch SGD(model.parameters(), lr, momentum, weight_decay); dampening and nesterov are
        # torch's defaults; the decay (on the one group) is compared in param_groups
        'optimizer': {'type': 'SGD', 'lr': family['lr'], 'momentum': MOMENTUM, 'dampening': 0, 'nesterov': False},
        # main.py L142: one group, model.parameters(): every parameter decayed, BN and biases included
        'param_groups': [{'weight_decay': family['weight_decay'], 'lr_scale': 1.0,
                          'params': _param_names(arch, model_kwargs)}],
        'lr': lr_per_update(family, iters),
        'temperature': temperature_per_update(epochs, iters),
        # main.py L141: nn.CrossEntropyLoss(), no label smoothing, no mixup
        'loss': {'type': 'cross_entropy', 'label_smoothing': 0.0, 'mixup': None},
        'aux_losses': [],  # main.py L298: the loss is the criterion alone
        'clip_grad': None,  # main.py L316-323: no clipping
        'ema': None,  # main.py: no weight averaging
        'amp': None,  # main.py L97 --use_amp off by default; README L101 offers it, but no training command uses it
        'drop_rate': DROPOUT,  # main.py L136 dropout=args.dropout before the classifier
        'drop_path_rate': None,  # main.py L136-138: the release's models have no drop path
        # main.py L147: plain DDP, no SyncBatchNorm; its default broadcast_buffers=True copies rank 0's BN
        # statistics to every process at each forward, and nothing else averages them
        'sync_bn': False,
        'dist_bn': 'broadcast',
        'train_transform': train_transform(),
        'eval_transform': eval_transform(),
    }


RECIPES = {f'configs/odconv/{stem}.yaml': partial(release_recipe, stem) for stem in ROWS}
