"""Annotated datasets on disk: `datasetdm generate --config configs/<task>.py --num_images N --out DIR`.

Global example i lives in shard i // shard_size; shard s is made by process s % process_count,
in fixed batches of `batch_size` global indices (the last one padded), so what an example
becomes depends on its index only: reruns, resumed runs and runs on other process counts write
the same bytes. A shard is complete once its summary NAME.json exists (written after the data
files, each by temp file + fsync + rename, or by one upload to a bucket); the manifest is written
last, by process 0.

``--out`` is a local folder or ``gs://BUCKET/PREFIX`` (``datasetdm_jax.storage``); every process
writes its shards there, and what is already there is what a rerun skips. Several processes meet at
``jax.experimental.multihost_utils.sync_global_devices`` barriers: once after process 0 recorded
the spec, once when every shard is written (process 0 then reads all summaries back from ``--out``)
and once after the manifest. Each process appends its progress (images and shards done, images/s)
to ``OUT/logs/process-K.jsonl`` after every shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from datasetdm_jax import errors, labelers, pretrained, storage
from datasetdm_jax.errors import UserError

__all__ = ["SPEC_FILE", "LOG_DIR", "FORMAT", "TRAINING_ONLY_KEYS", "check_settings", "generate_dataset", "main_generate"]

SPEC_FILE = "spec.json"
LOG_DIR = "logs"   # OUT/logs/process-K.jsonl: per-process progress, not part of the dataset's bytes
FORMAT = "datasetdm-jax/generated-v1"


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if _canonical(a.get(k)) != _canonical(b.get(k)):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else k)
    return f"{path or 'spec'}: {_canonical(a)[:60]} != {_canonical(b)[:60]}"


def _model_fingerprint(path: str) -> dict[str, Any]:
    """The model folder (or Hugging Face repo id) and a hash of its JSON configs (weights are too big
    to hash on every run)."""
    if not path:  # "" = the shipped shapes-world model, as in `train.load_frozen_pipeline`
        from datasetdm_jax.assets import SHAPES_SD
        path = SHAPES_SD
    from datasetdm_jax import hub

    name = path if hub.is_repo_id(path) else None  # a repo id: its snapshot in the Hugging Face cache
    path = hub.cached_folder(path)
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for f in sorted(files):
            if f.endswith(".json"):
                h.update(f.encode() + open(os.path.join(root, f), "rb").read())
    return {"path": name or os.path.abspath(path), "configs_sha256": h.hexdigest()}


# Config keys that only steer the decoder's training. The labeller's description pins the trained
# decoder itself (its parameters' sha256), so these cannot change a generated label; comparing them
# made a dataset refuse to resume after an unrelated training setting (say `baseline.width`) was added.
TRAINING_ONLY_KEYS = frozenset({
    "baseline", "batch_size", "cache_features", "checkpoint_every_s", "deep_supervision", "eval", "eval_every",
    "keep_checkpoints", "log_every", "lr", "max_steps", "name", "num_points", "seed", "select_metric", "steps",
    "val"})


def _generation_view(spec: dict[str, Any]) -> dict[str, Any]:
    """What of a dataset spec decides its content: the spec without the training-only config keys."""
    config = {k: v for k, v in spec.get("config", {}).items() if k not in TRAINING_ONLY_KEYS}
    return {**spec, "config": config}


def _stored_spec(out: str) -> dict[str, Any] | None:
    path = storage.join(out, SPEC_FILE)
    try:
        return json.loads(storage.read_bytes(path))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is corrupt ({e}); it records how the dataset in {out} was made: restore it, "
                        "or choose a new --out") from None


def _has_shards(out: str) -> bool:
    """Whether ``out`` holds a finished shard (its summary ``data-*.json``) or a manifest."""
    from datasetdm_jax.data import records

    return any(n == records.MANIFEST or (n.startswith("data-") and n.endswith(".json")) for n in storage.listdir(out))


def check_settings(config, num_images: int) -> None:
    """The ``generate`` section and ``num_images``, checked before a model loads or a file is written
    (one-line ``UserError`` naming the key and what it takes)."""
    from datasetdm_jax import generate, schedulers, sharding
    from datasetdm_jax.data import records
    from datasetdm_jax.labelers import grounding

    if "generate" not in config:
        raise UserError("the config has no `generate` section: pick a config made for `datasetdm generate`")
    g = config.generate
    errors.check_number("--num_images", num_images, integer=True, low=1)
    for key in ("steps", "batch_size", "shard_size"):
        errors.check_number(f"generate.{key}", g.get(key), integer=True, low=1)
    errors.check_number("generate.seed", g.get("seed", 0), integer=True, low=0)
    errors.check_number("generate.guidance", g.get("guidance", 1.0))
    choices = {"scheduler": tuple(schedulers.SAMPLERS), "image_format": ("png", "jpeg"),
               "labeler": tuple(labelers.LABELERS), "feature_pass": generate.FEATURE_PASSES,
               "grounding": grounding.MODES, "param_sharding": sharding.MODES}
    for key, known in choices.items():
        if key in g and str(g[key]).lower() not in known:
            raise UserError(f"generate.{key}={g[key]!r}: expected one of {', '.join(known)}")
    try:
        records.check_formats(g.get("formats", ("tfrecord", "array_record")))
        grounding.settings(g)
        pretrained.resolve_dtype(config.get("dtype", "auto"))
    except ValueError as e:
        raise UserError(str(e)) from None


def _check_spec(out: str, spec: dict[str, Any], stored: dict[str, Any] | None) -> dict[str, Any]:
    """Refuse to mix datasets: ``out`` must be empty/new or hold a spec (``stored``) that generates
    the same data. Returns the spec of record (the stored one, on a resume), which the manifest repeats."""
    from datasetdm_jax.data import records

    if stored is not None:
        old, new = _generation_view(stored), _generation_view(spec)
        if _canonical(old) == _canonical(new):
            return stored
        if _has_shards(out):
            raise UserError(f"{out} holds a dataset made with a different setting ({_first_difference(old, new)}); "
                            "choose a new --out, or rerun the command that made it to resume")
        # A run that failed before finishing any shard made nothing: its spec does not lock the folder.
        if jax.process_index() == 0:
            print(f"generate: {out} holds no finished shard; its {SPEC_FILE} (from a run that stopped before "
                  f"writing any) is replaced ({_first_difference(old, new)})")
            records.atomic_write(storage.join(out, SPEC_FILE), json.dumps(spec, indent=1, sort_keys=True))
        return spec
    if [n for n in storage.listdir(out) if not n.startswith(".")]:
        raise ValueError(f"{out} is not empty and has no {SPEC_FILE}: not a dataset of `datasetdm generate`; "
                         "choose a new --out")
    storage.makedirs(out)
    records.atomic_write(storage.join(out, SPEC_FILE), json.dumps(spec, indent=1, sort_keys=True))
    return spec


def _shard_stats(labels: list[dict[str, Any]], num_classes: int | None) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    key = next((k for k in ("segmentation", "instance_labels") if labels and k in labels[0]), None)
    if num_classes and key:  # semantic maps, else instance classes
        present = np.zeros(num_classes, np.int64)
        for lab in labels:
            present += np.bincount(np.asarray(lab[key]).reshape(-1).clip(0, num_classes - 1),
                                   minlength=num_classes) > 0
        stats["images_with_class"] = present.tolist()
    q = [float(lab["quality"]) for lab in labels if lab.get("quality") is not None]
    if q:
        stats["quality_sum"] = float(np.sum(np.asarray(q, np.float64)))
    return stats


def _barrier(name: str) -> None:
    """All processes meet here (``sync_global_devices``; a no-op for one process). It waits as long
    as the slowest process needs; a process that died makes it fail (its peers' connections drop, or
    jax.distributed's heartbeat timeout, 100 s by default, stops the survivors) with this message."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    try:
        multihost_utils.sync_global_devices(name)
    except Exception as e:  # noqa: BLE001 - gloo / runtime errors have no common type
        raise errors.RunStopped(
            f"generate: process {jax.process_index()}: another process of this run failed or died before "
            f"'{name}' ({type(e).__name__}: {str(e).splitlines()[0][:200]}); finished shards are kept: "
            "rerun every process with the same command to finish the dataset") from e


def _gather_summaries(out: str, names: Sequence[str]) -> list[dict[str, Any]] | None:
    """Process 0 gets every shard's summary, read back from ``out`` itself (the shared folder or
    bucket every process wrote its ``NAME.json`` to) once all processes passed the barrier; other
    processes get None."""
    _barrier("datasetdm_generate_shards")
    if jax.process_index() != 0:
        return None
    present = set(storage.listdir(out))
    missing = [n for n in names if n + ".json" not in present]
    if missing:
        raise errors.RunStopped(f"generate: {len(missing)} shard(s) missing from {out} after every process finished "
                           f"(first: {missing[0]}); each process must write to the same --out (a bucket "
                           "or a shared folder, not a per-host local disk); rerun to finish")
    return [json.loads(storage.read_bytes(storage.join(out, n + ".json"))) for n in names]


class _ProgressLog:
    """``OUT/logs/process-K.jsonl``: one JSON line per event (start, each shard written, done) with
    images and shards done, images/s; rewritten whole after each line (one small upload to a bucket),
    so it can be read while the job runs. A rerun appends to the lines already there."""

    def __init__(self, out: str, pid: int, nproc: int, **totals: int):
        self.path = storage.join(out, LOG_DIR, f"process-{pid}.jsonl")
        self.base = {"process": pid, "processes": nproc, **totals}
        storage.makedirs(storage.join(out, LOG_DIR))
        try:
            self.text = storage.read_text(self.path)
        except (FileNotFoundError, IsADirectoryError):
            self.text = ""
        self.t0 = time.time()

    def write(self, event: str, **fields: Any) -> None:
        elapsed = time.time() - self.t0
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": event, **self.base, **fields,
                "elapsed_s": round(elapsed, 3)}
        made = fields.get("images_made", 0)
        line["images_per_s"] = round(made / elapsed, 4) if made and elapsed > 0 else 0.0
        self.text += json.dumps(line, sort_keys=True) + "\n"
        try:
            storage.write_bytes(self.path, self.text)
        except OSError as e:  # progress is advisory: a failed log write must not stop generation
            print(f"generate: could not write {self.path}: {e}")


