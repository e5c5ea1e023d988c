"""Dynamic-convolution layers shared by the model families."""
from timm.layers import register_notrace_module


def unscriptable(cls):
    """Class decorator for a layer TorchScript cannot compile (Python custom ops or autograd Functions in its
    forward): `torch.jit.script` refuses it in one line instead of failing inside it."""
    def refuse_scripting(self):
        raise RuntimeError(f'{type(self).__name__} cannot be scripted by TorchScript (its forward runs Python code '
                           f'TorchScript cannot compile): use torch.compile or torch.export instead')
    cls.__prepare_scriptable__ = refuse_scripting
    return cls


def untraceable(cls):
    """Class decorator for a layer that torch.fx cannot trace either (custom ops, checks on input sizes): fx keeps it
    as one leaf (timm's `register_notrace_module`, which timm's and torchvision's feature extractors honour)."""
    return register_notrace_module(unscriptable(cls))
