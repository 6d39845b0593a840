"""The feature store: encoder outputs computed once, found again by what produced them.

Layout of a store folder::

    store.json                      format marker
    hashes.json                     path -> (size, mtime_ns, sha256): skips re-reading unchanged files
    ns-<id>/settings.json           the settings this namespace was built with (its key)
    ns-<id>/manifest.json           shard name -> sha256, bytes, dtype, view shape, image keys, sizes
    ns-<id>/shards/<name>.safetensors   one tensor `features` [images, views, patches, dim], or
                                    [rows, dim] with each image's (views, patches) in `shapes`
                                    when they differ (adaptive slicing, native resolution)
    ns-<id>/journal/<name>.json     a finished shard not yet merged into the manifest
    ns-<id>/plan.json               the shards of an unfinished build

A feature is found by the sha256 of the image file's bytes inside a namespace, and a namespace is
the hash of every setting that changes the features: the encoder's weights fingerprint, its dtype,
the feature layer, the pooled token, the resolution, normalisation, resize policy, image
splitting, and the stored dtype. Changing any of them selects another namespace, so stale
features are never served: they miss. A namespace may hold, instead of the tower's output, the
states below its top K blocks (`vision_top` K in its settings, the fingerprint over the weights
below the cut only): training those K blocks reads them and runs only the blocks above.
Identical images (same bytes) are stored once.

Shards are written atomically (temp file + rename) and recorded in a journal entry only after
that, so a build killed at any moment leaves complete shards that the next build keeps. Every
shard's sha256 is in the manifest and is checked whenever a shard is read: a corrupted or
truncated shard raises `CacheError` and is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

import torch

from vlmforge.config import check_choice
from vlmforge.io import read_json, write_json

FORMAT = "vlmforge-feature-store"
VERSION = 1
STORE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Half the disk of fp32; `vlmforge bench cache` measures the rounding error of fp16 and bf16
# features against fp32 (fp16 keeps 3 more mantissa bits than bf16) and, with --accuracy, what
# each costs after the demo's training.
DEFAULT_DTYPE = "fp16"


class CacheError(ValueError):
    """A feature store that cannot be used as asked; the message names the store or shard."""


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ImageHasher:
    """Content keys of image files, re-reading a file only when its size or mtime changed (the
    same trade-off as git's index). `known` is the store's `hashes.json`."""

    def __init__(self, known: dict | None = None):
        self.known: dict[str, list] = dict(known or {})
        self.updated: dict[str, list] = {}

    def key(self, path: str | Path) -> str:
        """sha256 of the file's bytes; raises FileNotFoundError naming the file."""
        p = os.path.abspath(path)
        try:
            st = os.stat(p)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: image file not found") from None
        entry = self.known.get(p)
        if entry and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
            return entry[2]
        sha = file_sha256(p)
        self.known[p] = self.updated[p] = [st.st_size, st.st_mtime_ns, sha]
        return sha


def feature_settings(vision, processor, dtype: str, top: int = 0) -> dict:
    """The key of a namespace: every setting that changes the stored features; with `top`, of the
    states below the tower's top `top` blocks (the cut is part of the key)."""
    check_choice("feature dtype", dtype, STORE_DTYPES, CacheError)
    return {**vision.settings(top), **processor.settings(), "dtype": dtype}


def what_is_stored(top: int) -> str:
    """Words for what a namespace of cut `top` holds."""
    return f"the states below the top {top} blocks (vision_top {top})" if top else "the tower's output features"


def settings_id(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


class Namespace:
    """The features of one set of settings inside a store."""

    def __init__(self, root: Path, settings: dict):
        self.settings = settings
        self.id = settings_id(settings)
        self.dir = root / f"ns-{self.id}"
        self.shard_dir = self.dir / "shards"
        self.journal_dir = self.dir / "journal"
        self.manifest_path = self.dir / "manifest.json"
        self.plan_path = self.dir / "plan.json"

    def create(self, source: str = "") -> None:
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / "settings.json").exists():
            write_json(self.dir / "settings.json", {"settings": self.settings, "encoder_source": source})
        if not self.manifest_path.exists():
            write_json(self.manifest_path, {"shards": {}})

    @property
    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> dict:
        return read_json(self.manifest_path, "manifest", CacheError)["shards"] if self.exists else {}

    def journal(self) -> dict:
        if not self.journal_dir.is_dir():
            return {}
        return {p.stem: read_json(p, "journal entry", CacheError) for p in sorted(self.journal_dir.glob("*.json"))}

    def shard_path(self, name: str) -> Path:
        return self.shard_dir / f"{name}.safetensors"

    def write_shard(self, name: str, keys: list[str], features: list[torch.Tensor], sizes: list | None = None) -> dict:
        """Write one shard of images' features ([views, patches, dim] each) atomically, then its
        journal entry; return the entry. `sizes`: the images' (width, height)."""
        from safetensors.torch import save

        from vlmforge.io import atomic_write_bytes

        ragged = len({f.shape for f in features}) > 1
        tensor = torch.cat([f.reshape(-1, f.shape[-1]) for f in features]) if ragged else torch.stack(features)
        data = save({"features": tensor.contiguous()}, metadata={"keys": json.dumps(keys)})
        atomic_write_bytes(self.shard_path(name), data)
        entry = {
            "sha256": bytes_sha256(data),
            "bytes": len(data),
            "keys": keys,
            "view_shape": None if ragged else list(features[0].shape),
            "dtype": str(tensor.dtype).replace("torch.", ""),
        }
        if ragged:
            entry["shapes"] = [list(f.shape[:2]) for f in features]
        if sizes is not None:
            entry["sizes"] = [list(s) for s in sizes]
        write_json(self.journal_dir / f"{name}.json", entry)
        return entry

    def check_shard(self, name: str, entry: dict) -> str | None:
        """None if the shard file matches its manifest entry, else what is wrong."""
        path = self.shard_path(name)
        if not path.is_file():
            return "file missing"
        size = path.stat().st_size
        if size != entry["bytes"]:
            return f"truncated or resized ({size} bytes, manifest says {entry['bytes']})"
        if file_sha256(path) != entry["sha256"]:
            return "checksum mismatch (corrupted)"
        return None

    def merge_journal(self) -> int:
        """Fold finished shards into the manifest (idempotent); return how many were added."""
        journal = self.journal()
        if not journal:
            return 0
        shards = self.manifest()
        shards.update(journal)
        write_json(self.manifest_path, {"shards": shards})
        for name in journal:
            (self.journal_dir / f"{name}.json").unlink(missing_ok=True)
        return len(journal)

    def drop(self, names: list[str]) -> None:
        """Remove shards from the manifest and disk (a later build recomputes their images)."""
        shards = self.manifest()
        for name in names:
            shards.pop(name, None)
            self.shard_path(name).unlink(missing_ok=True)
            (self.journal_dir / f"{name}.json").unlink(missing_ok=True)
        write_json(self.manifest_path, {"shards": shards})

    def remove_orphans(self) -> list[str]:
        """Delete shard files and temp files that no manifest, journal entry or plan refers to."""
        known = set(self.manifest()) | set(self.journal())
        if self.plan_path.exists():
            known |= {s["name"] for s in read_json(self.plan_path, "build plan", CacheError)["shards"]}
        removed = []
        for p in self.shard_dir.iterdir() if self.shard_dir.is_dir() else []:
            name = p.name[: -len(".safetensors")] if p.name.endswith(".safetensors") else None
            if name is None or name not in known or p.name.startswith("."):
                p.unlink()
                removed.append(p.name)
        return removed


class FeatureStore:
    """A folder of feature namespaces (see the module docstring)."""

    def __init__(self, root: str | Path, create: bool = False):
        self.root = Path(root)
        marker = self.root / "store.json"
        if marker.is_file():
            meta = read_json(marker, "store marker", CacheError)
            if meta.get("format") != FORMAT:
                raise CacheError(f"{self.root}: not a vlmforge feature store")
            if meta.get("version") != VERSION:
                found = meta.get("version")
                raise CacheError(f"{self.root}: feature store version {found}, this vlmforge reads {VERSION}")
        elif create:
            if self.root.exists() and any(self.root.iterdir()):
                raise CacheError(f"{self.root}: exists and is not a feature store (refusing to write into it)")
            self.root.mkdir(parents=True, exist_ok=True)
            write_json(marker, {"format": FORMAT, "version": VERSION})
        else:
            raise CacheError(f"{self.root}: no feature store here (build one with `vlmforge cache build`)")

    def namespace(self, settings: dict) -> Namespace:
        return Namespace(self.root, settings)

    def namespaces(self) -> list[tuple[Namespace, dict]]:
        out = []
        for d in sorted(self.root.glob("ns-*")):
            if (d / "settings.json").is_file():
                meta = read_json(d / "settings.json", "namespace settings", CacheError)
                out.append((Namespace(self.root, meta["settings"]), meta))
        return out

    def hashes(self) -> dict:
        path = self.root / "hashes.json"
        return read_json(path, "hash index", CacheError) if path.is_file() else {}

    def save_hashes(self, updated: dict) -> None:
        if updated:
            write_json(self.root / "hashes.json", {**self.hashes(), **updated})

    def find(self, vision, processor, dtype: str | None = None, top: int = 0) -> Namespace | None:
        """The namespace for this encoder and processor (of the cut below the top `top` blocks, 0:
        the tower's output); with `dtype` None, the most precise one built."""
        for d in [dtype] if dtype else list(STORE_DTYPES):
            ns = self.namespace(feature_settings(vision, processor, d, top))
            if ns.exists:
                return ns
        return None

    def other_cuts(self, vision, processor, top: int = 0) -> list[int]:
        """The cuts this store holds for this encoder and processor other than `top` (0: the
        tower's output features), so that a miss can say what is there instead."""
        found = set()
        for ns, _ in self.namespaces():
            cut = ns.settings.get("vision_top", 0)
            if cut != top and cut <= len(vision.blocks) and ns.settings.get("dtype") in STORE_DTYPES:
                if ns.settings == feature_settings(vision, processor, ns.settings["dtype"], cut):
                    found.add(cut)
        return sorted(found)

    def reader(
        self, vision, processor, dtype: str | None = None, max_bytes: int = 4 << 30, top: int = 0
    ) -> FeatureReader:
        ns = self.find(vision, processor, dtype, top)
        return FeatureReader(ns, self.hashes(), max_bytes)

    def info(self) -> dict:
        spaces = []
        for ns, meta in self.namespaces():
            shards = ns.manifest()
            n_keys = sum(len(e["keys"]) for e in shards.values())
            nbytes = sum(e["bytes"] for e in shards.values())
            view = next((e["view_shape"] or "varies per image" for e in shards.values()), None)
            spaces.append(
                {
                    "id": ns.id,
                    "encoder_source": meta.get("encoder_source", ""),
                    "settings": ns.settings,
                    "images": n_keys,
                    "shards": len(shards),
                    "bytes": nbytes,
                    "bytes_per_image": round(nbytes / n_keys) if n_keys else None,
                    "view_shape": view,
                    "unfinished_build": ns.plan_path.exists() or bool(ns.journal()),
                }
            )
        return {"store": str(self.root), "namespaces": spaces}

    def verify(self, repair: bool = False, progress: bool = True) -> dict:
        """Check every shard against its manifest entry; with `repair`, drop the bad ones."""
        from tqdm import tqdm

        bad, checked = [], 0
        for ns, _ in self.namespaces():
            if repair:
                ns.merge_journal()
            shards = ns.manifest()
            broken = []
            for name, entry in tqdm(shards.items(), desc=f"verify {ns.id}", unit="shard", disable=not progress):
                checked += 1
                problem = ns.check_shard(name, entry)
                if problem:
                    broken.append(name)
                    bad.append({"namespace": ns.id, "shard": str(ns.shard_path(name)), "problem": problem})
            if repair and broken:
                ns.drop(broken)
        return {"checked": checked, "bad": bad, "repaired": repair}


class FeatureReader:
    """Features by image path for one namespace; shards are loaded whole, checked against their
    sha256, and kept in an LRU bounded by `max_bytes`. Safe to use in DataLoader workers."""

    def __init__(self, ns: Namespace | None, hashes: dict | None = None, max_bytes: int = 4 << 30):
        self.ns = ns
        self.hasher = ImageHasher(hashes)
        self.max_bytes = max_bytes
        self.shards = ns.manifest() if ns is not None else {}
        self.index = {k: (name, i) for name, e in self.shards.items() for i, k in enumerate(e["keys"])}
        # ragged shards: each image's first row and (views, patches)
        self.rows = {name: _offsets(e["shapes"]) for name, e in self.shards.items() if "shapes" in e}
        self._lru: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lru_bytes = 0

    def __len__(self) -> int:
        return len(self.index)

    def key(self, path: str | Path) -> str:
        return self.hasher.key(path)

    def has(self, path: str | Path) -> bool:
        return self.key(path) in self.index

    def _shard(self, name: str) -> torch.Tensor:
        if name in self._lru:
            self._lru.move_to_end(name)
            return self._lru[name]
        from safetensors.torch import load

        entry, path = self.shards[name], self.ns.shard_path(name)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CacheError(f"{path}: shard file missing; run `vlmforge cache build` to rebuild it") from None
        if len(data) != entry["bytes"] or bytes_sha256(data) != entry["sha256"]:
            raise CacheError(
                f"{path}: corrupted or truncated shard (checksum mismatch); run `vlmforge cache verify "
                f"{self.ns.dir.parent} --repair true` and `vlmforge cache build` to rebuild it"
            )
        feats = load(data)["features"]
        self._lru[name] = feats
        self._lru_bytes += feats.numel() * feats.element_size()
        while self._lru_bytes > self.max_bytes and len(self._lru) > 1:
            _, old = self._lru.popitem(last=False)
            self._lru_bytes -= old.numel() * old.element_size()
        return feats

    def get(self, path: str | Path) -> torch.Tensor | None:
        """The features of one image [views, patches, dim] in the stored dtype, or None if absent."""
        return self.by_key(self.key(path))

    def by_key(self, key: str) -> torch.Tensor | None:
        """The features stored under an image key (`key(path)`), or None if absent."""
        hit = self.index.get(key)
        if hit is None:
            return None
        name, row = hit
        if name in self.rows:
            start, (v, p) = self.rows[name][row]
            return self._shard(name)[start : start + v * p].view(v, p, -1)
        return self._shard(name)[row]

    def image_size(self, key: str) -> tuple[int, int] | None:
        """The (width, height) of the image stored under `key` (None in stores written before
        sizes were kept)."""
        name, row = self.index[key]
        sizes = self.shards[name].get("sizes")
        return tuple(sizes[row]) if sizes else None


def _offsets(shapes: list) -> list[tuple[int, tuple[int, int]]]:
    out, at = [], 0
    for v, p in shapes:
        out.append((at, (v, p)))
        at += v * p
    return out


def show_info(store: str, json_out: bool = False) -> None:
    """Print a feature store's namespaces: settings, images, shards, bytes.

    Args:
        store: the feature store folder.
        json_out: print JSON instead of a table.
    """
    info = FeatureStore(store).info()
    if json_out:
        print(json.dumps(info, indent=1))
        return
    print(f"feature store {info['store']}: {len(info['namespaces'])} namespace(s)")
    for ns in info["namespaces"]:
        st = ns["settings"]
        print(
            f"- ns-{ns['id']}: {ns['images']} images in {ns['shards']} shards, {ns['bytes'] / 1e6:.1f} MB "
            f"({ns['bytes_per_image']} bytes/image), view shape {ns['view_shape']}, dtype {st['dtype']}"
            + ("  [unfinished build: run cache build again]" if ns["unfinished_build"] else "")
        )
        print(
            f"    encoder {ns['encoder_source']} (weights sha256 {st['encoder'][:12]}…, {st['encoder_dtype']}), "
            f"feature_layer {st['feature_layer']}, pooled {st['pooled']}, {st['image_size']}px {st['resize']}, "
            f"split grid {st['grid']}; holds {what_is_stored(st.get('vision_top', 0))}"
        )


def verify_store(store: str, repair: bool = False) -> None:
    """Check every shard of a feature store against the sha256 in its manifest.

    Args:
        store: the feature store folder.
        repair: drop damaged shards from the manifest (the next `cache build` encodes them again).
    """
    report = FeatureStore(store).verify(repair=repair)
    for bad in report["bad"]:
        print(f"BAD {bad['shard']}: {bad['problem']}")
    dropped = ", dropped" if repair and report["bad"] else ""
    print(f"{report['checked']} shards checked, {len(report['bad'])} bad{dropped}")
    if report["bad"] and not repair:
        raise CacheError(f"{store}: {len(report['bad'])} damaged shards (run with --repair true, then cache build)")
