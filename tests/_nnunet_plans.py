"""Small nnU-Net plans for the integration tests: the ``architecture`` dicts nnU-Net's planner writes
(2-D and 3-D, anisotropic strides and kernels), at sizes a CPU test can run."""
from __future__ import annotations

import copy

INSTANCE = {2: "torch.nn.modules.instancenorm.InstanceNorm2d", 3: "torch.nn.modules.instancenorm.InstanceNorm3d"}
BATCH = {2: "torch.nn.modules.batchnorm.BatchNorm2d", 3: "torch.nn.modules.batchnorm.BatchNorm3d"}
PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
REQ_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]

# (kernel sizes, strides, patch) per case: 3-D anisotropic as nnU-Net plans thick-slice MRI/CT
# (no pooling along the first axis at first, 1x3x3 kernels there), 2-D square
GEOMETRY = {
    3: ([[1, 3, 3], [3, 3, 3], [3, 3, 3]], [[1, 1, 1], [1, 2, 2], [2, 2, 2]], (8, 16, 12)),
    2: ([[3, 3], [3, 3], [3, 3]], [[1, 1], [2, 2], [2, 2]], (16, 20)),
}


def architecture(family: str, dims: int, norm: str = "instance", features=(4, 8, 12)) -> dict:
    kernels, strides, _ = GEOMETRY[dims]
    norm_op = {"instance": INSTANCE[dims], "batch": BATCH[dims], None: None}[norm]
    kwargs = {
        "n_stages": len(strides), "features_per_stage": list(features),
        "conv_op": f"torch.nn.modules.conv.Conv{dims}d", "kernel_sizes": copy.deepcopy(kernels),
        "strides": copy.deepcopy(strides), "n_conv_per_stage_decoder": [1] * (len(strides) - 1),
        "conv_bias": True, "norm_op": norm_op, "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    if family == "plain":
        kwargs["n_conv_per_stage"] = [2] * len(strides)
    else:
        kwargs["n_blocks_per_stage"] = [1, 2, 2]
    return {"network_class_name": PLAIN if family == "plain" else RESENC, "arch_kwargs": kwargs,
            "_kw_requires_import": list(REQ_IMPORT)}


def patch_size(dims: int):
    return GEOMETRY[dims][2]


def plans(architecture_3d: dict, architecture_2d: dict) -> dict:
    """A plans dict with ``2d`` and ``3d_fullres`` configurations (the keys nnU-Net reads)."""
    common = {"data_identifier": "nnUNetPlans_{}", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
              "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
              "resampling_fn_data": "resample_data_or_seg_to_shape",
              "resampling_fn_seg": "resample_data_or_seg_to_shape",
              "resampling_fn_data_kwargs": {}, "resampling_fn_seg_kwargs": {},
              "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
              "resampling_fn_probabilities_kwargs": {}, "batch_dice": True}
    configs = {}
    for name, arch, dims in (("2d", architecture_2d, 2), ("3d_fullres", architecture_3d, 3)):
        c = dict(common, architecture=arch, patch_size=list(patch_size(dims)),
                 spacing=[1.0] * dims, median_image_size_in_voxels=list(patch_size(dims)))
        c["data_identifier"] = c["data_identifier"].format(name)
        configs[name] = c
    return {"dataset_name": "Dataset990_Synth", "plans_name": "nnUNetPlans", "configurations": configs,
            "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
            "original_median_shape_after_transp": [8, 16, 12], "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {}}


DATASET_JSON = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 4,
                "file_ending": ".nii.gz"}
