"""The training entry point: phantom and folder datasets, the PNG writer, the loss, checkpoint
resume, DDP on CPU (gloo) and a short training run that must learn the easy phantoms."""
import json
import socket
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from medattn_fast import cli
from medattn_fast import train as T
from medattn_fast.data import FolderDataset, PhantomDataset
from medattn_fast.png import PNG_SIGNATURE, encode_png, snapshot_panels, write_png

# the smallest Attention U-Net that still has a gate: two levels, a 4 -> 8 channel encoder
TINY_UNET = {"channels": (4, 8), "strides": (2,)}


def tiny_config(tmp_path, **overrides) -> T.TrainConfig:
    """A config that trains in well under a second per step on one CPU core."""
    settings = dict(model="attention_unet", data="phantoms2d", out=str(tmp_path / "run"), steps=4, batch_size=2,
                    lr=3e-3, num_classes=3, size=(16, 16), dataset_length=8, model_kwargs=dict(TINY_UNET),
                    save_every=0, snapshot_every=0, log_every=1, quiet=True, backend="torch")
    settings.update(overrides)
    return T.TrainConfig(**settings)


# ------------------------------------------------------------------------------------------------
# phantoms
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(24, 17), (10, 12, 7)], ids=["2d", "3d"])
def test_phantoms_deterministic_shapes_and_labels(size):
    kwargs = dict(num_classes=4, in_channels=2, seed=3)
    first, second = PhantomDataset(6, size, **kwargs), PhantomDataset(6, size, **kwargs)
    for index in (0, 5, 2):  # any access order gives the same item
        image, label = first[index]
        again_image, again_label = second[index]
        assert image.dtype == torch.float32 and image.shape == (2,) + size
        assert label.dtype == torch.int64 and label.shape == size
        assert torch.equal(image, again_image) and torch.equal(label, again_label)
        assert 0 <= int(label.min()) and int(label.max()) <= 3
        assert int(label.max()) >= 1  # some foreground in every item
        assert torch.isfinite(image).all()
    assert not torch.equal(first[0][1], first[1][1])                          # items differ
    assert not torch.equal(first[0][0], PhantomDataset(6, size, **{**kwargs, "seed": 4})[0][0])  # seeds differ
    assert torch.equal(first[-1][0], first[5][0])


def test_phantoms_each_class_has_its_intensity_without_noise_or_bias():
    dataset = PhantomDataset(4, (32, 32), num_classes=3, noise_std=0.0, bias_strength=0.0, seed=1)
    image, label = dataset[0]
    assert torch.all(image[0][label == 0] == 0)
    for k in (1, 2):
        values = image[0][label == k]
        if values.numel():  # jitter ±0.05 around the class level
            assert abs(float(values.mean()) - dataset.class_intensity[k - 1, 0]) <= 0.05 + 1e-6


def test_phantoms_bias_field_is_smooth_and_positive():
    plain = PhantomDataset(2, (32, 32), noise_std=0.0, bias_strength=0.0, seed=2)[1][0]
    biased = PhantomDataset(2, (32, 32), noise_std=0.0, bias_strength=0.5, seed=2)[1][0]
    foreground = plain != 0
    gain = biased[foreground] / plain[foreground]
    assert float(gain.min()) >= np.exp(-0.5) - 1e-5 and float(gain.max()) <= np.exp(0.5) + 1e-5
    assert float(gain.max() - gain.min()) > 0.05


@pytest.mark.parametrize("kwargs, message", [
    (dict(spatial_size=(8,)), "argument 'spatial_size' must be 2 or 3 ints"),
    (dict(num_classes=1), "argument 'num_classes' must be an int >= 2, got 1"),
    (dict(in_channels=0), "argument 'in_channels' must be an int >= 1, got 0"),
    (dict(num_shapes=(3, 2)), "argument 'num_shapes' must be a pair of ints 1 <= min <= max, got \\(3, 2\\)"),
    (dict(radius_range=(0.5, 0.1)), "argument 'radius_range' must satisfy"),
    (dict(noise_std=-1.0), "argument 'noise_std' must be >= 0, got -1.0"),
    (dict(blob_fraction=2.0), "argument 'blob_fraction' must be in \\[0, 1\\], got 2.0"),
])
def test_phantoms_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PhantomDataset(4, **kwargs)


