"""`vlmforge cache build`: run the frozen encoder over every image once and fill a feature store.

What is stored is the vision tower's output (patch features of the chosen layer, per view when
images are split): the connector trains in every stage, so the tower is everything frozen before
the first trained module. When the tower's top K blocks train (`--vision_top K`), what is
frozen ends below them, and the store keeps the states there instead.

The build is planned before anything is encoded: the distinct images (by content hash) missing
from the namespace are sorted and cut into shards, and the plan is saved. Images are decoded in
DataLoader workers and encoded in batches that never straddle a shard, so a shard's features do
not depend on how the work was split: a build resumed after SIGKILL recomputes exactly the
unfinished shards of the saved plan, and `torchrun --nproc_per_node=N` (ranks take every N-th
shard; gloo on CPU, NCCL on GPUs) writes the same features as one process. Rank 0 merges the
finished shards into the manifest at the end; a killed build's shards are merged by the next one.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vlmforge import runtime
from vlmforge.cache.store import (
    DEFAULT_DTYPE,
    STORE_DTYPES,
    CacheError,
    FeatureStore,
    ImageHasher,
    feature_settings,
)
from vlmforge.config import check_choice
from vlmforge.data.images import ImageError, ImageProcessor, load_image
from vlmforge.io import read_json, write_json
from vlmforge.model.vision import by_shape


class _Views(Dataset):
    """(key, views [V, 3, H, W] or None, (width, height), error or None) for each planned image;
    runs in workers."""

    def __init__(self, items: list[tuple[str, str]], processor: ImageProcessor, max_pixels: int):
        self.items, self.processor, self.max_pixels = items, processor, max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        key, path = self.items[i]
        try:
            img = load_image(path, self.max_pixels)
            return key, self.processor.views(img), img.size, None
        except ImageError as e:
            return key, None, None, str(e)


def _collate(items: list) -> tuple[list[str], list[torch.Tensor] | tuple, list, list[str]]:
    """(keys of the good images, their views, their sizes, errors). Views of one shape come as one
    tensor and the images' view counts, (views [sum V, 3, H, W], counts): a worker hands each
    tensor to the main process through a file descriptor of its own, so one per batch, not per
    image (that cost the build a sixth of its time); views of several shapes stay a list."""
    good = [(k, v, sz) for k, v, sz, err in items if err is None]
    errors = [err for *_, err in items if err is not None]
    views = [v for _, v, _ in good]
    if views and len({v.shape[1:] for v in views}) == 1:
        views = (torch.cat(views), [v.shape[0] for v in views])
    return [k for k, _, _ in good], views, [sz for _, _, sz in good], errors


def _encode(encode, views, device: str) -> list[torch.Tensor]:
    """Each image's features [V, P, D] from `_collate`'s views; images of one shape in one batch."""
    if isinstance(views, tuple):
        stacked, counts = views
        return list(encode(stacked.to(device)).split(counts))
    return by_shape([v.to(device) for v in views], encode)


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _plan_shards(ns, key_to_path: dict[str, str], shard_size: int) -> list[dict]:
    """Unfinished shards of a saved plan (kept exactly, so a resumed build redoes the same shards)
    followed by new shards for the images no shard covers."""
    done = set(ns.manifest()) | set(ns.journal())
    have = {k for e in list(ns.manifest().values()) + list(ns.journal().values()) for k in e["keys"]}
    pending = []
    if ns.plan_path.exists():
        pending = [s for s in read_json(ns.plan_path, "build plan", CacheError)["shards"] if s["name"] not in done]
        if any(k not in key_to_path for s in pending for k in s["keys"]):
            pending = []  # the data changed since the plan was made: plan afresh
    covered = have | {k for s in pending for k in s["keys"]}
    new = sorted(k for k in key_to_path if k not in covered)
    tag = hashlib.sha256("".join(new).encode()).hexdigest()[:8]
    chunks = [new[i : i + shard_size] for i in range(0, len(new), shard_size)]
    fresh = [{"name": f"{tag}-{j:05d}", "keys": keys} for j, keys in enumerate(chunks)]
    return pending + fresh


def build(
    store_dir: str | Path,
    vision,
    processor: ImageProcessor,
    images: list[str | Path],
    dtype: str = DEFAULT_DTYPE,
    batch_size: int = 64,
    shard_size: int = 1024,
    num_workers: int = 1,
    bad_images: str = "skip",
    max_image_pixels: int = 64_000_000,
    source: str = "",
    progress: bool = True,
    on_shard=None,
    top: int = 0,
) -> dict:
    """Encode the images of `images` missing from the store; return what was done.

    `vision` is a `VisionTower` on the device to encode on; `on_shard(name)` is called after each
    finished shard (progress reporting). Bad images are skipped and listed, or, with
    `bad_images="fail"`, stop the build after the shards already finished are saved. With `top`,
    what is stored is the states below the tower's top `top` blocks (`VisionTower.below`).
    """
    check_choice("feature dtype", dtype, STORE_DTYPES, CacheError)
    if bad_images not in ("skip", "fail"):
        raise ValueError(f"bad_images must be 'skip' or 'fail', got {bad_images!r}")
    t0 = time.time()
    device = str(next(vision.parameters()).device)
    rank, world, _ = runtime.join_process_group(1800, cuda=device.startswith("cuda"))
    show = progress and rank == 0
    if rank == 0:
        FeatureStore(store_dir, create=True)
    _barrier(world)
    store = FeatureStore(store_dir)
    paths = sorted({os.path.abspath(p) for p in images})
    key_to_path, errors, hashes = _hash_images(store, paths, rank, world, show, bad_images)
    ns = store.namespace(feature_settings(vision, processor, dtype, top))
    dropped = _prepare(store, ns, key_to_path, hashes, shard_size, source, show) if rank == 0 else []
    _barrier(world)
    plan = read_json(ns.plan_path, "build plan", CacheError)["shards"] if ns.plan_path.exists() else []
    mine = [s for i, s in enumerate(plan) if i % world == rank]
    cached = len(key_to_path) - sum(len(s["keys"]) for s in plan)
    job = _Job(ns, vision, top, processor, dtype, batch_size, num_workers, bad_images, max_image_pixels, device)
    encoded, skipped = _encode_shards(job, mine, key_to_path, world, show, on_shard) if mine else (0, [])
    totals = _gather((encoded, skipped), world)
    _barrier(world)
    if rank == 0:
        ns.merge_journal()
        ns.plan_path.unlink(missing_ok=True)
    _barrier(world)
    seconds = time.time() - t0
    n_encoded = sum(n for n, _ in totals)
    return {
        "store": str(store.root),
        "namespace": ns.id,
        "images": len(paths),
        "unique": len(key_to_path),
        "already_cached": cached,
        "encoded": n_encoded,
        "skipped": errors + [e for _, s in totals for e in s],
        "dropped_shards": dropped,
        "processes": world,
        "seconds": round(seconds, 3),
        "images_per_s": round(n_encoded / seconds, 2) if seconds > 0 else None,
        "dtype": dtype,
        "vision_top": top,
    }


def _hash_images(store, paths: list[str], rank: int, world: int, show: bool, bad_images: str):
    """Content keys, each rank hashing its slice of the paths: ({key: first path}, unreadable files,
    the size + mtime index's updates)."""
    hasher = ImageHasher(store.hashes())
    keys, errors = {}, []
    for p in tqdm(paths[rank::world], desc="hash images", unit="img", disable=not show, leave=False):
        try:
            keys[p] = hasher.key(p)
        except FileNotFoundError as e:
            errors.append(str(e))
    parts = _gather((keys, errors, hasher.updated), world)
    keys = {p: k for part in parts for p, k in part[0].items()}
    errors = [e for part in parts for e in part[1]]
    if errors and bad_images == "fail":
        raise ImageError(f"{len(errors)} image file(s) cannot be read, e.g. {errors[0]}")
    key_to_path: dict[str, str] = {}
    for p in sorted(keys):
        key_to_path.setdefault(keys[p], p)
    return key_to_path, errors, {p: e for part in parts for p, e in part[2].items()}


def _prepare(store, ns, key_to_path: dict, hashes: dict, shard_size: int, source: str, show: bool) -> list[str]:
    """Rank 0: the namespace made ready (journal merged, damaged shards dropped, orphans removed)
    and the plan of the shards to encode written; returns the shards dropped."""
    ns.create(source)
    ns.merge_journal()
    manifest = ns.manifest().items()
    bad = [
        n
        for n, e in tqdm(manifest, desc="check shards", unit="shard", disable=not show, leave=False)
        if ns.check_shard(n, e)
    ]
    if bad:
        ns.drop(bad)
        tqdm.write(f"{len(bad)} damaged shards dropped, their images are encoded again: {', '.join(bad[:5])}")
    plan = _plan_shards(ns, key_to_path, shard_size)
    if plan:
        write_json(ns.plan_path, {"shards": plan})
    ns.remove_orphans()
    store.save_hashes(hashes)
    return bad


@dataclass
class _Job:
    """What encoding a shard needs: where it goes, the tower and how its inputs are made."""

    ns: object
    vision: object
    top: int
    processor: ImageProcessor
    dtype: str
    batch_size: int
    num_workers: int
    bad_images: str
    max_image_pixels: int
    device: str


def _encode_shards(job: _Job, mine: list[dict], key_to_path: dict, world: int, show: bool, on_shard):
    """This rank's shards of the plan encoded and written, one at a time: (images encoded, skipped)."""
    items, batches = [], []
    for s in mine:
        start = len(items)
        items += [(k, key_to_path[k]) for k in s["keys"]]
        batches += [
            list(range(i, min(i + job.batch_size, len(items)))) for i in range(start, len(items), job.batch_size)
        ]
    loader = DataLoader(
        _Views(items, job.processor, job.max_image_pixels),
        batch_sampler=batches,
        num_workers=job.num_workers,
        collate_fn=_collate,
        persistent_workers=False,
    )
    stored = STORE_DTYPES[job.dtype]
    encode = lambda x: job.vision.for_store(x, job.top)  # noqa: E731
    desc = f"cache build ({world} proc)" if world > 1 else "cache build"
    bar = tqdm(total=len(items), desc=desc, unit="img", disable=not show)
    shard_iter = iter(mine)
    shard, shard_keys, shard_feats, shard_sizes, left = None, [], [], [], 0
    encoded, skipped = 0, []
    try:
        for keys_ok, views, sizes, errs in loader:
            if left == 0:
                shard = next(shard_iter)
                shard_keys, shard_feats, shard_sizes, left = [], [], [], len(shard["keys"])
            if errs and job.bad_images == "fail":
                raise ImageError(errs[0])
            skipped += errs
            if keys_ok:
                with torch.no_grad():
                    feats = _encode(encode, views, job.device)
                shard_keys += keys_ok
                shard_feats += [f.to(stored).cpu() for f in feats]
                shard_sizes += sizes
            left -= len(keys_ok) + len(errs)
            bar.update(len(keys_ok) + len(errs))
            if left == 0 and shard_keys:
                job.ns.write_shard(shard["name"], shard_keys, shard_feats, shard_sizes)
                encoded += len(shard_keys)
                if on_shard is not None:
                    on_shard(shard["name"])
    finally:
        bar.close()
    return encoded, skipped


def images_of(data: list[str | Path], streaming: bool = False):
    """Every image path of LLaVA-format files or `hf:` sources (validated as for training); with
    `streaming`, read from the sources as a stream (`data.stream`): only the paths are held."""
    from vlmforge.data.formats import load_records

    if streaming:
        from vlmforge.data.stream import RecordStream

        return RecordStream([str(f) for f in data]).images()
    return [p for f in data for r in load_records(f) for p in r.images]


def build_for(store_dir: str | Path, model_cfg, data: list[str | Path], dtype: str = DEFAULT_DTYPE, **kwargs) -> dict:
    """Fill the store with what training `model_cfg` (a `ModelConfig`) with `--train.cache` reads:
    the features its encoder settings give for every image of the LLaVA-format files `data` (with
    `top`, the states below the top blocks). `kwargs` go to `build`."""
    vision, proc, src = encoder_for(
        encoder=model_cfg.vision,
        feature_layer=model_cfg.feature_layer,
        pooled=model_cfg.vision_pooled,
        resize=model_cfg.resize,
        image_size=model_cfg.image_size,
        split_grid=model_cfg.split_grid,
        **model_cfg.image_settings(),
    )
    return build(store_dir, vision, proc, images_of(data), dtype, source=src, **kwargs)


def encoder_for(
    model: str | None = None,
    encoder: str | None = None,
    feature_layer: int = -1,
    pooled: bool = False,
    resize: str = "pad",
    image_size: int | None = None,
    split_grid: int | None = None,
    device: str = "cpu",
    **image,
):
    """(VisionTower, ImageProcessor, source) from a vlmforge model folder (its own settings) or an
    encoder (Hub id or folder) with explicit settings; `split_grid` overrides either. `image`:
    slicing, max_slices, min_side, max_side (ModelConfig's), given ones override the folder's."""
    from vlmforge.model import folder
    from vlmforge.model.vision import VisionTower

    if bool(model) == bool(encoder):
        raise ValueError("pass exactly one of --model (a vlmforge model folder) or --encoder (a vision encoder)")
    if model:
        cfg = folder.model_settings(model)
        encoder = str(folder.vision_dir(model))
        feature_layer, pooled, resize = cfg["feature_layer"], cfg["vision_pooled"], cfg["resize"]
        image_size = cfg.get("image_size")
        split_grid = cfg.get("split_grid", 0) if split_grid is None else split_grid
        image = {**{k: cfg[k] for k in ("slicing", "max_slices", "min_side", "max_side") if k in cfg}, **image}
    vision = VisionTower.from_pretrained(encoder, feature_layer, pooled=pooled, image_size=image_size)
    vision = vision.to(device).eval()
    processor = vision.image_processor(encoder, resize, split_grid or 0, **image)
    return vision, processor, encoder


def build_store(
    data: list[str],
    out: str,
    model: str | None = None,
    encoder: str | None = None,
    feature_layer: int = -1,
    pooled: bool = False,
    resize: str = "pad",
    image_size: int | None = None,
    split_images: bool = False,
    split_grid: int | None = None,
    slicing: str | None = None,
    max_slices: int | None = None,
    min_side: int | None = None,
    max_side: int | None = None,
    dtype: str = "fp16",
    batch_size: int = 64,
    shard_size: int = 1024,
    num_workers: int = 1,
    device: str = "auto",
    threads: int | None = None,
    bad_images: str = "skip",
    streaming: bool = False,
    vision_top: int = 0,
) -> None:
    """Encode every image of the data once with the frozen encoder into a feature store.

    Resumable (a killed build keeps its finished shards), deduplicated by image content, keyed by
    the encoder's weights and every preprocessing setting. Under `torchrun --nproc_per_node=N -m
    vlmforge cache build …` the ranks share the work.

    Args:
        data: LLaVA-format JSON files whose images to encode.
        out: the feature store folder (created, or filled further).
        model: a vlmforge model folder: its encoder and its settings.
        encoder: or a vision encoder (Hub id or folder) with the settings below.
        feature_layer: encoder layer (-1: last hidden state after the final norm).
        pooled: also store the pooled embedding as a leading token.
        resize: pad or expand (keep aspect), squash, crop, or native (see `--model.resize`).
        image_size: encoder resolution (default the encoder's own).
        split_images: cache image splitting's views: 2 x 2 crops plus the whole image.
        split_grid: image splitting grid k (k x k crops + whole; 0 off); default from the model.
        slicing: fixed or adaptive (see `--model.slicing`); default from the model, else fixed.
        max_slices: the adaptive slicing budget; default from the model, else 4.
        min_side: native's shortest side; default from the model, else half the resolution.
        max_side: native's longest side; default from the model, else twice the resolution.
        dtype: stored dtype: fp32, fp16 or bf16.
        batch_size: images per encoder batch.
        shard_size: images per shard file.
        num_workers: DataLoader processes decoding images.
        device: auto (the local GPU if there is one), cpu or cuda[:i].
        threads: torch CPU threads (default torch's).
        bad_images: skip unreadable images (listed at the end) or fail.
        streaming: read `hf:` sources as a stream, holding only the image paths (for corpora
            larger than memory; see `--train.streaming`).
        vision_top: store the states below the tower's top K blocks instead of its output, for
            training those blocks from the store (`--train.vision_mode top --train.vision_top K
            --train.cache ...`); 0 stores the output.
    """
    import json

    device = runtime.device(device)
    if split_images and split_grid is None:
        split_grid = 2
    image = {"slicing": slicing, "max_slices": max_slices, "min_side": min_side, "max_side": max_side}
    vision, processor, source = encoder_for(
        model,
        encoder,
        feature_layer,
        pooled,
        resize,
        image_size,
        split_grid,
        device,
        **{k: v for k, v in image.items() if v is not None},
    )
    if vision_top:
        vision.check_cut(vision_top)
    with runtime.threads(threads):
        stats = build(
            out,
            vision,
            processor,
            images_of(data, streaming),
            dtype,
            batch_size,
            shard_size,
            num_workers,
            bad_images,
            source=source,
            top=vision_top,
        )
    if runtime.world()[0] == 0:
        shown = {k: v for k, v in stats.items() if k != "skipped"}
        shown["skipped"] = len(stats["skipped"])
        print(json.dumps(shown, indent=1))
        for msg in stats["skipped"][:20]:
            print(f"skipped {msg}")
    runtime.leave_process_group()
