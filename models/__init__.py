"""Registers every model family of the project into timm's registry on import."""
from . import ddf_resnet
from . import dwnet
from . import g_resnext
from . import od_mobilenetv2
from . import od_resnet
from . import rednet