def test_phantoms_index_out_of_range():
    with pytest.raises(IndexError, match="index 4 out of range for length 4"):
        PhantomDataset(4, (8, 8))[4]


# ------------------------------------------------------------------------------------------------
# folder datasets
# ------------------------------------------------------------------------------------------------
def test_folder_pairs_npy_and_npz(tmp_path):
    rng = np.random.default_rng(0)
    image_a, mask_a = rng.standard_normal((12, 10)), rng.integers(0, 3, (12, 10))
    image_b, mask_b = rng.standard_normal((2, 12, 10)), rng.integers(0, 2, (12, 10)).astype(np.float32)
    np.save(tmp_path / "a_img.npy", image_a)
    np.save(tmp_path / "a_mask.npy", mask_a)
    np.savez(tmp_path / "b.npz", image=image_b, label=mask_b)
    (tmp_path / "notes.txt").write_text("ignored")
    dataset = FolderDataset(tmp_path, normalize=False)
    assert len(dataset) == 2 and dataset.num_classes() == 3
    image, label = dataset[0]
    assert image.dtype == torch.float32 and image.shape == (1, 12, 10)
    assert torch.allclose(image[0], torch.from_numpy(image_a).float())
    assert label.dtype == torch.int64 and torch.equal(label, torch.from_numpy(mask_a))
    image, label = dataset[1]
    assert image.shape == (2, 12, 10) and torch.equal(label, torch.from_numpy(mask_b).long())
    normalized = FolderDataset(tmp_path)[1][0]
    assert torch.allclose(normalized.mean((1, 2)), torch.zeros(2), atol=1e-5)
    assert torch.allclose(normalized.std((1, 2), unbiased=False), torch.ones(2), atol=1e-3)


def test_folder_random_crops_pad_and_follow_the_epoch(tmp_path):
    rng = np.random.default_rng(1)
    np.save(tmp_path / "c_img.npy", rng.standard_normal((6, 20, 9)))
    np.save(tmp_path / "c_mask.npy", rng.integers(0, 2, (6, 20, 9)))
    dataset = FolderDataset(tmp_path, crop_size=(8, 8, 8), seed=5)
    image, label = dataset[0]
    assert image.shape == (1, 8, 8, 8) and label.shape == (8, 8, 8)
    assert torch.equal(dataset[0][0], image)  # same (seed, epoch, index): same crop
    crops = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        crops.add(dataset[0][0].sum().item())
    assert len(crops) > 1


def test_folder_missing_mask_is_named(tmp_path):
    np.save(tmp_path / "lonely_img.npy", np.zeros((4, 4)))
    with pytest.raises(ValueError, match="'lonely_img.npy' has no label file: expected 'lonely_mask.npy'"):
        FolderDataset(tmp_path)


def test_folder_empty_and_bad_npz(tmp_path):
    with pytest.raises(ValueError, match="no cases in"):
        FolderDataset(tmp_path)
    np.savez(tmp_path / "x.npz", img=np.ones((4, 4)), label=np.ones((4, 4)))
    with pytest.raises(ValueError,
                       match=r"must hold arrays 'image' and 'label' \(or 'mask'\), got keys \['img', 'label'\]"):
        FolderDataset(tmp_path)[0]


def test_folder_shape_mismatch_and_fractional_labels(tmp_path):
    np.save(tmp_path / "a_img.npy", np.ones((4, 5)))
    np.save(tmp_path / "a_mask.npy", np.ones((4, 6), np.int64))
    with pytest.raises(ValueError, match=r"image shape \(1, 4, 5\) does not match label shape \(4, 6\)"):
        FolderDataset(tmp_path)[0]
    np.save(tmp_path / "a_mask.npy", np.full((4, 5), 0.5))
    with pytest.raises(ValueError, match="must hold integer class ids"):
        FolderDataset(tmp_path)[0]


