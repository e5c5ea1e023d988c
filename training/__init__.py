"""The training loop's modules beside train.py; validate.py and the scripts share its command-line pieces.

cli          one error type for bad user input and its one-line exit, model-name check, AMP dtype, ImageFolder splits
hooks        the training-hook protocol models implement, and the one helper that runs it
resume       exact resume: RNG states, the position inside an epoch, recovery files, the saver's extra state
distributed  small collectives and fingerprints used to compare processes
"""