def generate_dataset(config, num_images: int, out: str, *, config_path: str | None = None, pipe=None,
                     labeler=None, progress: bool = True) -> dict[str, Any] | None:
    """Generate (or resume) ``num_images`` annotated examples into ``out``; returns the manifest
    (None on processes other than 0). See the section comment above for the layout."""
    from tqdm.auto import tqdm

    from datasetdm_jax import prompts as prompts_lib
    from datasetdm_jax.data import records, sources

    # gs://BUCKET/PREFIX or a local folder (not a file, not below one, writable); any other scheme,
    # and any bad setting: one line, before a model loads or anything is written
    out = errors.check_output_dir(out)
    check_settings(config, num_images)
    g = config.generate
    num_images = int(num_images)
    class_names = tuple(sources.class_names(config.data))  # the decoder's label values, e.g. VOC's 21
    source = prompts_lib.from_config(g.prompts, known_classes=class_names)
    shard_size, seed, fmt = int(g.shard_size), int(g.seed), str(g.image_format)
    formats = records.check_formats(g.get("formats", ("tfrecord", "array_record")))
    num_shards = -(-num_images // shard_size)
    pid, nproc = jax.process_index(), jax.process_count()
    mine = [s for s in range(num_shards) if s % nproc == pid]
    names = [records.shard_name(s, num_shards) for s in range(num_shards)]
    present = set(storage.listdir(out))  # one listing: what the folder or bucket already holds
    todo = [s for s in mine if names[s] + ".json" not in present]
    spec = {"format": FORMAT, "config": json.loads(config.to_json()), "num_images": num_images,
            "model": _model_fingerprint(str(config.pipeline)), "prompts": source.describe()}
    labeler = labeler or (labelers.make_labeler(config, pipe=pipe, config_path=config_path) if todo else None)
    frozen = pipe if pipe is not None else getattr(labeler, "pipe", None)  # what runs, else what would
    spec["model"]["dtype"] = str(frozen.dtype if frozen is not None else
                                 pretrained.resolve_dtype(config.get("dtype", "auto")))
    stored = _stored_spec(out)
    if labeler is not None:
        spec["labeler"] = labeler.describe()
    elif stored is not None:  # nothing left to do here: keep the stored labeller
        spec["labeler"] = stored.get("labeler")
    if stored is not None or pid == 0:  # every process checks a stored spec; process 0 records a new one
        spec = _check_spec(out, spec, stored)
    _barrier("datasetdm_generate_spec")
    if stored is None and pid != 0:
        stored = _stored_spec(out)
        if stored is None:
            raise errors.RunStopped(f"generate: process {pid}: no {SPEC_FILE} in {out} after process 0 wrote it; every "
                               "process must write to the same --out (a bucket or a shared folder)")
        if labeler is None:
            spec["labeler"] = stored.get("labeler")
        spec = _check_spec(out, spec, stored)

    def count(s):
        return min(shard_size, num_images - s * shard_size)

    total = sum(count(s) for s in mine)
    done_before = total - sum(count(s) for s in todo)
    bar = tqdm(total=total, initial=done_before, unit="img", desc=f"generate [{pid + 1}/{nproc}]",
               dynamic_ncols=True, disable=not progress)
    t0, made = time.time(), 0
    bs = int(g.batch_size)
    log = _ProgressLog(out, pid, nproc, images_total=total, shards_total=len(mine))
    shards_done = len(mine) - len(todo)
    log.write("start", images_done=done_before, shards_done=shards_done, images_made=0)

    def encode(recs: list[dict]) -> list[bytes]:
        return [records.to_example(r, fmt, class_names=class_names) for r in recs]

    # Image/label encoding of batch k runs in this thread while the device works on batch k + 1;
    # results are collected in submission order, so the shards do not depend on timing.
    encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="datasetdm-encode")
    try:
        stale = [] if storage.is_remote(out) else [n for n in storage.listdir(out) if ".tmp-" in n]
        for s in todo:
            for n in stale:  # a killed local run's temp files (a bucket gets whole uploads only)
                if n.startswith(names[s]):
                    os.remove(os.path.join(out, n))
            encoded, all_labels = [], []
            lo, hi = s * shard_size, s * shard_size + count(s)
            for b0 in range(lo, hi, bs):
                idx = np.arange(b0, min(b0 + bs, hi))
                ps = source.batch(idx)
                res = labeler(ps, idx, seed)
                used = res.prompts or [p.text for p in ps]
                encoded.append(encoder.submit(encode, [
                    {"image": res.images[k], "prompt": used[k], "classes": list(ps[k].classes),
                     "index": int(i), "seed": seed, **res.labels[k]} for k, i in enumerate(idx)]))
                all_labels += res.labels
                bar.update(len(idx))
                made += len(idx)
            examples = [e for f in encoded for e in f.result()]
            records.write_shard(out, names[s], examples, formats=formats,
                                extra={"stats": _shard_stats(all_labels, len(class_names))})
            shards_done += 1
            log.write("shard", shard=names[s], images_done=done_before + made, shards_done=shards_done,
                      images_made=made)
    finally:
        encoder.shutdown(wait=True, cancel_futures=True)
        bar.close()
    elapsed = time.time() - t0
    log.write("shards_written", images_done=done_before + made, shards_done=shards_done, images_made=made)
    summaries = _gather_summaries(out, names)
    if summaries is None:
        _barrier("datasetdm_generate_manifest")  # returns once process 0 wrote the manifest
        print(f"generate: process {pid} wrote {len(todo)} shard(s), {made} images in {elapsed:.1f} s")
        return None
    manifest = _manifest(spec, summaries, num_images, shard_size, class_names)
    from datasetdm_jax import export
    export.write_preview(out, [storage.join(out, x["files"][formats[0]]["file"]) for x in summaries[:1]],
                         storage.join(out, "preview.png"))
    if "array_record" in formats:  # tfds.builder_from_directory(out) reads the ArrayRecord shards in place
        from datasetdm_jax.data import records_tfds
        records_tfds.write_metadata(out, summaries)
    records.atomic_write(storage.join(out, records.MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
    _barrier("datasetdm_generate_manifest")
    rate = made / elapsed if elapsed > 0 and made else 0.0
    print(f"generate: {num_images} images in {num_shards} shard(s) at {out} "
          f"(this process: {made} made now in {elapsed:.1f} s, {rate:.2f} img/s; {done_before} already there)")
    return manifest


def _manifest(spec: Mapping[str, Any], summaries: list[dict[str, Any]], num_images: int,
              shard_size: int, class_names: Sequence[str]) -> dict[str, Any]:
    counts: dict[str, Any] = {"images": sum(x["num_records"] for x in summaries)}
    if counts["images"] != num_images:
        raise RuntimeError(f"manifest: {counts['images']} records in shards, expected {num_images}")
    with_class = [x["stats"].get("images_with_class") for x in summaries]
    if all(w is not None for w in with_class) and with_class:
        tot = np.sum(np.asarray(with_class), 0)
        counts["images_with_class"] = {class_names[k]: int(v) for k, v in enumerate(tot)}
    q = [x["stats"].get("quality_sum") for x in summaries]
    if all(v is not None for v in q) and q:
        counts["mean_quality"] = float(np.sum(q) / num_images)
    # class_names: label value -> name (what `datasetdm export` writes as COCO categories); for COCO
    # they come from the annotation file, so the manifest is where a reader finds them
    return {**spec, "counts": counts, "shard_size": shard_size, "num_shards": len(summaries),
            "class_names": list(class_names),
            "shards": [{k: v for k, v in x.items() if k != "stats"} for x in summaries]}


def main_generate(config_path: str, num_images: int, out: str, overrides: Sequence[str] | None = None) -> None:
    """CLI body of ``datasetdm generate --config FILE.py[:arg] --num_images N --out DIR [key=value ...]``."""
    from datasetdm_jax.config_utils import load_config

    errors.check_output_dir(out)  # before the model loads: an unusable --out fails at once
    config = load_config(config_path, overrides)
    if "generate" not in config:
        raise UserError(f"{config_path} has no `generate` section: pick a config made for `datasetdm generate`")
    check_settings(config, num_images)
    generate_dataset(config, num_images, out, config_path=config_path.split(":")[0])
