"""DDF recipes as theFoxofSky/ddfnet trained them: its README command on its own train.py and timm 0.4.5.

Sources (read at these commits; lines cited beside each rule):
    README   theFoxofSky/ddfnet@4e21b4a README.md L157-158 ("Training from scratch"), the command behind every
             published row: `./distributed_train.sh 8 <imagenet> --model <name> --lr 0.4 --warmup-epochs 5 --epochs 120
             --sched cosine -b 128 -j 6 --amp --dist-bn reduce`
    train.py theFoxofSky/ddfnet@4e21b4a train.py: timm 0.4.5's train.py with its own defaults (model, epochs, aa,
             reprob, remode, recount differ from 0.4.5's)
    dist.sh  theFoxofSky/ddfnet@4e21b4a distributed_train.sh: `torch.distributed.launch --nproc_per_node=$1`
    timm     huggingface/pytorch-image-models@v0.4.5 (the version its README installs): timm/scheduler/
             scheduler_factory.py, cosine_lr.py, scheduler.py, timm/optim/optim_factory.py, timm/data/loader.py,
             timm/data/transforms_factory.py, timm/data/config.py, timm/models/factory.py, timm/models/resnet.py
    model    theFoxofSky/ddfnet@4e21b4a ddf_resnet.py (default_cfgs: interpolation bicubic over timm's ResNet _cfg)
"""
import math
from functools import partial

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation
from torchvision import transforms

__all__ = ['RECIPES', 'release_args']

TRAIN_SIZE = 1281167  # ImageNet-1k train images, the plan's default --plan-train-size


def release_args():
    """The options the release's run resolves to: README flags over ddfnet train.py defaults."""
    return {
        'world_size': 8,  # README: distributed_train.sh 8; dist.sh L4: one process per GPU
        'batch_size': 128,  # README: -b 128 (per process: train.py L486 batch_size=args.batch_size per loader)
        'lr': 0.4,  # README: --lr 0.4
        'opt': 'sgd',  # train.py L110 default 'sgd'
        'momentum': 0.9,  # train.py L116
        'weight_decay': 1e-4,  # train.py L118
        'sched': 'cosine',  # README: --sched cosine
        'epochs': 120,  # README: --epochs 120 (train.py L145 default 120 too)
        'warmup_epochs': 5,  # README: --warmup-epochs 5 (train.py L151 default 3)
        'warmup_lr': 1e-4,  # train.py L141
        'min_lr': 1e-5,  # train.py L143
        'cooldown_epochs': 10,  # train.py L153
        'lr_cycle_limit': 1,  # train.py L139
        'lr_cycle_mul': 1.0,  # train.py L137
        'decay_rate': 0.1,  # train.py L157 (cosine's per-cycle decay; one cycle only, so never applied)
        'smoothing': 0.1,  # train.py L201
        'mixup': 0.0, 'cutmix': 0.0, 'cutmix_minmax': None,  # train.py L187-192: mixup inactive
        'aa': 'rand-m7-mstd0.5-inc1',  # train.py L173 (0.4.5: None)
        'reprob': 0.4, 'remode': 'pixel', 'recount': 3,  # train.py L179-184 (0.4.5: 0, 'const', 1)
        'color_jitter': 0.4,  # train.py L171 (unused: transforms_factory L79-98 drops it when aa is set)
        'train_interpolation': 'random',  # train.py L203
        'hflip': 0.5, 'vflip': 0.0,  # train.py L167-170
        'scale': (0.08, 1.0), 'ratio': (3. / 4., 4. / 3.),  # train.py L163-166
        'drop': 0.0,  # train.py L205
        'drop_path': None,  # train.py L209; factory.py L48 drops None kwargs, so the model keeps its default
        'clip_grad': None,  # train.py L120
        'model_ema': False,  # train.py L229
        'amp': True,  # README: --amp; train.py L316-325 picks native AMP (torch.cuda.amp.autocast, float16)
        'sync_bn': False,  # train.py L221
        'dist_bn': 'reduce',  # README: --dist-bn reduce (train.py L223 default '')
        'crop_pct': 0.875,  # train.py L96 None -> config.py L67-71: model default_cfg, resnet.py _cfg 0.875
        'interpolation': 'bicubic',  # train.py L102 '' -> config.py L36-40: ddf_resnet.py default_cfgs 'bicubic'
        'input_size': (3, 224, 224),  # resnet.py _cfg input_size
    }


