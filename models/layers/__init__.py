"""Dynamic-convolution layers shared by the model families."""
from timm.layers import register_notrace_module


def untraceable(cls):
    """Class decorator for a layer that torch.fx and TorchScript cannot follow (a custom op called from Python, checks
    on input sizes): fx keeps it as one leaf (timm's `register_notrace_module`, which timm's and torchvision's feature
    extractors honour), and `torch.jit.script` refuses it in one line."""
    def refuse_scripting(self):
        raise RuntimeError(f'{type(self).__name__} cannot be scripted by TorchScript (its forward calls custom ops '
                           f'from Python): use torch.compile or torch.export instead')
    cls.__prepare_scriptable__ = refuse_scripting
    return register_notrace_module(cls)
