"""The training loop's modules beside train.py; validate.py and the scripts share its command-line pieces.

options      train.py's parser, YAML configs as its defaults, LR scaling and the checks of a resolved run
plan         what a run resolves to (TrainingSchedule, loss, mixup, transforms, groups), shared by the loop and --plan
evaluate     the one evaluation loop (loss, top-1, top-5) of train.py, validate.py and reproduce.py
cli          one error type for bad user input and its one-line exit, model-name check, AMP dtype, ImageFolder splits
hooks        the training-hook protocol models implement, and the one helper that runs it
resume       exact resume: RNG states, the position inside an epoch, recovery files, the saver's extra state
skips        which unreadable images timm's ImageDataset skipped, from the dataset's own reads
distributed  small collectives and fingerprints used to compare processes
"""