def test_folder_nifti_without_nibabel_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "a_img.nii.gz").write_bytes(b"")
    (tmp_path / "a_mask.nii.gz").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "nibabel", None)  # import nibabel -> ImportError
    dataset = FolderDataset(tmp_path)  # listing the cases does not need nibabel
    with pytest.raises(ImportError,
                       match=r"needs nibabel, which is not installed: pip install 'medattn-fast\[nifti\]'"):
        dataset[0]


# ------------------------------------------------------------------------------------------------
# PNG writer
# ------------------------------------------------------------------------------------------------
def _read_png(data: bytes):
    """Minimal decoder for what encode_png writes: checks every CRC, returns (IHDR fields, rows)."""
    assert data[:8] == PNG_SIGNATURE
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks.append((kind, body))
        pos += 12 + length
    assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    header = struct.unpack(">IIBBBBB", chunks[0][1])
    return header, zlib.decompress(chunks[1][1])


@pytest.mark.parametrize("shape, color_type", [((7, 13), 0), ((5, 11, 3), 2)], ids=["grey", "rgb"])
def test_png_roundtrip(tmp_path, shape, color_type):
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    path = write_png(tmp_path / "p.png", pixels)
    (width, height, depth, ctype, compression, filt, interlace), raw = _read_png(path.read_bytes())
    assert (width, height, depth, ctype, compression, filt, interlace) == (shape[1], shape[0], 8, color_type, 0, 0, 0)
    rows = np.frombuffer(raw, np.uint8).reshape(height, -1)
    assert np.all(rows[:, 0] == 0)  # filter byte "None" on every row
    np.testing.assert_array_equal(rows[:, 1:].reshape(shape), pixels)


def test_png_bad_input():
    with pytest.raises(TypeError, match="argument 'pixels' must be uint8, got float32"):
        encode_png(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match=r"argument 'pixels' must have shape \(H, W\) or \(H, W, 3\), got \(2, 2, 4\)"):
        encode_png(np.zeros((2, 2, 4), np.uint8))
    with pytest.raises(ValueError, match=r"must not be empty, got \(0, 3\)"):
        encode_png(np.zeros((0, 3), np.uint8))


