"""Ctrl-Adapter and ControlNet: frozen ControlNets' residuals, fused over conditions, carried to any UNet."""

from .adapter import CtrlAdapter
from .blocks import CtrlAdapterBlock
from .family import FAMILY
from .formats import load_adapter_model, load_controlnet, load_ctrl_adapter, load_router
from .modeling_ctrl_adapter import CtrlAdapterModel
from .preprocessors import PREPROCESSORS, preprocess
from .residuals import ResidualLayout, select_residuals
from .router import CtrlRouter

__all__ = ["FAMILY", "PREPROCESSORS", "CtrlAdapter", "CtrlAdapterBlock", "CtrlAdapterModel", "CtrlRouter",
           "ResidualLayout", "load_adapter_model", "load_controlnet", "load_ctrl_adapter", "load_router", "preprocess",
           "select_residuals"]
