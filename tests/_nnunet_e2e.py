"""A tiny nnU-Net v2 run through its Python API with the attention-gated network, on synthetic
volumes: fingerprint, plan, preprocess, ``add_configuration`` (3d_fullres_attngate), 1 epoch of
2 iterations with nnU-Net's stock trainer on the CPU, then prediction with nnU-Net's predictor.

    python tests/_nnunet_e2e.py WORKDIR     (prints one JSON line of what it found)

Run in a process of its own by ``tests/test_nnunet_end_to_end.py``: nnU-Net < 2.8 reads its
folders from the environment at import.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

DATASET_ID = 991
DATASET = f"Dataset{DATASET_ID}_MedattnSynth"
# thick slices along the first axis: nnU-Net plans anisotropic strides and kernels for them
SHAPE, SPACING = (12, 40, 36), (3.0, 1.0, 1.0)


def make_raw(raw: Path, cases: int = 4) -> Path:
    """``cases`` volumes of a noisy bright ellipsoid (label 1) with a brighter core (label 2)."""
    import numpy as np
    import SimpleITK as sitk

    folder = raw / DATASET
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    for i in range(cases):
        centre = [n / 2 + rng.uniform(-2, 2) for n in SHAPE]
        radius = [n / rng.uniform(3.0, 4.0) for n in SHAPE]
        d = sum(((c - m) / r) ** 2 for c, m, r in zip((z, y, x), centre, radius))
        label = (d < 1).astype(np.uint8) + (d < 0.3).astype(np.uint8)
        image = (label * 1.5 + rng.normal(0, 0.5, SHAPE)).astype(np.float32)
        for array, path in ((image, folder / "imagesTr" / f"case_{i:03d}_0000.nii.gz"),
                            (label, folder / "labelsTr" / f"case_{i:03d}.nii.gz")):
            itk = sitk.GetImageFromArray(array)
            itk.SetSpacing(tuple(reversed(SPACING)))   # SimpleITK spacing is x, y, z
            sitk.WriteImage(itk, str(path))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "shell": 1, "core": 2},
        "numTraining": cases, "file_ending": ".nii.gz"}))
    return folder


def main(workdir: str) -> dict:
    work = Path(workdir)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[name] = str(work / name)
    os.environ["nnUNet_n_proc_DA"] = "1"   # the planner sets torch's threads to it (0 is refused there)
    os.environ["nnUNet_compile"] = "f"
    raw = make_raw(work / "nnUNet_raw")
    timings = {}

    import torch
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from medattn_fast.integrations.nnunet import AttentionGatedPlainConvUNet, add_configuration_to_file

    start = time.perf_counter()
    extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=True, verbose=False)
    plan_experiments([DATASET_ID])
    preprocess([DATASET_ID], configurations=("3d_fullres",), num_processes=(1,), verbose=False)
    timings["plan_and_preprocess_s"] = time.perf_counter() - start

    plans_path = work / "nnUNet_preprocessed" / DATASET / "nnUNetPlans.json"
    config = add_configuration_to_file(plans_path, "3d_fullres")
    plans = json.loads(plans_path.read_text())
    plans["continue_training"] = False   # what nnUNetv2_train's argument parsing adds (nnU-Net >= 2.8 reads it)
    dataset_json = json.loads((work / "nnUNet_preprocessed" / DATASET / "dataset.json").read_text())

    start = time.perf_counter()
    os.environ["nnUNet_n_proc_DA"] = "0"   # augment in this process: no worker processes on 2 cores
    trainer = nnUNetTrainer(plans=plans, configuration=config, fold="all", dataset_json=dataset_json,
                            device=torch.device("cpu"))
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 1, 2, 1
    trainer.run_training()
    timings["train_s"] = time.perf_counter() - start
    network = trainer.network
    strides = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["strides"]
    checkpoint = Path(trainer.output_folder) / "checkpoint_final.pth"

    start = time.perf_counter()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"),
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(Path(trainer.output_folder).parent), use_folds=("all",),
                                                   checkpoint_name="checkpoint_final.pth")
    out = work / "prediction"
    out.mkdir()
    predictor.predict_from_files_sequential(str(raw / "imagesTr"), str(out), save_probabilities=False,
                                            overwrite=True)
    timings["predict_s"] = time.perf_counter() - start

    import numpy as np
    import SimpleITK as sitk

    predicted = sorted(out.glob("*.nii.gz"))
    first = sitk.GetArrayFromImage(sitk.ReadImage(str(predicted[0]))) if predicted else np.zeros(0)
    return {
        "configuration": config,
        "trained_network": type(network).__name__,
        "is_gated": isinstance(network, AttentionGatedPlainConvUNet),
        "gates": len(network.decoder.gates),
        "gate_norms": sorted({str(g.norm) for g in network.decoder.gates}),
        "strides": strides,
        "checkpoint_keys_with_gates": sum(".gates." in k for k in torch.load(checkpoint, map_location="cpu",
                                                                                 weights_only=False)["network_weights"]),
        "predictor_network": type(predictor.network).__name__,
        "predictions": len(predicted),
        "prediction_shape": list(first.shape),
        "prediction_labels": sorted(int(v) for v in np.unique(first)),
        "data_identifier": trainer.configuration_manager.data_identifier,
        "timings": timings,
    }


if __name__ == "__main__":
    result = main(sys.argv[1])
    print("E2E_RESULT " + json.dumps(result))
