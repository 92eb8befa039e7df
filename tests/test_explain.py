"""Explanation maps (engine/explain.py) against ground truth: a task whose evidence is known (a bright cube),
a hand-built model whose output reads a known region, the stem's patching written out voxel by voxel, and
predict.py --explain leaving the scores byte-identical."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import predict
import train
from engine.config import ConfigError
from engine.explain import (METHODS, explain_batch, gradcam_maps, memory_trace, occlusion_map, tokens_to_voxels,
                            trace)
from model.registry import build_model

SIDE, CUBE = 16, 4  # 16³ volumes, the evidence a 4³ cube: 1/64 of the volume


def cube_task(n: int, seed: int):
    """Noise in [0, 0.1]; class 1 has a bright (1.0) CUBE³ cube at a random position, class 0 none.
    Returns x (n, 1, S, S, S), y (n,), and the cube's mask (n, S, S, S) (drawn for class 0 too, unused)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, SIDE, SIDE, SIDE, generator=g) * 0.1
    y = torch.arange(n) % 2
    corner = torch.randint(0, SIDE - CUBE + 1, (n, 3), generator=g)
    mask = torch.zeros(n, SIDE, SIDE, SIDE, dtype=torch.bool)
    for i, (a, b, c) in enumerate(corner.tolist()):
        mask[i, a:a + CUBE, b:b + CUBE, c:c + CUBE] = True
    x[:, 0][mask & (y == 1).view(-1, 1, 1, 1)] = 1.0
    return x, y, mask


