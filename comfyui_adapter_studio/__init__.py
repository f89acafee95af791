"""Adapter Studio nodes for ComfyUI: the studio's adapter families (IP-Adapter, AGD, ...) as ComfyUI nodes.

Install: copy or symlink this folder into `ComfyUI/custom_nodes/`, and install the studio into ComfyUI's Python
(`pip install adapter-studio`, or `pip install --no-deps -e /path/to/checkout` plus diffusers): the nodes run the
families' own code from `adapter_studio.adapters`. See docs/comfyui.md for the node list.

Weights are read from ComfyUI's models folder, one subfolder per family weights folder (`models/ip`, `models/agd`,
`models/ctrl`, `models/i2v`; ControlNets from `models/controlnet`), registered here with `folder_paths`.
"""

from __future__ import annotations

import logging

log = logging.getLogger("adapter_studio.comfyui")


def _register_folders() -> None:
    import os

    import folder_paths
    from adapter_studio.registry import families

    for fam in families():
        if not fam.comfy_nodes:
            continue
        for w in fam.weights:
            name = w.folder or fam.name
            if name not in folder_paths.folder_names_and_paths:
                folder_paths.folder_names_and_paths[name] = (
                    [os.path.join(folder_paths.models_dir, name)], set(folder_paths.supported_pt_extensions))


def _setup() -> None:
    try:
        _register_folders()
    except ImportError:  # imported outside ComfyUI (tests of the node interfaces): nothing to register
        return
    try:
        from .tiny_models import register

        register()
    except ImportError:
        pass


try:
    import adapter_studio  # noqa: F401
except ImportError as e:  # ComfyUI shows this line for the pack
    raise ImportError("comfyui_adapter_studio needs the adapter_studio package in ComfyUI's Python: "
                      "pip install adapter-studio (or pip install --no-deps -e /path/to/checkout, plus diffusers "
                      f"and opencv-python-headless); {e}") from e

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

_setup()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
