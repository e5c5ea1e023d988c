"""The six DWNet configs' recipes as Atten4Vis/DemystifyLocalViT's own code defines them.

Release read at ce7c0b7 (master, 2022-08-04); `main.py`, `optimizer.py`, `lr_scheduler.py` and `data/` are unchanged
since the initial commit 4aa8326 (2021-08-16, the commit the README's published rows and weights belong to); only
`config.py`, the `i_dynamic_*` yamls and the scripts changed in ce3ada0 (2022-03-15). Line numbers below are at
ce7c0b7. The release imports timm without a pin (README section 1); `from timm.data.transforms import _pil_interp`
(data/build.py L18) exists only up to timm 0.4.12, and the pieces used here (`CosineLRScheduler`, `Scheduler`,
`create_transform`, `rand_augment_transform`, `Mixup`) are identical from v0.3.3 to v0.4.12: timm lines are cited at
v0.4.12.

Which command stands behind each row:
- tiny models: README section 2 "batch-size 128 on 8 GPUs"; scripts/run_(dynamic_)dwnet_tiny_*.sh: 8 processes
  (`--nproc_per_node 8 --nnodes=1`), `--batch-size 128`, `--amp-opt-level O1`, no accumulation.
- base models: README section 2 "batch-size 64 on 16 GPUs ... to keep the total batch-size unchanged ... the base
  model couldn't train with AMP"; scripts/run_(dynamic_)dwnet_base_*.sh at 4aa8326: 16 processes (8 x 2 nodes),
  `--batch-size 64`, `--amp-opt-level O0`. The scripts at ce3ada0 (seven months after the published rows) add
  `--accumulation-steps 2 --amp-opt-level O1`, which contradicts README section 2 (total batch 2048, AMP): not
  followed.
- i_dynamic models (no published row): configs/i_dynamic_dwnet_*.yaml (drop path, AMP_OPT_LEVEL O0) with
  scripts/run_i_dynamic_dwnet_*.sh: `--batch-size 64 --accumulation-steps 2 --amp-opt-level O0` on 8 (tiny) or 16
  (base) processes. The base script passes `--cfg ./configs/dynamic_dwnet_base_patch4_window7_224.yaml`, a slip: the
  model is the one of configs/i_dynamic_dwnet_base_patch4_window7_224.yaml.
"""
import functools
import math

import torch

__all__ = ['RECIPES', 'release_loader_len', 'release_lr_per_update']

TRAIN_SIZE = 1281167  # ImageNet-1k train images (the plan's default --plan-train-size)

# config.py defaults the six recipes keep (no yaml or script overrides them).
EPOCHS = 300  # config.py L73 (main.py L60 `--epoch` default 300; config.py L217-218 keep it)
WARMUP_EPOCHS = 20  # config.py L74
WEIGHT_DECAY = 0.05  # config.py L75
BASE_LR, WARMUP_LR, MIN_LR = 5e-4, 5e-7, 5e-6  # config.py L76-78, before main.py L349-361 scale them
CLIP_GRAD = 5.0  # config.py L80
LABEL_SMOOTHING = 0.1  # config.py L51
DROP_RATE = 0.0  # config.py L47 (models/build.py passes it as drop_rate)
IMG_SIZE = 224  # config.py L21
INTERPOLATION = 'bicubic'  # config.py L23

# name -> (processes, per-process batch, --accumulation-steps (0: not given), apex opt level, DROP_PATH_RATE)
_RELEASE = {
    # README section 2; scripts/run_dwnet_tiny_patch4_window7_224.sh L12-13 (8 x 1 node), L22-23; yaml: 0.2
    'dwnet_tiny_patch4_window7_224': (8, 128, 0, 'O1', 0.2),
    # README section 2; scripts/run_dynamic_dwnet_tiny_patch4_window7_224.sh L12-13, L22-23; yaml: 0.2
    'dynamic_dwnet_tiny_patch4_window7_224': (8, 128, 0, 'O1', 0.2),
    # README section 2; scripts/run_dwnet_base_patch4_window7_224.sh at 4aa8326 L12-13 (8 x 2 nodes), L22-23; yaml 0.5
    'dwnet_base_patch4_window7_224': (16, 64, 0, 'O0', 0.5),
    # README section 2; scripts/run_dynamic_dwnet_base_patch4_window7_224.sh at 4aa8326 L12-13, L22-23; yaml: 0.5
    'dynamic_dwnet_base_patch4_window7_224': (16, 64, 0, 'O0', 0.5),
    # scripts/run_i_dynamic_dwnet_tiny_patch4_window7_224.sh L12-13, L22-24; its yaml: DROP_PATH_RATE 0.2, O0
    'i_dynamic_dwnet_tiny_patch4_window7_224': (8, 64, 2, 'O0', 0.2),
    # scripts/run_i_dynamic_dwnet_base_patch4_window7_224.sh L12-13, L22-24; its yaml: DROP_PATH_RATE 0.5, O0
    'i_dynamic_dwnet_base_patch4_window7_224': (16, 64, 2, 'O0', 0.5),
}


