"""``medattn-fast nnunet``: add-config | trainer-path | warm-start (nnU-Net is imported only when a
command runs)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="nnunet_cmd", required=True)
    p = sub.add_parser("add-config", help="add an attention-gated configuration to a dataset's plans",
                       description="Write a configuration (default <configuration>_attngate) into the plans that "
                                   "inherits <configuration> (and its preprocessed data) and builds the gated network. "
                                   "Then: nnUNetv2_train ID <name> FOLD, nnUNetv2_predict ... -c <name>.")
    p.add_argument("-d", "--dataset", required=True, help="dataset ID or name (DatasetXXX_Name)")
    p.add_argument("-c", "--configuration", required=True, help="the configuration to gate, e.g. 3d_fullres")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("--name", default=None, help="name of the new configuration (default <configuration>_attngate)")
    p.add_argument("--gate-from", default="coarse", choices=("coarse", "upsampled"),
                   help="gating signal: the coarser feature (Oktay) or the upsampled one (MONAI)")
    p.add_argument("--gate-inter-channels", type=int, default=None,
                   help="channels inside each gate (default: half the skip's)")
    p.add_argument("--preprocessed", default=None, help="nnU-Net's preprocessed folder (default $nnUNet_preprocessed)")
    p.add_argument("--overwrite", action="store_true", help="replace a configuration of that name")
    sub.add_parser("trainer-path", help="the folder to set as nnUNet_extTrainer for -tr nnUNetTrainerAttnGate")
    p = sub.add_parser("warm-start", help="a stock nnU-Net checkpoint -> the gated network's, for -pretrained_weights",
                       description="Build the gated network of the checkpoint's own plans and configuration, load "
                                   "the stock weights strictly and set the gates to pass the skips through (the "
                                   "network then equals the stock one), and save it for nnUNetv2_train ... "
                                   "-pretrained_weights OUT.")
    p.add_argument("checkpoint", help="stock checkpoint, e.g. .../fold_0/checkpoint_final.pth")
    p.add_argument("out", help="where to write the gated checkpoint")
    p.add_argument("--gate-from", default="coarse", choices=("coarse", "upsampled"))
    p.add_argument("--gate-inter-channels", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    try:
        if args.nnunet_cmd == "trainer-path":
            print(Path(__file__).resolve().parent / "trainers")
            return 0
        if args.nnunet_cmd == "add-config":
            from .plans import add_configuration_to_file, plans_file

            path = plans_file(args.dataset, args.plans, args.preprocessed)
            name = add_configuration_to_file(path, args.configuration, name=args.name, overwrite=args.overwrite,
                                             gate_from=args.gate_from, gate_inter_channels=args.gate_inter_channels)
            print(f"added configuration {name!r} (inherits {args.configuration!r} and its preprocessed data) to {path}")
            plans_flag = "" if args.plans == "nnUNetPlans" else f" -p {args.plans}"
            print(f"train:   nnUNetv2_train {args.dataset} {name} FOLD{plans_flag}")
            print(f"predict: nnUNetv2_predict -i IN -o OUT -d {args.dataset} -c {name}{plans_flag} -f FOLD")
            return 0
        from .warm_start import convert_checkpoint

        convert_checkpoint(args.checkpoint, args.out, gate_from=args.gate_from,
                           gate_inter_channels=args.gate_inter_channels)
        print(f"wrote {args.out}: the gated network, equal to the stock one at first; train it with "
              f"nnUNetv2_train ID CONFIG_attngate FOLD -pretrained_weights {args.out}")
        return 0
    except (ValueError, ImportError) as exc:
        print(f"medattn-fast nnunet {args.nnunet_cmd}: {exc}", file=sys.stderr)
        return 2
