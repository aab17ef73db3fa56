"""Load the weights of MONAI's SegResNet into dgseg's (same tensors, other names).

dgseg's :class:`~dgseg.models.SegResNet` has the parameters of MONAI's
``monai.networks.nets.SegResNet`` (no VAE) with the same shapes; only the module paths differ,
because dgseg's convolutions are not wrapped in MONAI's ``Convolution`` blocks:

    convInit.conv.*                    -> conv_init.*
    <block>.conv1.conv.*, .conv2.conv.* -> <block>.conv1.*, .conv2.*
    up_samples.<i>.0.conv.*            -> up_samples.<i>.conv.*
    conv_final.0.* (norm)              -> final.norm.*
    conv_final.2.conv.*                -> final.conv.*

Everything else (down_layers, up_layers, norms) keeps its name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["monai_to_dgseg_key", "from_monai_state_dict"]


def monai_to_dgseg_key(key: str) -> str:
    """The dgseg SegResNet parameter name of MONAI SegResNet parameter ``key``."""
    k = key.replace("convInit.conv.", "conv_init.")
    k = re.sub(r"\.(conv[12])\.conv\.", r".\1.", k)  # residual-block convolutions
    k = re.sub(r"^up_samples\.(\d+)\.0\.conv\.", r"up_samples.\1.conv.", k)
    return k.replace("conv_final.0.", "final.norm.").replace("conv_final.2.conv.", "final.conv.")


def from_monai_state_dict(state: Mapping[str, Any]) -> dict[str, Any]:
    """A MONAI SegResNet state dict renamed for ``dgseg.models.SegResNet.load_state_dict``."""
    return {monai_to_dgseg_key(k): v for k, v in state.items()}
