"""DGConv recipes as d-li14/dgconv.pytorch states them: the PyTorch ImageNet example with a per-epoch cosine.

The release has no training script. Its README table (d-li14/dgconv.pytorch@3b997d6 README.md L14-17) gives
"cosine (120 epochs)" for both rows, and the author's answer in issue #4 (2020-12-21) gives the rest: "120 epochs
with batch size 256 on 8 GPUs, initial LR 0.1, cosine LR decay, optimizer's weight decay and momentum following the
official PyTorch ResNet training", and "the constraint is not used in my training. Just treat its training like a
vanilla ResNet-50". The official training is pytorch/examples imagenet/main.py as it stood when the release was
published (2019-09-10): commit f16467a (2019-07-05), cited as main.py L<n> below.

Reading of "cosine LR decay" in that script: main.py L235 sets the LR once per epoch through adjust_learning_rate
(L395-399, step decay 0.1 every 30 epochs); the cosine replaces that rule, per epoch, without warm-up and with a floor
of 0: lr(e) = 0.5 * lr0 * (1 + cos(pi * e / epochs)). "8 GPUs" with the script's multiprocessing-distributed mode
(its README's recommended multi-GPU command): 8 processes, each with 256 / 8 = 32 images (main.py L149).
"""
import math
from functools import partial

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation
from torchvision import transforms

__all__ = ['RECIPES', 'release_args']

TRAIN_SIZE = 1281167  # ImageNet-1k train images, the plan's default --plan-train-size


def release_args():
    """The options of the release's run: issue #4 over main.py's defaults."""
    return {
        'world_size': 8,  # issue #4: 8 GPUs; main.py L103-109 one process per GPU (--multiprocessing-distributed)
        'total_batch': 256,  # issue #4: batch size 256 (main.py L39 default 256 too)
        'lr': 0.1,  # issue #4: initial LR 0.1 (main.py L44)
        'momentum': 0.9,  # main.py L46
        'weight_decay': 1e-4,  # main.py L48
        'epochs': 120,  # issue #4 and README L16-17 (main.py L35 default 90)
        'input_size': 224,  # main.py L203 and L221
        'resize': 256,  # main.py L220
    }


def _model_kwargs(model_name):
    if model_name == 'g_resnext50':
        # issue #4: the group constraint is not used; our g_resnext50 adds it to the loss only with reg_weight > 0
        # (its last-BN init already follows g_resnext.py G_ResNet's zero_init_residual=False)
        return {'reg_weight': 0.0, 'reg_form': 'raw'}
    # main.py L137: models.__dict__[arch]() is torchvision's resnext50_32x4d, zero_init_residual=False: every BN
    # gamma starts at 1; timm's ResNet zeroes each block's last BN unless zero_init_last=False
    return {'zero_init_last': False}


def _updates_per_epoch(a, train_size):
    batch = a['total_batch'] // a['world_size']  # main.py L149: batch_size = int(256 / ngpus_per_node)
    # main.py L209-210: torch's DistributedSampler pads every rank to ceil(N / W) samples;
    # main.py L214-216: the DataLoader keeps its default drop_last=False, so a rank's last partial batch is a step
    per_rank = math.ceil(train_size / a['world_size'])
    return math.ceil(per_rank / batch)


def _lr_per_update(a, updates_per_epoch):
    # main.py L232-238: the LR is set at the start of each epoch (L235) and held for all of its updates (L292-294)
    lrs = []
    for epoch in range(a['epochs']):
        lr = 0.5 * a['lr'] * (1 + math.cos(math.pi * epoch / a['epochs']))  # issue #4 cosine in place of L397
        lrs += [lr] * updates_per_epoch
    return lrs


def _param_groups(model_name, weight_decay):
    """main.py L171-173: SGD(model.parameters(), weight_decay=1e-4): one group, every parameter decayed."""
    import timm

    import models  # noqa: F401  (registers g_resnext50)
    with torch.device('meta'):
        model = timm.create_model(model_name)
    names = [name for name, _ in model.named_parameters()]  # every parameter, DGConv's 1-d gates included
    return [{'weight_decay': weight_decay, 'lr_scale': 1.0, 'params': names}]