def release_loader_len(train_size, world_size, batch_size):
    """len(data_loader_train): DistributedSampler pads to ceil(N / W) samples per rank (data/build.py L79-81) and
    the DataLoader drops the last partial batch (data/build.py L86-92, drop_last=True)."""
    return math.ceil(train_size / world_size) // batch_size


def _release_cosine(t, lr, warmup_lr, min_lr, warmup_t, t_initial):
    """timm v0.4.12 CosineLRScheduler._get_lr (cosine_lr.py L68-95) for t_mul=1, decay_rate=1, cycle_limit=1 and
    warmup_prefix=False (lr_scheduler.py L14-23): a linear warm-up, then one cosine over [0, t_initial) measured from
    t=0 (the warm-up is inside the cosine's span), lr_min from t_initial on."""
    if t < warmup_t:
        return warmup_lr + t * ((lr - warmup_lr) / warmup_t)  # cosine_lr.py L63 (the step), L70
    if t // t_initial >= 1:  # cosine_lr.py L80, L88-93: past the one cycle
        return min_lr
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / t_initial))  # cosine_lr.py L89-91


def release_lr_per_update(loader_len, accum_steps, epochs, lr, warmup_lr, min_lr, warmup_epochs):
    """The LR that every optimizer.step() of the release's loop uses, in order.

    The scheduler counts loader iterations (micro-batches), not updates: t_initial = epochs x len(loader) and
    warmup_t = warmup_epochs x len(loader) (main.py L92 passes len(data_loader_train); lr_scheduler.py L8-9), and
    t_in_epochs=False (lr_scheduler.py L22) so only step_update moves it. Its constructor sets every group to
    warmup_lr (timm cosine_lr.py L62-64). The loop calls step_update(epoch * len(loader) + idx) right after
    optimizer.step() (main.py L197-200 with accumulation, L234-235 without), idx being the micro-batch just consumed:
    so an update uses the schedule at the index of the previous update's last micro-batch (the first two updates
    both run at warmup_lr without accumulation). With --accumulation-steps A > 1 a step is taken only where
    (idx + 1) % A == 0 (main.py L197); the micro-batches after the last such idx of an epoch are back-propagated but
    their gradient is dropped by the zero_grad() that opens the next epoch (main.py L146).
    """
    t_initial = int(epochs * loader_len)  # lr_scheduler.py L8
    warmup_t = int(warmup_epochs * loader_len)  # lr_scheduler.py L9
    current = warmup_lr  # timm cosine_lr.py L64: the constructor's value, in force before the first step_update
    lrs = []
    step_every = max(1, accum_steps)  # main.py L164: the accumulation branch only for A > 1
    for epoch in range(epochs):  # main.py L127 (START_EPOCH 0, config.py L72)
        for idx in range(loader_len):
            if (idx + 1) % step_every:
                continue
            lrs.append(current)
            current = _release_cosine(epoch * loader_len + idx, lr, warmup_lr, min_lr, warmup_t, t_initial)
    return lrs


def _release_param_groups(model_name, drop_path_rate):
    """optimizer.py L28-42 on our model's parameter names: no decay for 1-D parameters, names ending in '.bias',
    names in model.no_weight_decay() and names containing a model.no_weight_decay_keywords() keyword (optimizer.py
    L35-36). The release's DWNet returns {'absolute_pos_embed'} and {} (models/dwnet.py L379-385), and
    absolute_pos_embed exists only with APE, which is off (config.py L61). Every parameter trains (optimizer.py
    L33-34)."""
    import timm

    import models  # noqa: F401  (registers the DWNet entrypoints)

    skip = {'absolute_pos_embed'}  # release models/dwnet.py L379-381
    skip_keywords = ()  # release models/dwnet.py L383-385
    with torch.device('meta'):
        model = timm.create_model(model_name, drop_path_rate=drop_path_rate)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if len(param.shape) == 1 or name.endswith('.bias') or name in skip or any(k in name for k in skip_keywords):
            no_decay.append(name)
        else:
            decay.append(name)
    # optimizer.py L41-42: the first group takes the optimizer's weight_decay, the second 0
    return [
        {'weight_decay': WEIGHT_DECAY, 'lr_scale': 1.0, 'params': decay},
        {'weight_decay': 0.0, 'lr_scale': 1.0, 'params': no_decay},
    ]


