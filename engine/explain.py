"""Explanation maps: where in the volume a trained model's evidence for a prediction lies.

Every method gives one map per sample at input resolution, (S, S, S) along the volume's (depth, row,
column) axes, computed in evaluation mode without touching the scores (predict.py writes them after
metrics.json and predictions.npz, from a freshly loaded copy of the checkpoint):

* `attention` (LMTTM, TTM): the read summariser's softmax weights at every step. Step t reads the tokens
  I_t of slab t; the stem (`model/stem.py`) made token j of step t from the patch of voxels
  depth [t·pd, (t+1)·pd), rows [i·ph, (i+1)·ph), columns [c·pw, (c+1)·pw) with (i, c) = divmod(j, S // pw)
  (kernel = stride = patch, the remainder slices/rows/columns that no patch covers are never read and get 0).
  The map's value at a voxel is the read weight of the token holding it, averaged over the step's read
  tokens (LMTTM: the r outputs of each of the 3 reads; TTM: the r outputs): the share of the step's read
  attention that went to that patch (the rest went to memory tokens). With the `3dBN` stem a token also
  sees its 26 neighbouring patches through the 3 × 3 × 3 convolution; the map still places it on its own patch.
* `gradcam`: Grad-CAM (Selvaraju et al. 2017) on the last convolutional feature map A (channels c), in
  its element-wise form ReLU(Σ_c ∂y/∂A_c ⊙ A_c) (HiResCAM, Draelos & Carin 2020), y the predicted class's
  logit. For the ResNets and MedMamba the map feeds a global average pool and a linear head, so the
  gradient is the same at every position and this is exactly Grad-CAM. For the token machines' stem and
  vit_mam's patch embedding the tokens are weighted by attention, and Grad-CAM's spatially averaged
  gradient misplaces the evidence (measured on tests/test_explain.py's cube task with noise up to 0.3 for
  a tiny LMTTM: 0.1 % of the map in the cube, the element-wise form 67 %). The map has the feature map's resolution (token machines: one value
  per stem patch, placed by the patching above; vit_mam: per patch; ResNets: 4³ at 28³, MedMamba: its
  last stage's grid), brought to the input by trilinear interpolation.
* `occlusion`: occlusion sensitivity, model-agnostic: a cube of `cube` voxels per side, set to 0 (the
  MedMNIST background), slides with `stride`; a voxel's value is the mean drop of the predicted class's
  probability over the cubes covering it (negative: hiding it raises that probability).

For LMTTM and TTM `memory_trace` also records, per step, the read attention over the memory tokens, the
blocks read (current, past, future) and written, and where the write drew from (`explain_plots.py`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine.config import ConfigError
from model.classical import is_classical
from model.registry import get_model_entry

METHODS = ("attention", "gradcam", "occlusion")
ATTENTION_MODELS = ("lmttm", "ttm")
OCCLUSION_BATCH = 32  # occluded volumes per forward


def default_cube(size: int) -> int:
    """Occlusion cube side: a seventh of the volume side (4 at 28³, 9 at 64³)."""
    return max(1, round(size / 7))


def check_request(method: str, count: int, model_name: str, model_cfg, size: int, cube: int | None,
                  stride: int | None) -> None:
    """Refuse an explanation the model cannot give, before anything is scored (ConfigError)."""
    from engine.evaluate import uses_full_batches

    if count < 1:
        raise ConfigError(f"--explain {count}: give the number of samples to explain (at least 1)")
    if get_model_entry(model_name).dims != 3:
        raise ConfigError(f"--explain maps volumes; {model_name} is a 2-D image model")
    if method == "attention" and model_name not in ATTENTION_MODELS:
        raise ConfigError(f"--explain-method attention needs LMTTM or TTM (the summariser's read weights); "
                          f"{model_name} has none: use gradcam or occlusion")
    if method == "gradcam" and is_classical(model_cfg):
        raise ConfigError(f"--explain-method gradcam needs a neural network; {model_name} is a scikit-learn "
                          f"baseline: use occlusion")
    if uses_full_batches(model_cfg):
        raise ConfigError("--explain needs predictions that do not depend on the batch; this run uses the "
                          "original code's batch-dependent compat options (official_compat)")
    for name, value in (("--occlusion-cube", cube), ("--occlusion-stride", stride)):
        if value is not None and not 1 <= value <= size:
            raise ConfigError(f"{name} {value}: give a side between 1 and the volume side {size}")


# ----------------------------------------------------------------------------------------------------------
# tokens -> voxels
# ----------------------------------------------------------------------------------------------------------

def tokens_to_voxels(values: torch.Tensor, patch: tuple[int, int, int], size: int) -> torch.Tensor:
    """(B, T, h, w) values on the stem's patch grid -> (B, S, S, S): every voxel of a patch gets its
    token's value; the voxels beyond the last whole patch (never read) get 0."""
    pd, ph, pw = patch
    v = values.repeat_interleave(pd, 1).repeat_interleave(ph, 2).repeat_interleave(pw, 3)
    return F.pad(v, (0, size - v.size(3), 0, size - v.size(2), 0, size - v.size(1)))