def _normalize():
    # main.py L197-198: mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225] (timm's IMAGENET_DEFAULT_*)
    return transforms.Normalize(mean=torch.tensor(IMAGENET_DEFAULT_MEAN), std=torch.tensor(IMAGENET_DEFAULT_STD))


def _train_transform(a):
    size = (a['input_size'], a['input_size'])
    tfl = [
        # main.py L203 transforms.RandomResizedCrop(224): scale (0.08, 1), ratio (3/4, 4/3), bilinear
        RandomResizedCropAndInterpolation(size, scale=(0.08, 1.0), ratio=(3. / 4., 4. / 3.), interpolation='bilinear'),
        transforms.RandomHorizontalFlip(p=0.5),  # main.py L204
        MaybeToTensor(),  # main.py L205 transforms.ToTensor() (same result on a PIL image)
        _normalize(),  # main.py L206
    ]
    return [repr(t) for t in tfl]


def _eval_transform(a):
    tfl = [
        transforms.Resize(a['resize'], interpolation=transforms.InterpolationMode.BILINEAR),  # main.py L220
        transforms.CenterCrop((a['input_size'], a['input_size'])),  # main.py L221
        MaybeToTensor(),  # main.py L222
        _normalize(),  # main.py L223
    ]
    return [repr(t) for t in tfl]


def _recipe(model_name, train_size=TRAIN_SIZE):
    a = release_args()
    updates_per_epoch = _updates_per_epoch(a, train_size)
    batch = a['total_batch'] // a['world_size']
    return {
        'model': model_name,  # README L16-17: ResNeXt-50 (32x4d) and G-ResNeXt(-50)
        'model_kwargs': _model_kwargs(model_name),
        'world_size': a['world_size'],
        'batch_size': batch,
        'grad_accum_steps': 1,  # main.py L292-294: one step per batch
        'global_batch': a['world_size'] * batch,
        'train_size': train_size,
        'updates_per_epoch': updates_per_epoch,
        'epochs': a['epochs'],  # main.py L232: range(start_epoch, epochs), no cool-down
        'total_updates': updates_per_epoch * a['epochs'],
        # main.py L171-173: torch.optim.SGD(params, lr, momentum=0.9, weight_decay=1e-4): no Nesterov, dampening 0;
        # the decay (set on the optimizer, so on its one group) is compared in param_groups
        'optimizer': {'type': 'SGD', 'lr': a['lr'], 'momentum': a['momentum'], 'dampening': 0, 'nesterov': False},
        'param_groups': _param_groups(model_name, a['weight_decay']),
        'lr': _lr_per_update(a, updates_per_epoch),
        'temperature': None,
        'loss': {'type': 'cross_entropy', 'label_smoothing': 0.0, 'mixup': None},  # main.py L169
        'aux_losses': [],  # issue #4: "the constraint is not used in my training"
        'clip_grad': None,  # main.py L292-294: no clipping
        'ema': None,
        'amp': None,  # main.py: float32 throughout
        'drop_rate': 0.0,  # torchvision-style ResNeXt and g_resnext.py G_ResNet: no dropout
        'drop_path_rate': None,  # no stochastic depth: nothing passed to the model
        'sync_bn': False,  # main.py: plain BatchNorm2d
        # main.py L151: DistributedDataParallel(model, device_ids=[gpu]) broadcasts rank 0's buffers before every
        # forward (broadcast_buffers default) and nothing averages them; rank 0 saves the checkpoint (L247-255)
        'dist_bn': 'broadcast',
        'train_transform': _train_transform(a),
        'eval_transform': _eval_transform(a),
    }


RECIPES = {
    f'configs/dgconv/{name}.yaml': partial(_recipe, name) for name in ('g_resnext50', 'resnext50_32x4d')
}
