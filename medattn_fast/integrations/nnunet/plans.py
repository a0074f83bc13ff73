r"""nnU-Net plans: a configuration that selects the attention-gated network, and building a
network from plans.

nnU-Net builds its network from the plans' ``configurations[<name>]["architecture"]``:
``network_class_name`` (a dotted path resolved with ``pydoc.locate``), ``arch_kwargs`` and
``_kw_requires_import``. A configuration may ``inherits_from`` another and override keys. So
:func:`add_configuration` writes::

    "3d_fullres_attngate": {
        "inherits_from": "3d_fullres",
        "architecture": {"network_class_name": "medattn_fast.integrations.nnunet.AttentionGatedPlainConvUNet",
                         "arch_kwargs": {<the parent's>, "gate_from": "coarse", ...},
                         "_kw_requires_import": <the parent's>}
    }

Everything else (patch size, batch size, spacing, normalisation, and the preprocessed data, named
by the inherited ``data_identifier``) is the parent's: ``nnUNetv2_train ID 3d_fullres_attngate
FOLD`` trains on the data already preprocessed for ``3d_fullres``, with nnU-Net's own trainer.
"""
from __future__ import annotations

import copy
import json
import os
import pydoc
from pathlib import Path
from typing import Any, Dict, Optional, Union

from torch import nn

from .networks import GATE_FROM, dotted_name, gated_class_for

__all__ = ["SUFFIX", "add_configuration", "add_configuration_to_file", "build_network", "gated_architecture",
           "plans_file"]

SUFFIX = "_attngate"


def gated_architecture(architecture: Dict[str, Any], *, gate_from: str = "coarse", gate_inter_channels=None,
                       gate_backend: Optional[str] = None) -> Dict[str, Any]:
    """A plans ``architecture`` dict with the stock network class replaced by its gated
    counterpart and the gate's arguments added to ``arch_kwargs`` (a new dict; ValueError for a
    network without a gated variant)."""
    if gate_from not in GATE_FROM:
        raise ValueError(f"nnunet add-config: gate_from must be one of {GATE_FROM}, got {gate_from!r}")
    name = architecture.get("network_class_name")
    stock = pydoc.locate(name) if isinstance(name, str) else None
    if stock is None:
        raise ValueError(f"nnunet add-config: cannot import the configuration's network class {name!r}")
    gated = copy.deepcopy(architecture)
    gated["network_class_name"] = dotted_name(gated_class_for(stock))
    gate = {"gate_from": gate_from, "gate_inter_channels": gate_inter_channels}
    if gate_backend is not None:
        gate["gate_backend"] = gate_backend
    gated["arch_kwargs"] = dict(gated.get("arch_kwargs", {}), **gate)
    return gated


def _resolved(plans: Dict[str, Any], name: str, seen=()) -> Dict[str, Any]:
    """A configuration with its ``inherits_from`` chain applied (as nnU-Net resolves it)."""
    configurations = plans.get("configurations", {})
    if name not in configurations:
        raise ValueError(f"nnunet add-config: configuration {name!r} is not in the plans; they have "
                         f"{sorted(configurations)}")
    if name in seen:
        raise ValueError(f"nnunet add-config: circular inherits_from: {' -> '.join((*seen, name))}")
    config = copy.deepcopy(configurations[name])
    parent = config.get("inherits_from")
    if parent is None:
        return config
    base = _resolved(plans, parent, (*seen, name))
    base.update(config)
    return base


def add_configuration(plans: Dict[str, Any], configuration: str, *, name: Optional[str] = None,
                      overwrite: bool = False, **gate_kwargs) -> str:
    """Add to ``plans`` (in place) a configuration that inherits ``configuration`` and builds its
    network gated (module docstring). ``name`` defaults to ``configuration + "_attngate"``;
    ``gate_kwargs``: ``gate_from``, ``gate_inter_channels``, ``gate_backend``. An existing
    configuration of that name is replaced only with ``overwrite`` (ValueError otherwise).
    Returns the new configuration's name."""
    name = name or configuration + SUFFIX
    if name == configuration:
        raise ValueError(f"nnunet add-config: the new configuration needs a name other than {configuration!r}")
    if name in plans.get("configurations", {}) and not overwrite:
        raise ValueError(f"nnunet add-config: the plans already have a configuration {name!r} "
                         f"(--overwrite to replace it)")
    parent = _resolved(plans, configuration)
    if "architecture" not in parent:
        raise ValueError(f"nnunet add-config: configuration {configuration!r} has no 'architecture' (plans of "
                         f"nnU-Net < 2.4: re-plan with nnUNetv2_plan_experiment)")
    plans["configurations"][name] = {
        "inherits_from": configuration,
        "architecture": gated_architecture(parent["architecture"], **gate_kwargs),
    }
    return name


def plans_file(dataset: Union[int, str], plans_identifier: str = "nnUNetPlans",
               preprocessed: Optional[Union[str, Path]] = None) -> Path:
    """``$nnUNet_preprocessed/<DatasetXXX_Name>/<plans_identifier>.json`` for a dataset ID or name."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    root = preprocessed or os.environ.get("nnUNet_preprocessed")
    if not root:
        raise ValueError("nnunet add-config: set nnUNet_preprocessed (nnU-Net's preprocessed-data folder) "
                         "or pass --preprocessed")
    dataset_name = maybe_convert_to_dataset_name(int(dataset) if str(dataset).isdigit() else dataset)
    path = Path(root) / dataset_name / f"{plans_identifier}.json"
    if not path.is_file():
        raise ValueError(f"nnunet add-config: no plans at {path} (run nnUNetv2_plan_and_preprocess first)")
    return path


def add_configuration_to_file(path: Union[str, Path], configuration: str, **kwargs) -> str:
    """:func:`add_configuration` on a plans JSON file, rewritten in place (atomically)."""
    path = Path(path)
    plans = json.loads(path.read_text())
    name = add_configuration(plans, configuration, **kwargs)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(plans, indent=4, sort_keys=False))
    os.replace(tmp, path)
    return name


def build_network(plans: Dict[str, Any], configuration: str, dataset_json: Dict[str, Any], *,
                  gated: bool = False, gate_kwargs: Optional[Dict[str, Any]] = None,
                  deep_supervision: bool = True) -> nn.Module:
    """The network nnU-Net trains for ``configuration`` of ``plans`` (input channels and
    segmentation heads from ``dataset_json``), built by nnU-Net's ``get_network_from_plans`` and
    initialised as nnU-Net does; ``gated``: its attention-gated counterpart (``gate_kwargs`` as
    :func:`gated_architecture`'s)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(copy.deepcopy(plans))
    config = manager.get_configuration(configuration)
    architecture = config.configuration["architecture"]
    if gated:
        architecture = gated_architecture(architecture, **(gate_kwargs or {}))
    return get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                  architecture["_kw_requires_import"],
                                  determine_num_input_channels(manager, config, dataset_json),
                                  manager.get_label_manager(dataset_json).num_segmentation_heads,
                                  allow_init=True, deep_supervision=deep_supervision)