def _grid(model, size: int) -> tuple[int, int, int]:
    """(T, h, w) of a token machine's stem on a volume of side `size`."""
    pd, ph, pw = model.cfg.patch
    return size // pd, size // ph, size // pw


# ----------------------------------------------------------------------------------------------------------
# attention (LMTTM / TTM)
# ----------------------------------------------------------------------------------------------------------

@contextmanager
def _recording(summariser, store: list):
    """Record the softmax weights (B, .., N, R) of every `pool` call of `summariser` (an instance-level
    wrapper, removed on exit; the model's code and its default forward are untouched)."""
    pool = summariser.pool

    def recorded(logits, features):
        store.append(logits.softmax(dim=-2).detach())
        return pool(logits, features)

    summariser.pool = recorded
    try:
        yield
    finally:
        del summariser.pool


@torch.no_grad()
def trace(model, x: torch.Tensor):
    """(logits, read weights per step, write weights per step) of the step-by-step forward (`forward_plain`,
    the same function as the default forward). LMTTM reads: (B, 3, m + n, r), writes (B, 3m + n + 3r, m);
    TTM reads (B, M + n, r), writes (B, M + n + r, M). The block pointer / carried memory are restored."""
    state = (getattr(model, "_pointer", 0), getattr(model, "_carried_memory", None))
    reads, writes = [], []
    with _recording(model.reader, reads), _recording(model.writer, writes):
        logits = model.forward_plain(x)
    model._pointer, model._carried_memory = state
    return logits, reads, writes


