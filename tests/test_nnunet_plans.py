"""The plans route (``add_configuration`` / ``medattn-fast nnunet add-config``) and the ``-tr``
route (``nnUNetTrainerAttnGate`` found through ``nnUNet_extTrainer``). Skipped where nnU-Net is not
installed (CI's newest-torch stage installs it)."""
from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("nnunetv2", reason="nnU-Net v2 not installed (pip install \"medattn-fast[nnunet]\")")

from nnunetv2.utilities.plans_handling.plans_handler import PlansManager  # noqa: E402

from medattn_fast.cli import main  # noqa: E402
from medattn_fast.integrations import nnunet as integration  # noqa: E402

from _nnunet_plans import DATASET_JSON, architecture, plans  # noqa: E402


def _plans():
    return plans(architecture("resenc", 3), architecture("plain", 2))


def test_added_configuration_inherits_everything_but_the_network():
    p = _plans()
    before = copy.deepcopy(p)
    name = integration.add_configuration(p, "3d_fullres", gate_from="upsampled", gate_inter_channels=3)
    assert name == "3d_fullres_attngate"
    assert p["configurations"]["3d_fullres"] == before["configurations"]["3d_fullres"]   # parent untouched
    manager = PlansManager(p)
    gated, parent = manager.get_configuration(name), manager.get_configuration("3d_fullres")
    assert gated.data_identifier == parent.data_identifier == "nnUNetPlans_3d_fullres"
    assert gated.patch_size == parent.patch_size and gated.batch_size == parent.batch_size
    assert gated.network_arch_class_name == "medattn_fast.integrations.nnunet.AttentionGatedResidualEncoderUNet"
    kwargs = dict(gated.network_arch_init_kwargs)
    assert kwargs.pop("gate_from") == "upsampled" and kwargs.pop("gate_inter_channels") == 3
    assert kwargs == parent.network_arch_init_kwargs
    network = integration.build_network(p, name, DATASET_JSON)
    assert type(network).__name__ == "AttentionGatedResidualEncoderUNet"
    assert {g.x_conv.out_channels for g in network.decoder.gates} == {3}
    assert network.decoder.gate_from == "upsampled"


def test_add_configuration_errors():
    p = _plans()
    with pytest.raises(ValueError, match="configuration '3d_lowres' is not in the plans"):
        integration.add_configuration(p, "3d_lowres")
    integration.add_configuration(p, "2d")
    with pytest.raises(ValueError, match="already have a configuration '2d_attngate'.*--overwrite"):
        integration.add_configuration(p, "2d")
    integration.add_configuration(p, "2d", overwrite=True, gate_from="upsampled")
    p["configurations"]["2d"]["architecture"]["network_class_name"] = "torch.nn.Conv2d"
    with pytest.raises(ValueError, match="no gated variant of <class 'torch.nn.modules.conv.Conv2d'>"):
        integration.add_configuration(p, "2d", name="other")


def test_cli_add_config_writes_the_plans_file(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "Dataset990_Synth"
    folder.mkdir()
    (folder / "nnUNetPlans.json").write_text(json.dumps(_plans()))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    assert main(["nnunet", "add-config", "-d", "990", "-c", "3d_fullres"]) == 0
    out = capsys.readouterr().out
    assert "nnUNetv2_train 990 3d_fullres_attngate FOLD" in out
    written = json.loads((folder / "nnUNetPlans.json").read_text())
    assert written["configurations"]["3d_fullres_attngate"]["inherits_from"] == "3d_fullres"
    assert main(["nnunet", "add-config", "-d", "990", "-c", "3d_fullres"]) == 2
    assert "already have a configuration" in capsys.readouterr().err
    assert main(["nnunet", "add-config", "-d", "990", "-c", "2d", "-p", "OtherPlans"]) == 2
    assert "no plans at" in capsys.readouterr().err


def test_trainer_found_through_nnunet_ext_trainer(capsys, monkeypatch):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities import find_objects

    assert main(["nnunet", "trainer-path"]) == 0
    folder = capsys.readouterr().out.strip()
    monkeypatch.setenv("nnUNet_extTrainer", folder)
    for name, gate_from in (("nnUNetTrainerAttnGate", "coarse"), ("nnUNetTrainerAttnGateMONAI", "upsampled")):
        cls = find_objects.recursive_find_trainer_class_by_name(name)
        assert issubclass(cls, nnUNetTrainer) and cls.gate_from == gate_from
        manager = PlansManager(_plans())
        network = cls.build_network_architecture(manager, manager.get_configuration("2d"), 1, 3,
                                                 enable_deep_supervision=False)
        assert type(network).__name__ == "AttentionGatedPlainConvUNet" and network.decoder.gate_from == gate_from
        assert isinstance(network(torch.randn(1, 1, 16, 20)), torch.Tensor)   # deep supervision off