def _updates_per_epoch(a, train_size):
    # loader.py L187-189: training uses torch's DistributedSampler, which pads every rank to ceil(N / W) samples;
    # loader.py L210: drop_last=is_training, so the last partial batch of a rank is dropped.
    per_rank = math.ceil(train_size / a['world_size'])
    return per_rank // a['batch_size']


def _epoch_lr(a, epoch):
    """cosine_lr.py L68-95 at t=epoch, the value the release's scheduler sets for a whole epoch."""
    warmup_t, warmup_lr, base = a['warmup_epochs'], a['warmup_lr'], a['lr']
    if epoch < warmup_t:
        # cosine_lr.py L63 and L70: linear from warmup_lr, step (base - warmup_lr) / warmup_t per epoch
        return warmup_lr + epoch * (base - warmup_lr) / warmup_t
    # cosine_lr.py L72-73: warmup_prefix False (scheduler_factory.py L26-40 does not pass it), so t is not shifted
    t_initial = a['epochs']  # scheduler_factory.py L28: t_initial = args.epochs
    i = epoch // t_initial  # cosine_lr.py L79-82 (t_mul 1)
    t_curr = epoch - t_initial * i
    if i < a['lr_cycle_limit']:  # cosine_lr.py L88
        gamma = a['decay_rate'] ** i  # cosine_lr.py L84-86
        lr_min, lr_max = a['min_lr'] * gamma, base * gamma
        return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * t_curr / t_initial))
    return a['min_lr']  # cosine_lr.py L93: the cool-down epochs run at min_lr


def _lr_per_update(a, epochs, updates_per_epoch):
    # scheduler_factory.py L35: t_in_epochs=True, so step_update (train.py L700) changes nothing (cosine_lr.py
    # L103-107) and every update of an epoch uses the value set before it:
    #   epoch 0: cosine_lr.py L62-64, the constructor sets warmup_lr (train.py L441; start_epoch 0, L448 skipped);
    #   epoch e > 0: train.py L586 lr_scheduler.step(epoch + 1) after epoch e - 1.
    lrs = []
    for epoch in range(epochs):
        lrs += [_epoch_lr(a, epoch)] * updates_per_epoch
    return lrs


def _param_groups(model_name, weight_decay):
    """optim_factory.py L25-37 (add_weight_decay) applied to our model's parameter names."""
    import timm

    import models  # noqa: F401  (registers the DDF models)
    with torch.device('meta'):
        model = timm.create_model(model_name)
    # optim_factory.py L43-47: weight decay set and filter_bias_and_bn default True; the release's ResNet has no
    # no_weight_decay(), so the skip list is empty
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # optim_factory.py L29-30
        if param.ndim == 1 or name.endswith('.bias'):  # optim_factory.py L31
            no_decay.append(name)
        else:
            decay.append(name)
    return [
        {'weight_decay': 0.0, 'lr_scale': 1.0, 'params': no_decay},  # optim_factory.py L36
        {'weight_decay': weight_decay, 'lr_scale': 1.0, 'params': decay},  # optim_factory.py L37
    ]


def _train_transform(a):
    # create_transform (transforms_factory.py L189-190): img_size = input_size[-2:]
    img_size = tuple(a['input_size'][-2:])
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # config.py: model default_cfg mean/std
    # transforms_factory.py L85-92: RandAugment hparams; 'random' interpolation leaves RandAugment's own choice
    aa_hparams = {
        'translate_const': int(min(img_size) * 0.45),
        'img_mean': tuple(min(255, round(255 * x)) for x in mean),
    }
    tfl = [
        # transforms_factory.py L71-72 (interpolation = args.train_interpolation, train.py L480-482)
        RandomResizedCropAndInterpolation(
            img_size, scale=tuple(a['scale']), ratio=tuple(a['ratio']), interpolation=a['train_interpolation']),
        transforms.RandomHorizontalFlip(p=a['hflip']),  # transforms_factory.py L73-74 (vflip 0: L75 skipped)
        rand_augment_transform(a['aa'], aa_hparams),  # transforms_factory.py L91-92 (no ColorJitter: L98)
        MaybeToTensor(),  # transforms_factory.py L115 transforms.ToTensor() (same result on a PIL image)
        transforms.Normalize(mean=torch.tensor(mean), std=torch.tensor(std)),  # transforms_factory.py L116-118
        # transforms_factory.py L120-122 (the prefetcher does the same on GPU, loader.py L73-74); re_num_splits 0:
        # loader.py L159-162 without --resplit
        RandomErasing(a['reprob'], mode=a['remode'], max_count=a['recount'], num_splits=0, device='cpu'),
    ]
    return [repr(t) for t in tfl]