def memory_trace(model, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Input-token attention (B, T, h, w) and the memory record of a token machine on x (B, C, S, S, S).

    The record (numpy arrays): `read_memory` (B, T, M) the mean read weight of every memory token at each
    step, `read_inputs` (B, T) the share of the read attention on the step's input tokens (each row of
    read_memory plus read_inputs sums to 1), `write_sources` (B, T, G) the writer's mean weight on each group
    of `write_groups`, and for LMTTM `schedule` (T, 3) the (current, past, future) blocks of each step (the
    future block is the one written) and `blocks` k.
    """
    from model.lmttm import LMTTM, block_schedule

    start = model._pointer if getattr(model.cfg, "compat_global_pointer", False) else 0
    _, reads, writes = trace(model, x)
    steps, h, w = _grid(model, x.size(-1))
    batch, M, n = x.size(0), model.cfg.memory_tokens, h * w
    record = {"read_memory": torch.zeros(batch, steps, M)}
    inputs = []
    if isinstance(model, LMTTM):
        m, k = model.block_tokens, model.cfg.blocks
        schedule = block_schedule(steps, k, start)
        for t, (weights, linked) in enumerate(zip(reads, schedule)):  # weights (B, 3, m + n, r)
            inputs.append(weights[:, :, m:].mean(dim=(1, 3)))  # (B, n)
            for s, b in enumerate(linked):
                record["read_memory"][:, t, b * m:(b + 1) * m] += weights[:, s, :m].mean(-1).cpu() / 3
        sizes, names = [m, m, m, n, 3 * model.cfg.read_tokens], ["current", "past", "future", "input", "output"]
        record.update(schedule=np.array(schedule), blocks=k)
    else:
        for t, weights in enumerate(reads):  # (B, M + n, r)
            inputs.append(weights[:, M:].mean(-1))
            record["read_memory"][:, t] = weights[:, :M].mean(-1).cpu()
        sizes, names = [M, n, model.cfg.read_tokens], ["memory", "input", "output"]
    attention = torch.stack(inputs, dim=1)  # (B, T, n)
    record["read_inputs"] = attention.sum(-1).cpu()
    record["write_sources"] = torch.stack([torch.stack([g.mean(-1).sum(-1) for g in wt.split(sizes, dim=1)], -1)
                                           for wt in writes], dim=1).cpu()  # (B, T, G)
    record["write_groups"] = names
    record = {key: value.numpy() if torch.is_tensor(value) else value for key, value in record.items()}
    return attention.view(batch, steps, h, w), record


def attention_maps(model, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """(B, S, S, S) read-attention maps and the memory record (`memory_trace`)."""
    attention, record = memory_trace(model, x)
    return tokens_to_voxels(attention, model.cfg.patch, x.size(-1)), record


# ----------------------------------------------------------------------------------------------------------
# Grad-CAM
# ----------------------------------------------------------------------------------------------------------

def gradcam_layer(model):
    """(module, to_grid): the module whose output is the last convolutional feature map and a function
    turning that output into (B, C, d, h, w); None for a model without one."""
    from model.medmamba import VSSM
    from model.resnet import ResNet2d
    from model.token_turing import TokenTuringMachine
    from model.vit import ViT3d

    if isinstance(model, TokenTuringMachine):  # stem tokens (B, T, n, D) -> (B, D, T, h, w)
        side = lambda a: math.isqrt(a.size(2))  # noqa: E731  cubic input, square patch: h = w
        return model.stem, lambda a: a.permute(0, 3, 1, 2).reshape(*a.shape[:1], a.size(3), a.size(1), side(a), side(a))
    if isinstance(model, ResNet2d):
        return model.layer4, lambda a: a
    if isinstance(model, VSSM) and model.dims == 3:  # channels-last (B, d, h, w, C)
        return model.stages[-1], lambda a: a.permute(0, 4, 1, 2, 3)
    if isinstance(model, ViT3d):
        return model.patch_embed, lambda a: a
    return None


def gradcam_maps(model, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, S, S, S) Grad-CAM of the logit of class `targets` (B,) on `gradcam_layer(model)`."""
    from model.token_turing import TokenTuringMachine

    found = gradcam_layer(model)
    if found is None:
        raise ConfigError(f"{type(model).__name__} has no convolutional feature map for Grad-CAM: use occlusion")
    layer, to_grid = found
    kept = []
    handle = layer.register_forward_hook(lambda module, args, out: kept.append(out))
    try:
        with torch.enable_grad():
            logits = model(x)
            activation = kept[0]
            score = logits.gather(1, targets.view(-1, 1).to(logits.device)).sum()
            grad, = torch.autograd.grad(score, activation)
    finally:
        handle.remove()
    a, g = to_grid(activation.detach()), to_grid(grad)  # (B, C, d, h, w)
    cam = (g * a).sum(1).relu()  # (B, d, h, w): the element-wise form (see the module docstring)
    size = x.size(-1)
    if isinstance(model, TokenTuringMachine):
        return tokens_to_voxels(cam, model.cfg.patch, size)
    if cam.shape[1:] == (size,) * 3:
        return cam
    if all(size % s == 0 for s in cam.shape[1:]):  # a patch grid (vit_mam): each patch its value
        p = size // cam.size(1)
        return tokens_to_voxels(cam, (p, p, p), size)
    return F.interpolate(cam[:, None], size=(size,) * 3, mode="trilinear", align_corners=False)[:, 0]


# ----------------------------------------------------------------------------------------------------------
# occlusion sensitivity (any model)
# ----------------------------------------------------------------------------------------------------------

def _starts(size: int, cube: int, stride: int) -> list[int]:
    """Cube positions along one axis; the last one is moved back to end at the border so all voxels are covered."""
    starts = list(range(0, size - cube + 1, stride))
    if starts[-1] + cube < size:
        starts.append(size - cube)
    return starts


@torch.no_grad()
def occlusion_map(score, x: torch.Tensor, target: int, *, cube: int, stride: int,
                  batch: int = OCCLUSION_BATCH) -> torch.Tensor:
    """(S, S, S) occlusion sensitivity of one volume x (C, S, S, S): `score` maps (B, C, S, S, S) to class
    probabilities (B, K); each voxel gets the mean of p(x)[target] - p(x occluded)[target] over the cubes
    covering it."""
    size = x.size(-1)
    base = float(score(x[None])[0, target])
    corners = [(a, b, c) for a in _starts(size, cube, stride) for b in _starts(size, cube, stride)
               for c in _starts(size, cube, stride)]
    total = torch.zeros((size,) * 3, dtype=torch.float64)
    count = torch.zeros((size,) * 3, dtype=torch.float64)
    for first in range(0, len(corners), batch):
        chunk = corners[first:first + batch]
        occluded = x.expand(len(chunk), *x.shape).clone()
        for i, (a, b, c) in enumerate(chunk):
            occluded[i, :, a:a + cube, b:b + cube, c:c + cube] = 0
        drops = base - score(occluded)[:, target].double().cpu()
        for (a, b, c), drop in zip(chunk, drops):
            total[a:a + cube, b:b + cube, c:c + cube] += drop
            count[a:a + cube, b:b + cube, c:c + cube] += 1
    return (total / count).float()