def share_in(maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per sample: the share of the map's positive mass inside the mask."""
    positive = maps.clamp(min=0).flatten(1)
    return (positive * mask.flatten(1)).sum(1) / positive.sum(1).clamp(min=1e-12)


def tiny_lmttm(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("lmttm", in_channels=1, num_classes=2, input_size=SIDE, dim=16, memory_tokens=16,
                       read_tokens=4, heads=2, patch_size=2, processor="mlp", processor_repeats=1, dropout=0.0,
                       noise="none")


@pytest.fixture(scope="module")
def cube_models():
    """(untrained, trained) tiny LMTTM on the cube task, its test accuracy, and 8 test volumes of each class
    with their cube masks (class 0: where a cube would be; the volume has none there)."""
    x, y, _ = cube_task(256, seed=1)
    model = tiny_lmttm()
    untrained = copy.deepcopy(model).eval()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(8):  # about 1 s per epoch on an idle core; 100 % test accuracy from epoch 4
        model.train()
        for idx in torch.randperm(len(x)).split(32):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    xt, yt, mt = cube_task(32, seed=2)
    with torch.no_grad():
        accuracy = (model(xt).argmax(1) == yt).float().mean().item()
    return untrained, model, accuracy, [(xt[yt == c][:8], mt[yt == c][:8]) for c in (0, 1)]


@pytest.mark.parametrize("method", METHODS)
def test_maps_put_their_mass_on_the_evidence(cube_models, method):
    """Trained to high accuracy, every method puts >= 3x the cube's volume share of its mass (for class 1) in
    the cube. Controls that must fail the same criterion: the maps of volumes without a cube at that place
    (class 0), and the untrained model's attention. (The untrained model's Grad-CAM and occlusion maps do
    find the bright cube, 6x and 4x: any model's output reacts most to the brightest region, so they are no
    control for those two.)"""
    untrained, trained, accuracy, ((x0, mask0), (x1, mask1)) = cube_models
    assert accuracy >= 0.9
    chance = CUBE ** 3 / SIDE ** 3
    target = torch.ones(len(x1), dtype=torch.long)
    share = {}
    for name, model, x, mask in (("trained", trained, x1, mask1), ("no cube", trained, x0, mask0),
                                 ("untrained", untrained, x1, mask1)):
        maps, _ = explain_batch(model, x, target, method, cube=CUBE, stride=CUBE)
        share[name] = share_in(maps, mask).mean().item() / chance
    print(f"{method}: share in the cube / its volume share: " + ", ".join(f"{k} {v:.1f}" for k, v in share.items()))
    assert share["trained"] >= 3
    assert share["no cube"] < 3
    if method == "attention":
        assert share["untrained"] < 3


def test_occlusion_of_a_region_reader_is_zero_elsewhere():
    """score = mean intensity of a known region R: with cubes tiling the volume (stride = cube), only the
    tiles meeting R change the score, each by (its voxels in R) / |R| of a volume of ones."""
    size, cube = 12, 3
    region = (slice(4, 7), slice(2, 5), slice(6, 9))  # 3³ voxels, not aligned to the 3-voxel tiles

    def score(v):
        inside = v[:, 0][(slice(None),) + region].flatten(1).mean(1)
        return torch.stack([1 - inside, inside], dim=1)

    heat = occlusion_map(score, torch.ones(1, size, size, size), 1, cube=cube, stride=cube)
    expected = torch.zeros(size, size, size)
    marked = torch.zeros(size, size, size)
    marked[region] = 1
    for a in range(0, size, cube):
        for b in range(0, size, cube):
            for c in range(0, size, cube):
                tile = (slice(a, a + cube), slice(b, b + cube), slice(c, c + cube))
                expected[tile] = marked[tile].sum() / marked.sum()
    assert torch.allclose(heat, expected, atol=1e-6)
    assert heat[region].min() > 0 and heat.sum() > 0
    dilated = F.max_pool3d(marked[None, None], 2 * cube - 1, stride=1, padding=cube - 1)[0, 0]
    assert (heat[dilated == 0] == 0).all()  # nothing further than a cube away from R
    # overlapping cubes (stride 1): a voxel holds the mean drop over the cubes that cover it
    heat = occlusion_map(score, torch.ones(1, size, size, size), 1, cube=cube, stride=1)
    z, y, x = 4, 4, 6  # a corner voxel of R
    drops = [marked[a:a + cube, b:b + cube, c:c + cube].sum() / marked.sum()
             for a in range(z - cube + 1, z + 1) for b in range(y - cube + 1, y + 1) for c in range(x - cube + 1, x + 1)]
    assert heat[z, y, x].item() == pytest.approx(float(np.mean(drops)), abs=1e-6)


def test_tokens_to_voxels_follows_the_stem_patching():
    """Voxel (z, y, x) holds the value of token (z // pd, y // ph, x // pw); voxels no patch covers hold 0."""
    patch, size = (1, 3, 3), 28
    grid = torch.arange(28 * 9 * 9, dtype=torch.float32).view(1, 28, 9, 9) + 1
    voxels = tokens_to_voxels(grid, patch, size)[0]
    for z, y, x in [(0, 0, 0), (5, 4, 8), (27, 26, 26), (13, 27, 3), (2, 5, 27)]:
        inside = y < 27 and x < 27
        assert voxels[z, y, x] == (grid[0, z, y // 3, x // 3] if inside else 0)
    # the stem really makes token j of step t from that patch: a volume lit in one patch lights one token
    model = build_model("lmttm", in_channels=1, num_classes=2, input_size=size, dim=8, memory_tokens=8, heads=2,
                        depth_patch_size=1)
    volume = torch.zeros(1, 1, size, size, size)
    volume[0, 0, 5, 12:15, 21:24] = 1.0  # patch (row 4, column 7) of step 5: token 4 * 9 + 7
    tokens = model.stem.conv(volume) - model.stem.conv(torch.zeros_like(volume))  # (1, D, T, h, w)
    changed = tokens.abs().sum(1)[0].nonzero().tolist()
    assert changed == [[5, 4, 7]]


def test_attention_record_is_the_models_forward_and_sums_to_one():
    torch.manual_seed(0)
    for name in ("lmttm", "ttm"):
        model = build_model(name, in_channels=1, num_classes=3, input_size=SIDE, dim=16, memory_tokens=16, heads=2,
                            patch_size=2).eval()
        x = torch.rand(3, 1, SIDE, SIDE, SIDE)
        logits, reads, writes = trace(model, x)
        with torch.no_grad():
            assert torch.allclose(logits, model(x), atol=1e-5)  # the recorded forward is the model's function
        assert len(reads) == len(writes) == SIDE // 2
        _, record = memory_trace(model, x)
        total = record["read_memory"].sum(-1) + record["read_inputs"]  # every read token's weights sum to 1
        assert np.allclose(total, 1.0, atol=1e-5)
        assert np.allclose(record["write_sources"].sum(-1), 1.0, atol=1e-5)
        assert ("schedule" in record) == (name == "lmttm")


@pytest.mark.parametrize("name,kwargs", [("lmttm", dict(dim=8, memory_tokens=8, heads=2)),
                                         ("ttm", dict(dim=8, memory_tokens=8, heads=2)),
                                         ("resnet18_3d", dict(width=2)), ("medmamba3d", dict(depths=[1, 1, 1], widths=[8, 16, 32], drop_path_rate=0.0)),
                                         ("vit_mam", dict(embed_dim=16, depth=1, num_heads=2))])
def test_gradcam_shapes_and_determinism(name, kwargs):
    torch.manual_seed(0)
    model = build_model(name, in_channels=1, num_classes=2, input_size=28, **kwargs).eval()
    x = torch.rand(2, 1, 28, 28, 28)
    first = gradcam_maps(model, x, torch.tensor([0, 1]))
    assert first.shape == (2, 28, 28, 28) and (first >= 0).all() and first.sum() > 0
    assert torch.equal(first, gradcam_maps(model, x, torch.tensor([0, 1])))


def test_attention_and_occlusion_shapes_and_determinism():
    torch.manual_seed(0)
    model = build_model("lmttm", in_channels=1, num_classes=2, input_size=28, dim=8, memory_tokens=8, heads=2)
    x = torch.rand(1, 1, 28, 28, 28)
    for method in ("attention", "occlusion"):
        first, records = explain_batch(model, x, torch.tensor([1]), method, cube=7)
        again, _ = explain_batch(model, x, torch.tensor([1]), method, cube=7)
        assert first.shape == (1, 28, 28, 28) and torch.equal(first, again)
    assert (first != 0).any()
    attention, records = explain_batch(model, x, torch.tensor([1]), "attention")
    assert (attention[0, 27] == 0).all() and (attention[0, :27, :27, :27] > 0).all()  # the 28th slice is never read
    assert records[0]["read_memory"].shape == (9, 8) and records[0]["schedule"].shape == (9, 3)


TINY = ["--model.dim", "16", "--model.memory_tokens", "16", "--model.heads", "2", "--train.batch_size", "16",
        "--eval.batch_size", "32", "--train.epochs", "1"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A tiny LMTTM trained for one epoch on synthetic3d: (its folder, the command line)."""
    tmp_path = tmp_path_factory.mktemp("explain")
    run = ["demo.json", *TINY, "--output.dir", str(tmp_path), "--output.name", "run"]
    assert train.main(run) == 0
    return tmp_path / "run", run


def test_predict_explain_writes_maps_and_leaves_the_scores_byte_identical(demo_run):
    run_dir, run = demo_run
    out = run_dir / "eval" / "test"
    assert predict.main(run) == 0
    before = {name: (out / name).read_bytes() for name in ("metrics.json", "predictions.npz")}
    assert predict.main([*run, "--explain", "2"]) == 0
    assert {name: (out / name).read_bytes() for name in before} == before
    folder = out / "explain" / "attention"
    assert sorted(p.name for p in folder.iterdir()) == ["0000.npy", "0000.png", "0001.npy", "0001.png",
                                                        "memory_0000.npz", "memory_0000.png", "memory_0001.npz",
                                                        "memory_0001.png"]
    assert np.load(folder / "0000.npy").shape == (28, 28, 28)
    assert predict.main([*run, "--explain", "1", "--explain-method", "occlusion", "--occlusion-cube", "7"]) == 0
    assert {name: (out / name).read_bytes() for name in before} == before
    assert np.load(out / "explain" / "occlusion" / "0000.npy").shape == (28, 28, 28)


@pytest.mark.parametrize("extra,message", [
    (["--explain", "0"], "at least 1"),
    (["--explain", "1", "--occlusion-cube", "29"], "between 1 and the volume side 28"),
    (["--explain", "1", "--explain-method", "attention", "--model.name", "resnet18_3d"], "needs LMTTM or TTM"),
    (["--explain", "1", "--protocol", "original"], "excludes --protocol original"),
])
def test_bad_explain_requests_are_refused_before_anything_is_written(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        predict.main(["demo.json", "--output.dir", str(tmp_path), "--output.name", "none", *extra])
    assert not (tmp_path / "none").exists()


def test_input_explain_maps_every_good_file_like_the_split(demo_run, tmp_path):
    """--input with --explain: one map per scored file (named by its CSV row), none for a bad file, the CSV
    unchanged; a file holding a test volume (--window 0 255: the model sees exactly that uint8 array) gets the
    map the split's sample gets, for the same predicted class (Grad-CAM depends on it)."""
    from engine.setup import load_data

    run_dir, run = demo_run
    cfg = predict.load_config("demo.json", predict.parse_args(run)[1])
    volumes = load_data(cfg, torch.device("cpu"), splits=("test",))[1]["test"].images[:2, 0].numpy()
    assert volumes.max() < 255  # the window, not min/max scaling, keeps the array as it is
    np.save(tmp_path / "a.npy", volumes[0])
    np.save(tmp_path / "c.npy", volumes[1])
    np.save(tmp_path / "b.npy", np.full((28, 28, 28), np.nan))
    files = ["--input", *(str(tmp_path / f"{n}.npy") for n in "abc"), "--window", "0", "255"]
    assert predict.main([*run, *files, "--save-preprocessed", str(tmp_path / "seen")]) == 1  # b.npy fails
    np.testing.assert_array_equal(np.load(tmp_path / "seen" / "0000_a.npy")[0], volumes[0] / np.float32(255))
    csv_bytes = (run_dir / "input_predictions.csv").read_bytes()
    assert predict.main([*run, *files, "--explain", "5"]) == 1
    assert (run_dir / "input_predictions.csv").read_bytes() == csv_bytes
    folder = run_dir / "input_predictions_explain" / "attention"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{kind}{n}.{ext}" for kind, ext in (("", "npy"), ("", "png"), ("memory_", "npz"), ("memory_", "png"))
        for n in ("0000_a", "0002_c"))
    map_c = np.load(folder / "0002_c.npy")
    (folder / "notes.txt").write_text("mine")
    assert predict.main([*run, *files, "--explain", "1"]) == 1  # a new run: only its maps (and foreign files) stay
    assert sorted(p.name for p in folder.iterdir()) == ["0000_a.npy", "0000_a.png", "memory_0000_a.npz",
                                                        "memory_0000_a.png", "notes.txt"]
    split = run_dir / "eval" / "test" / "explain"
    assert predict.main([*run, "--explain", "2"]) == 0  # (each split run replaces eval/test/ as one unit)
    np.testing.assert_allclose(map_c, np.load(split / "attention" / "0001.npy"),
                               rtol=1e-5, atol=1e-9)
    assert predict.main([*run, "--explain", "2", "--explain-method", "gradcam"]) == 0
    assert predict.main([*run, *files, "--explain", "1", "--explain-method", "gradcam"]) == 1
    mine = run_dir / "input_predictions_explain" / "gradcam"
    assert sorted(p.name for p in mine.iterdir()) == ["0000_a.npy", "0000_a.png"]
    split_map = np.load(split / "gradcam" / "0000.npy")
    assert split_map.max() > 0
    np.testing.assert_allclose(np.load(mine / "0000_a.npy"), split_map, rtol=1e-5, atol=1e-9)


def test_montage_shows_the_anatomy_of_a_64_volume_and_the_maps_peak():
    """28 slices: all. 64: 16 evenly spaced slices from the first to the last slice holding anatomy (a voxel
    above a tenth of the maximum), stretched to the map's strongest slice when that lies outside."""
    from engine.explain_plots import montage_slices

    assert montage_slices(np.zeros((28, 28, 28))) == list(range(28))
    volume = np.zeros((64, 64, 64))
    volume[20:46, 30:40, 30:40] = 1.0
    volume[50, 0, 0] = 0.05  # faint noise is no anatomy
    heat = np.zeros_like(volume)
    heat[30] = 1.0
    shown = montage_slices(volume, heat)
    assert len(shown) == 16 and shown[0] == 20 and shown[-1] == 45
    assert all(0 < b - a <= 2 for a, b in zip(shown, shown[1:]))  # 26 slices: every 1st or 2nd one
    heat[21] = 2.0  # the strongest slice, between two evenly spaced ones: shown instead of its neighbour
    assert montage_slices(volume, heat) == [20, 21, 23, 25, 27, 28, 30, 32, 33, 35, 37, 38, 40, 42, 43, 45]
    heat[5, 0, 0] = -1e6  # the strongest slice lies outside the anatomy: it is shown too
    assert montage_slices(volume, heat)[0] == 5 and montage_slices(volume, heat)[-1] == 45
    volume[:] = 0
    volume[40:43] = 1.0  # 3 slices of anatomy: 16 consecutive slices around them
    assert montage_slices(volume) == list(range(34, 50))


def test_overlay_colours_are_never_grey_or_white():
    """Bright anatomy is white/grey: every overlay colour is saturated (max - min of R, G, B at least 0.5), and
    a signed map's negative colours are blue (B the largest channel), its positive ones red/yellow (R)."""
    pytest.importorskip("matplotlib")
    from engine.explain_plots import overlay_colormap

    for signed in (False, True):
        rgb = overlay_colormap(signed)(np.linspace(0, 1, 257))[:, :3]
        assert (rgb.max(1) - rgb.min(1) >= 0.5).all()
    rgb = overlay_colormap(True)(np.linspace(0, 1, 257))[:, :3]
    assert (rgb[:128].argmax(1) == 2).all() and (rgb[129:].argmax(1) == 0).all()