def _eval_transform(a):
    img_size = tuple(a['input_size'][-2:])
    # transforms_factory.py L139-143: a square size resizes the shorter side to floor(224 / crop_pct)
    scale_size = math.floor(img_size[0] / a['crop_pct'])
    interp = transforms.InterpolationMode(a['interpolation'])
    tfl = [
        transforms.Resize(scale_size, interpolation=interp),  # transforms_factory.py L150
        transforms.CenterCrop(img_size),  # transforms_factory.py L151
        MaybeToTensor(),  # transforms_factory.py L158 transforms.ToTensor()
        transforms.Normalize(
            mean=torch.tensor(IMAGENET_DEFAULT_MEAN), std=torch.tensor(IMAGENET_DEFAULT_STD)),  # L159-161
    ]
    return [repr(t) for t in tfl]


def _recipe(model_name, train_size=TRAIN_SIZE):
    a = release_args()
    updates_per_epoch = _updates_per_epoch(a, train_size)
    # scheduler_factory.py L41: epochs = cycle length (t_initial 120, one cycle: cosine_lr.py L109-114) + cool-down
    epochs = a['epochs'] * max(1, a['lr_cycle_limit']) + a['cooldown_epochs']
    lr = _lr_per_update(a, epochs, updates_per_epoch)
    return {
        'model': model_name,  # README: --model <name>
        'model_kwargs': {},  # train.py L332-345 passes nothing model specific (factory.py L34-48 drops the rest)
        'world_size': a['world_size'],
        'batch_size': a['batch_size'],
        'grad_accum_steps': 1,  # train.py L634-654: one optimizer step per batch
        'global_batch': a['world_size'] * a['batch_size'],
        'train_size': train_size,
        'updates_per_epoch': updates_per_epoch,
        'epochs': epochs,
        'total_updates': updates_per_epoch * epochs,
        # optim_factory.py L55 and L65-67: 'sgd' is torch SGD with Nesterov momentum; lr is args.lr; the decay
        # lives in the param groups (L47-48), where the plan compares it
        'optimizer': {'type': 'SGD', 'lr': a['lr'], 'momentum': a['momentum'], 'dampening': 0, 'nesterov': True},
        'param_groups': _param_groups(model_name, a['weight_decay']),
        'lr': lr,
        'temperature': None,  # no temperature in DDF
        # train.py L530-536: mixup inactive and smoothing 0.1 -> LabelSmoothingCrossEntropy(0.1)
        'loss': {'type': 'label_smoothing_cross_entropy', 'label_smoothing': a['smoothing'], 'mixup': None},
        'aux_losses': [],
        'clip_grad': None,  # train.py L645 and L650: clip_grad None
        'ema': None,  # train.py L420: --model-ema off
        'amp': 'float16',  # train.py L316-325 and L401: native torch.cuda.amp.autocast (float16) + NativeScaler
        'drop_rate': a['drop'],  # train.py L336
        'drop_path_rate': a['drop_path'],  # train.py L338, None: not passed (factory.py L48)
        'sync_bn': a['sync_bn'],
        # train.py L570-573: distribute_bn(reduce=True) after every epoch; the native DDP of L437 also broadcasts
        # rank 0's buffers before every forward (broadcast_buffers default), which the epoch-end mean overrides
        'dist_bn': a['dist_bn'],
        'train_transform': _train_transform(a),
        'eval_transform': _eval_transform(a),
    }


RECIPES = {
    f'configs/ddf/{name}.yaml': partial(_recipe, name)
    for name in ('ddf_mul_resnet50', 'ddf_add_resnet50', 'ddf_mul_resnet101', 'ddf_add_resnet101')
}