def torch_scorer(model, multilabel: bool):
    """Probabilities of a torch model: softmax, or per-label sigmoid for a multi-label task."""
    def score(x):
        logits = model(x).float()
        return logits.sigmoid() if multilabel else logits.softmax(-1)
    return score


def classical_scorer(payload: dict):
    """Probabilities of a fitted scikit-learn run (engine/classical.py's features of float volumes in [0, 1])."""
    from engine.classical import expand_proba

    pipe, pool = payload["pipeline"], payload["pool"]

    def score(x):
        x = x.float().cpu()
        if pool > 1:
            x = F.avg_pool3d(x, kernel_size=pool, stride=pool)
        proba = pipe.predict_proba(x.flatten(1).numpy().astype(np.float32))
        return torch.from_numpy(expand_proba(proba, pipe.classes_, payload["dataset"]["num_classes"]))
    return score


# ----------------------------------------------------------------------------------------------------------
# a split's first samples -> files
# ----------------------------------------------------------------------------------------------------------

def explain_batch(source, x: torch.Tensor, targets: torch.Tensor, method: str, *, multilabel: bool = False,
                  cube: int | None = None, stride: int | None = None) -> tuple[torch.Tensor, list[dict] | None]:
    """Maps (B, S, S, S) of x (B, C, S, S, S) for classes `targets` (B,), and per-sample memory records
    (attention only). `source`: a torch model (put in eval mode here) or a scikit-learn payload (dict)."""
    classical = isinstance(source, dict)
    if not classical:
        source.eval()
    if method == "attention":
        maps, record = attention_maps(source, x)
        records = [{key: value[i] if isinstance(value, np.ndarray) and key != "schedule" else value
                    for key, value in record.items()} for i in range(x.size(0))]
        return maps.cpu(), records
    if method == "gradcam":
        return gradcam_maps(source, x, targets).cpu(), None
    cube = cube or default_cube(x.size(-1))
    score = classical_scorer(source) if classical else torch_scorer(source, multilabel)
    maps = [occlusion_map(score, v, int(t), cube=cube, stride=stride or cube) for v, t in zip(x, targets)]
    return torch.stack(maps), None


def explain_split(source, split, info, out_dir: Path, *, method: str, count: int, scores: np.ndarray,
                  device="cpu", cube: int | None = None, stride: int | None = None) -> Path:
    """Explain the first `count` samples of `split` for their predicted class (argmax of `scores`, the
    scores predict.py wrote): `out_dir/<method>/NNNN.npy` (float32 (S, S, S)) and `NNNN.png` (montage,
    engine/explain_plots.py, skipped with a note without matplotlib), LMTTM/TTM attention also
    `memory_NNNN.png` and `memory_NNNN.npz`. Returns the method's folder."""
    count = min(count, len(split))
    labels = split.labels[:count].cpu().numpy()
    scores = np.asarray(scores[:count])
    targets = scores.argmax(axis=1)
    titles = [_title(info, i, labels[i], int(targets[i]), float(scores[i][targets[i]]), method) for i in range(count)]
    return write_maps(source, split.images[:count], targets, [f"{i:04d}" for i in range(count)], titles,
                      out_dir / method, method=method, multilabel=info.is_multilabel, device=device, cube=cube,
                      stride=stride)