@pytest.mark.parametrize("dims", [2, 3])
def test_snapshot_panels_side_by_side(dims):
    size = (6, 10, 8)[-dims:]
    rng = np.random.default_rng(dims)
    image, label = rng.standard_normal((2,) + size), rng.integers(0, 3, size)
    coarse = rng.random((1,) + tuple(s // 2 for s in size))
    strip = snapshot_panels(image, label, label, [coarse, rng.random(size)], separator=2)
    height, width = size[-2:]
    # input, label, prediction, two attention maps
    assert strip.dtype == np.uint8 and strip.shape == (height, 5 * width + 4 * 2, 3)
    # label and prediction panels are identical; background is black
    np.testing.assert_array_equal(strip[:, width + 2:2 * width + 2], strip[:, 2 * width + 4:3 * width + 4])
    middle = label[size[0] // 2] if dims == 3 else label
    assert np.all(strip[:, width + 2:2 * width + 2][middle == 0] == 0)


# ------------------------------------------------------------------------------------------------
# loss and metric
# ------------------------------------------------------------------------------------------------
def test_dice_ce_loss_matches_the_formula():
    logits = torch.randn(3, 4, 5, 7, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 4, (3, 5, 7))
    loss = T.DiceCELoss(smooth=1e-5)(logits, target)
    probs = logits.detach().softmax(1)  # float64 logits: the loss is computed in float64
    expected = torch.nn.functional.cross_entropy(logits.detach(), target)
    dice_terms = []
    for b in range(3):
        for k in range(1, 4):
            p, g = probs[b, k], (target[b] == k).double()
            dice_terms.append((2 * (p * g).sum() + 1e-5) / (p.sum() + g.sum() + 1e-5))
    expected = expected + 1 - torch.stack(dice_terms).mean()
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_dice_ce_loss_bad_shapes():
    with pytest.raises(ValueError, match=r"expected logits \(B, K, \*S\) and target \(B, \*S\), "
                                         r"got \(2, 3, 4, 4\) and \(2, 4, 5\)"):
        T.DiceCELoss()(torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 5, dtype=torch.long))


def test_dice_scores_pool_counts():
    prediction = torch.tensor([[0, 1, 1, 2]])
    target = torch.tensor([[0, 1, 2, 2]])
    counts = T.dice_counts(prediction, target, 4)  # class 3 absent from both: not scored
    assert counts.tolist() == [[1.0, 3.0], [1.0, 3.0], [0.0, 0.0]]
    assert T.dice_scores(counts) == pytest.approx(2 / 3)
    assert T.dice_scores(torch.zeros(2, 2)) == 1.0


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------
def test_unknown_and_unavailable_models(monkeypatch):
    with pytest.raises(ValueError, match="unknown model 'resnet'; choose one of"):
        T.build_model("resnet", spatial_dims=2, in_channels=1, num_classes=2)
    monkeypatch.setitem(T.MODELS, "ghost", T.ModelSpec("GhostNet", "ghost_net", (2,)))
    with pytest.raises(ValueError, match="needs medattn_fast.models.GhostNet, which this installation"):
        T.build_model("ghost", spatial_dims=2, in_channels=1, num_classes=2)


def test_build_model_maps_generic_arguments():
    model = T.build_model("attention_unet", spatial_dims=3, in_channels=2, num_classes=5, overrides=TINY_UNET)
    assert (model.spatial_dims, model.in_channels, model.out_channels, model.channels) == (3, 2, 5, (4, 8))
    with pytest.raises(ValueError, match="AttentionUNet takes no argument\\(s\\) \\['depth'\\]"):
        T.build_model("attention_unet", spatial_dims=2, in_channels=1, num_classes=2, overrides={"depth": 3})
    mtunet = T.build_model("mtunet", spatial_dims=2, in_channels=2, num_classes=4)  # other argument names
    assert (mtunet.in_channels, mtunet.num_classes, mtunet.base_channels) == (2, 4, 16)
    with pytest.raises(ValueError, match="model 'mtunet' supports spatial_dims \\(2,\\), the data has 3"):
        T.build_model("mtunet", spatial_dims=3, in_channels=1, num_classes=2)


@pytest.mark.parametrize("name", sorted(T.MODELS))
def test_every_registered_model_builds_from_its_defaults_and_segments(name):
    model = T.build_model(name, spatial_dims=2, in_channels=2, num_classes=3).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 2, 32, 32))
    assert logits.shape == (1, 3, 32, 32) and torch.isfinite(logits).all()


def test_training_loss_of_a_structured_output_uses_the_models_objective():
    class Outputs(tuple):
        def average(self):
            return (self[0] + self[1]) / 2

    class DeepSupervised(torch.nn.Module):
        @staticmethod
        def losses(outputs, target):
            return {"total": sum(torch.nn.functional.cross_entropy(p, target) for p in outputs)}

    first, second = torch.randn(2, 3, 5, 6, requires_grad=True), torch.randn(2, 3, 5, 6, requires_grad=True)
    target = torch.randint(0, 3, (2, 5, 6))
    criterion = T.DiceCELoss()
    loss, logits = T.training_loss(DeepSupervised(), Outputs((first, second)), target, criterion)
    expected = (torch.nn.functional.cross_entropy(first, target) + torch.nn.functional.cross_entropy(second, target)
                + criterion.dice_term((first + second) / 2, target))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logits, (first + second) / 2)
    loss.backward()
    assert first.grad.abs().sum() > 0 and second.grad.abs().sum() > 0
    with pytest.raises(TypeError, match="returned tuple: expected logits, or an output with .average\\(\\)"):
        T.training_loss(torch.nn.Identity(), (first,), target, criterion)