def _release_optimizer(lr):
    """optimizer.py L21-23: torch AdamW(eps=1e-8, betas=(0.9, 0.999), lr=BASE_LR scaled, weight_decay=0.05)
    (config.py L100-104, L75); its hyper-parameters as torch builds them today."""
    probe = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr, eps=1e-8, betas=(0.9, 0.999),
                              weight_decay=WEIGHT_DECAY)
    # weight_decay: the groups' (param_groups) are what the release's update uses, and the plan compares those
    skip = ('foreach', 'fused', 'capturable', 'differentiable', 'maximize', 'weight_decay')
    return {'type': 'AdamW', **{k: v for k, v in probe.defaults.items() if k not in skip}}


def _release_train_transform():
    """data/build.py L134-143: timm create_transform(224, is_training=True, color_jitter=0.4,
    auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.25, re_mode='pixel', re_count=1, interpolation='bicubic')
    (config.py L21-23, L113-121), i.e. timm v0.4.12 transforms_imagenet_train, each step built from today's
    equivalent object."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS, RandAugment, rand_augment_ops
    from timm.data.random_erasing import RandomErasing
    from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation, str_to_pil_interp
    from torchvision import transforms

    hparams = {
        'translate_const': int(IMG_SIZE * 0.45),  # transforms_factory.py L85-87
        'img_mean': tuple(min(255, round(255 * x)) for x in IMAGENET_DEFAULT_MEAN),
        'interpolation': str_to_pil_interp(INTERPOLATION),  # transforms_factory.py L89-90
        'magnitude_std': 0.5,  # 'mstd0.5' (auto_augment.py L666-668)
    }
    # 'inc1' picks the increasing op list (auto_augment.py L669-671, L562-579); 'm9' the magnitude; 2 ops per image
    # (auto_augment.py L655) each applied with probability 0.5 (auto_augment.py L613-617)
    increasing_ops_v0412 = [
        'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing', 'SolarizeIncreasing', 'SolarizeAdd',
        'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing', 'ShearX', 'ShearY',
        'TranslateXRel', 'TranslateYRel']
    assert list(_RAND_INCREASING_TRANSFORMS) == increasing_ops_v0412
    rand_augment = RandAugment(rand_augment_ops(magnitude=9, prob=0.5, hparams=hparams,
                                                transforms=increasing_ops_v0412), num_layers=2)
    steps = [
        # transforms_factory.py L71-72: scale (0.08, 1), ratio (3/4, 4/3), bicubic
        RandomResizedCropAndInterpolation(IMG_SIZE, scale=(0.08, 1.0), ratio=(3. / 4., 4. / 3.),
                                          interpolation=INTERPOLATION),
        transforms.RandomHorizontalFlip(p=0.5),  # transforms_factory.py L73-74 (hflip 0.5; no vflip)
        rand_augment,  # transforms_factory.py L91-92; ColorJitter is skipped under auto-augment (L98)
        MaybeToTensor(),  # transforms_factory.py L115: torchvision ToTensor (the same on a PIL image)
        transforms.Normalize(mean=torch.tensor(IMAGENET_DEFAULT_MEAN), std=torch.tensor(IMAGENET_DEFAULT_STD)),  # L116
        # transforms_factory.py L120-122: per-pixel random erasing, p=0.25, one box
        RandomErasing(0.25, mode='pixel', max_count=1, num_splits=0, device='cpu'),
    ]
    return [repr(t) for t in steps]


def _release_eval_transform():
    """data/build.py L150-167 with TEST.CROP True (config.py L140): Resize(int(256 / 224 * 224) = 256, bicubic),
    CenterCrop(224), ToTensor, Normalize(ImageNet mean, std)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from timm.data.transforms import MaybeToTensor
    from torchvision import transforms

    size = int((256 / 224) * IMG_SIZE)  # data/build.py L153
    steps = [
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),  # L154-156 (PIL bicubic)
        transforms.CenterCrop(IMG_SIZE),  # L158
        MaybeToTensor(),  # L165: torchvision ToTensor (the same on a PIL image)
        # L166 passes the same constants as tuples; tensors normalise identically
        transforms.Normalize(mean=torch.tensor(IMAGENET_DEFAULT_MEAN), std=torch.tensor(IMAGENET_DEFAULT_STD)),
    ]
    return [repr(t) for t in steps]