def explain_inputs(source, paths, info, out_dir: Path, *, method: str, count: int, window=None, device="cpu",
                   cube: int | None = None, stride: int | None = None, spacing=None,
                   resample: bool = True) -> Path | None:
    """predict.py --input --explain: maps of the first `count` input files that preprocess (engine/inputs.py,
    the volume the model scored, read again), in the CSV's order, for the class the model predicts on that
    volume: `out_dir/<method>/NNNN_<name>.npy` and `.png` (NNNN: the file's row in the CSV, as
    --save-preprocessed numbers them), with the file name, prediction and probability in the title. Files
    that cannot be read get no map (their CSV row says why); the maps of an earlier --input run in that folder
    are removed. Returns the method's folder (None: no file)."""
    from engine.inputs import collect, preprocess, read_array, read_volume

    chosen = []
    for i, item in enumerate(collect(paths, info.dims)):
        if len(chosen) == count:
            break
        if item.error is None:
            try:
                array = (read_volume(item.path, spacing=spacing, resample=resample)[0] if info.dims == 3
                         else read_array(item.path))  # as predict_inputs reads it (voxel spacing included)
                image = preprocess(array, dims=info.dims, size=info.size, in_channels=info.in_channels,
                                   window=window)
            except Exception:  # noqa: BLE001 - as predict_inputs: its CSV row says why, no map
                continue
            chosen.append((i, Path(item.path).name, torch.from_numpy(image)))
    folder = out_dir / method
    for old in folder.glob("*[0-9][0-9][0-9][0-9]_*.*") if folder.is_dir() else []:  # an earlier CSV's maps
        if old.suffix in (".npy", ".npz", ".png") and old.name.removeprefix("memory_")[:4].isdigit():
            old.unlink()
    if not chosen:
        return None
    images = torch.stack([image for _, _, image in chosen])
    source.eval().to(device)  # a torch model (predict.py --input refuses the scikit-learn baselines)
    with torch.no_grad():
        probabilities = torch.cat([torch_scorer(source, info.is_multilabel)(x.to(device).float() / 255.0).cpu()
                                   for x in images.split(8)]).numpy()
    targets = probabilities.argmax(axis=1)
    names = info.label_names
    titles = [f"{name}  predicted: {names.get(str(t), t)} (p = {p[t]:.2f})  [{method}]"
              for (_, name, _), p, t in zip(chosen, probabilities, targets)]
    return write_maps(source, images, targets, [f"{i:04d}_{name.split('.')[0]}" for i, name, _ in chosen], titles,
                      folder, method=method, multilabel=info.is_multilabel, device=device, cube=cube,
                      stride=stride)


def write_maps(source, images: torch.Tensor, targets: np.ndarray, names: list[str], titles: list[str],
               folder: Path, *, method: str, multilabel: bool, device="cpu", cube: int | None = None,
               stride: int | None = None) -> Path:
    """Maps of uint8 volumes `images` (N, C, S, S, S) for classes `targets`: `folder/<name>.npy` and
    `<name>.png`, attention also `memory_<name>.png` / `.npz`, in batches of 8."""
    from engine.explain_plots import plot_memory, plot_montage
    from engine.plots import MissingDependency
    from engine.rundir import atomic_write_bytes

    folder.mkdir(parents=True, exist_ok=True)
    x = images.to(device).float() / 255.0
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    if not isinstance(source, dict):
        source.to(device)
    plots = True
    for first in range(0, len(names), 8):
        maps, records = explain_batch(source, x[first:first + 8], targets[first:first + 8], method,
                                      multilabel=multilabel, cube=cube, stride=stride)
        for j, volume_map in enumerate(maps.numpy().astype(np.float32)):
            i = first + j
            atomic_write_bytes(_npy_bytes(volume_map), folder / f"{names[i]}.npy")
            if records is not None:
                atomic_write_bytes(_npz_bytes(records[j]), folder / f"memory_{names[i]}.npz")
            if not plots:
                continue
            try:
                plot_montage(x[i, 0].cpu().numpy(), volume_map, folder / f"{names[i]}.png", titles[i],
                             signed=method == "occlusion")
                if records is not None:
                    plot_memory(records[j], folder / f"memory_{names[i]}.png", titles[i])
            except MissingDependency as err:
                print(f"note: no explanation PNGs: {err}")
                plots = False
    print(f"wrote {len(names)} {method} map(s) to {folder}")
    return folder


def _title(info, index: int, label, predicted: int, probability: float, method: str) -> str:
    names = info.label_names
    label = np.asarray(label).reshape(-1)
    shown = ", ".join(names.get(str(int(v)), str(int(v))) for v in label) if len(label) == 1 else str(label.tolist())
    return (f"{info.name} #{index}  label: {shown}  predicted: {names.get(str(predicted), predicted)} "
            f"(p = {probability:.2f})  [{method}]")


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _npz_bytes(record: dict) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **{key: np.asarray(value) for key, value in record.items()})
    return buffer.getvalue()