# ------------------------------------------------------------------------------------------------
# training loop: resume, CLI, AMP, DDP, convergence
# ------------------------------------------------------------------------------------------------
def _assert_same_run(a: T.TrainResult, b: T.TrainResult) -> None:
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), name
    state_a, state_b = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert state_a["param_groups"] == state_b["param_groups"]
    assert state_a["state"].keys() == state_b["state"].keys()
    for key, slots in state_a["state"].items():
        for slot, value in slots.items():
            assert torch.equal(value, state_b["state"][key][slot]), (key, slot)


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    # 4 steps per epoch: the checkpoint at step 3 is mid-epoch and the resumed run crosses an epoch;
    # dropout makes the run depend on the restored RNG stream
    common = dict(steps=6, dataset_length=8, batch_size=2, model_kwargs={**TINY_UNET, "dropout": 0.2})
    straight = T.train(tiny_config(tmp_path / "straight", **common))
    first = T.train(tiny_config(tmp_path / "resumed", **{**common, "steps": 3}))
    assert first.checkpoint == tmp_path / "resumed" / "run" / "checkpoint.pt" and first.checkpoint.exists()
    checkpoint = torch.load(first.checkpoint, weights_only=False)
    assert checkpoint["step"] == 3 and checkpoint["model_name"] == "attention_unet"
    resumed = T.train(tiny_config(tmp_path / "resumed", **common, resume=str(first.checkpoint)))
    assert resumed.step == straight.step == 6
    _assert_same_run(straight, resumed)
    assert not torch.equal(first.model.out_conv.weight, resumed.model.out_conv.weight)  # it did train on
    log = (tmp_path / "resumed" / "run" / "log.jsonl").read_text().splitlines()
    logged = [json.loads(line)["step"] for line in log]
    assert logged == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("overrides, message", [
    (dict(steps=0), "--steps must be an int >= 1, got 0"),
    (dict(batch_size=0), "--batch-size must be an int >= 1, got 0"),
    (dict(save_every=-1), "--save-every must be an int >= 0, got -1"),
    (dict(lr=0.0), "--lr must be > 0, got 0.0"),
    (dict(num_classes=1), "--num-classes must be >= 2"),
    (dict(data="/no/such/folder"), "--data must be phantoms2d, phantoms3d or an existing folder, got '/no/such"),
    (dict(size=(16, 16, 16)), "--size for phantoms2d needs 1 or 2 ints, got \\[16, 16, 16\\]"),
    (dict(dataset_length=1, batch_size=2), "1 items over 1 process\\(es\\) do not fill one batch of 2"),
])
def test_bad_training_configs(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        T.train(tiny_config(tmp_path, **overrides))


def test_resume_refuses_another_model(tmp_path, monkeypatch):
    first = T.train(tiny_config(tmp_path, steps=1))
    with pytest.raises(ValueError, match="holds model 'attention_unet', not 'mtunet'"):
        T.train(tiny_config(tmp_path, model="mtunet", resume=str(first.checkpoint)))


def test_cli_train_writes_checkpoint_snapshot_and_log(tmp_path, capsys, monkeypatch):
    # without matplotlib, the snapshot is the panel strip (the labelled figure: tests/test_train_outputs.py)
    monkeypatch.setattr("medattn_fast.train_figures.matplotlib_available", lambda: False)
    out = tmp_path / "cli"
    status = cli.main(["train", "--model", "attention_unet", "--data", "phantoms3d", "--size", "8", "--steps", "2",
                       "--batch-size", "1", "--dataset-length", "2", "--num-classes", "2", "--snapshot-every", "2",
                       "--log-every", "1", "--backend", "torch", "--out", str(out),
                       "--model-kwargs", json.dumps(TINY_UNET)])
    assert status == 0
    captured = capsys.readouterr()
    assert "step 2: loss" in captured.out and "checkpoint" in captured.out
    assert "2/2 loss" in captured.err and "img/s" in captured.err  # the progress line
    assert (out / "checkpoint.pt").exists()
    (width, height, _, color_type, *_), _ = _read_png((out / "snapshot_0000002.png").read_bytes())
    # input, label, prediction and the one gate's attention map, 8 px each, 2 px gaps
    assert (width, height, color_type) == (4 * 8 + 3 * 2, 8, 2)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)


