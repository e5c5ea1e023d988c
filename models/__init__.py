"""The project's model families: importing this package registers every model into timm's registry.

`FAMILIES` maps each family to the modules that register its models; `MODULES` lists their names (timm groups the
entrypoints by them: `timm.list_models(module=MODULES)`). `load_weights` loads any checkpoint of these models, this
project's or an original release's.
"""
from . import ddf_resnet, dwnet, g_resnext, od_mobilenetv2, od_resnet, rednet
from ._helpers import load_weights

__all__ = ['FAMILIES', 'MODULES', 'load_weights']

FAMILIES = {'ddf': (ddf_resnet,), 'odconv': (od_resnet, od_mobilenetv2), 'dwnet': (dwnet,), 'dgconv': (g_resnext,),
            'involution': (rednet,)}
MODULES = tuple(module.__name__.rpartition('.')[2] for modules in FAMILIES.values() for module in modules)