@functools.cache
def _transforms():
    return _release_train_transform(), _release_eval_transform()


def _recipe(name, train_size=TRAIN_SIZE):
    world_size, batch_size, accum_arg, amp_level, drop_path_rate = _RELEASE[name]
    # config.py L85 default 0; L199-200 takes --accumulation-steps; main.py L164 accumulates only for > 1
    accum_steps = max(1, accum_arg)
    global_batch = batch_size * world_size * accum_steps
    # main.py L349-356: BASE_LR, WARMUP_LR and MIN_LR x batch x world / 512, then x accumulation steps (only if > 1)
    lr, warmup_lr, min_lr = (v * batch_size * world_size / 512.0 for v in (BASE_LR, WARMUP_LR, MIN_LR))
    if accum_steps > 1:
        lr, warmup_lr, min_lr = lr * accum_steps, warmup_lr * accum_steps, min_lr * accum_steps
    loader_len = release_loader_len(train_size, world_size, batch_size)
    lrs = release_lr_per_update(loader_len, accum_steps, EPOCHS, lr, warmup_lr, min_lr, WARMUP_EPOCHS)
    updates_per_epoch = loader_len // accum_steps  # main.py L197 (a trailing partial accumulation is dropped)
    train_transform, eval_transform = _transforms()
    return {
        'model': name,
        'model_kwargs': {},  # every architecture argument comes from the entrypoint (the release's yaml values)
        'world_size': world_size,
        'batch_size': batch_size,
        'grad_accum_steps': accum_steps,
        'global_batch': global_batch,
        'train_size': train_size,
        'updates_per_epoch': updates_per_epoch,
        'epochs': EPOCHS,  # main.py L127: epochs 0..299, nothing after the cosine
        'total_updates': updates_per_epoch * EPOCHS,
        'optimizer': _release_optimizer(lr),
        'param_groups': _release_param_groups(name, drop_path_rate),
        'lr': lrs,
        'temperature': None,  # DWNet has no attention temperature
        # main.py L94-96: mixup is on (config.py L123), so SoftTargetCrossEntropy, which smooths nothing itself;
        # the smoothing is in Mixup's targets (data/build.py L105-110)
        'loss': {
            'type': 'soft_target_cross_entropy',
            'label_smoothing': 0.0,
            'mixup': {
                'mixup_alpha': 0.8,  # config.py L123
                'cutmix_alpha': 1.0,  # config.py L125
                'cutmix_minmax': None,  # config.py L127
                'prob': 1.0,  # config.py L129
                'switch_prob': 0.5,  # config.py L131
                'mode': 'batch',  # config.py L133
                'label_smoothing': LABEL_SMOOTHING,  # data/build.py L110, config.py L51
            },
        },
        'aux_losses': [],
        # main.py L188-189 (accumulation: after every micro-batch's backward, on the gradient summed so far) and
        # L225-226 (no accumulation: once, before the step); norm 5.0 (config.py L80)
        'clip_grad': {'value': CLIP_GRAD, 'mode': 'norm', 'per_micro_batch': accum_steps > 1},
        'ema': None,  # main.py has no EMA
        # main.py L51 `--amp-opt-level` (default O1, overriding the yaml: config.py L203-204); apex O1 is fp16
        # autocast with dynamic loss scaling (main.py L81-82, L174-176, L211-213); O0 is fp32
        'amp': 'float16' if amp_level != 'O0' else None,
        'drop_rate': DROP_RATE,
        'drop_path_rate': drop_path_rate,
        # no SyncBatchNorm conversion in main.py; DDP(broadcast_buffers=False) (main.py L83) and no BN reduction:
        # each process keeps its own BatchNorm statistics, rank 0 saves its own (main.py L131-132)
        'sync_bn': False,
        'dist_bn': '',
        'train_transform': train_transform,
        'eval_transform': eval_transform,
    }


RECIPES = {f'configs/dwnet/{name}.yaml': functools.partial(_recipe, name) for name in _RELEASE}