class PlainSegNet(torch.nn.Module):
    """conv3 -> ReLU -> conv1: a model without attention maps (and without ``return_attention``)."""

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int, width: int = 4):
        super().__init__()
        conv = torch.nn.Conv2d if spatial_dims == 2 else torch.nn.Conv3d
        self.body = torch.nn.Sequential(conv(in_channels, width, 3, padding=1), torch.nn.ReLU(),
                                        conv(width, num_classes, 1))

    def forward(self, x):
        return self.body(x)


def test_amp_bf16_on_cpu_and_a_model_without_attention_maps(tmp_path, monkeypatch):
    import medattn_fast.models

    monkeypatch.setattr(medattn_fast.models, "PlainSegNet", PlainSegNet, raising=False)
    monkeypatch.setitem(T.MODELS, "plain", T.ModelSpec("PlainSegNet", "plain", (2, 3), {"width": 3}))
    monkeypatch.setattr("medattn_fast.train_figures.matplotlib_available", lambda: False)   # the panel strip
    result = T.train(tiny_config(tmp_path, model="plain", amp=True, steps=2, snapshot_every=2, model_kwargs={}))
    assert np.isfinite(result.loss) and result.step == 2
    assert result.model.body[0].out_channels == 3  # the registry default reached the constructor
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # autocast keeps fp32 masters
    assert torch.load(result.checkpoint, weights_only=False)["scaler"] is None  # bf16 needs no loss scaling
    (width, height, *_), _ = _read_png((tmp_path / "run" / "snapshot_0000002.png").read_bytes())
    assert (width, height) == (3 * 16 + 2 * 2, 16)  # input, label, prediction; no attention panels


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    config = T.TrainConfig(model="attention_unet", data="phantoms2d", out=str(Path(out) / "run"), steps=3,
                           batch_size=2, lr=3e-3, num_classes=3, size=(16, 16), dataset_length=8,
                           model_kwargs=dict(TINY_UNET), save_every=0, snapshot_every=0, log_every=1, quiet=True,
                           backend="torch", device="cpu")
    result = T.train(config)
    torch.save({name: p.detach() for name, p in result.model.named_parameters()}, Path(out) / f"rank{rank}.pt")


def test_ddp_two_ranks_on_cpu_keep_identical_weights(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    # only rank 0 writes: one checkpoint, whose weights are the trained ones
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert checkpoint["step"] == 3 and len(checkpoint["rng"]) == 2
    for name in rank0:
        assert torch.equal(checkpoint["model"][name], rank0[name]), name
    init = T.build_model("attention_unet", spatial_dims=2, in_channels=1, num_classes=3, overrides=TINY_UNET)
    assert not torch.equal(init.out_conv.weight, rank0["out_conv.weight"])


def test_training_learns_easy_phantoms(tmp_path):
    """30 steps of a tiny Attention U-Net on two-class phantoms with big shapes: held-out Dice > 0.8."""
    phantoms = dict(num_shapes=(1, 2), radius_range=(0.3, 0.5), noise_std=0.1, bias_strength=0.2)
    result = T.train(tiny_config(tmp_path, steps=30, batch_size=8, lr=1e-2, num_classes=2, size=(32, 32),
                                 dataset_length=64, phantom_kwargs=phantoms, log_every=10,
                                 model_kwargs={"channels": (4, 8, 16), "strides": (2, 2)}))
    held_out = PhantomDataset(16, (32, 32), num_classes=2, seed=12345, **phantoms)
    images, labels = zip(*(held_out[i] for i in range(len(held_out))))
    model = result.model.eval()
    with torch.no_grad():
        prediction = model(torch.stack(images)).argmax(1)
    dice = T.dice_scores(T.dice_counts(prediction, torch.stack(labels), 2))
    assert dice > 0.8, dice
