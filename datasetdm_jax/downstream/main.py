"""``datasetdm downstream --config configs/downstream_*.py``: train the downstream models on
generated records plus real data, evaluate on the real test splits, print the table and write
``report.json`` and ``table.txt`` into the workdir."""

from __future__ import annotations

import json
from typing import Any, Sequence

import ml_collections

from datasetdm_jax import storage
from datasetdm_jax.config_utils import load_config
from datasetdm_jax.downstream.compare import ROWS, format_table, jsonable, run_comparison
from datasetdm_jax.downstream.data import real_arrays, records_arrays

__all__ = ["load_data", "main_downstream"]


def load_data(config: ml_collections.ConfigDict, counts: dict[str, Any] | None = None
              ) -> tuple[dict, dict | None, dict]:
    """(real train arrays, synthetic arrays or None, {test split: arrays}) as the config names them.

    ``config.real`` / ``config.test`` are data configs as ``datasetdm_jax.data.sources.build``
    reads them (``test.splits`` lists the evaluated splits, ``test.num`` caps each, 0 = all);
    ``config.synthetic.records`` is a folder written by ``datasetdm generate``; with
    ``synthetic.min_quality`` > 0 its records below that annotation confidence are left out
    (``counts`` receives read / kept / dropped).
    """
    rows = tuple(config.get("rows", ROWS))
    _check_classes(config)
    real = real_arrays(config.real, str(config.real.split), train=True)
    synthetic = None
    if str(config.synthetic.records):
        synthetic = records_arrays(str(config.synthetic.records), int(config.synthetic.num) or None,
                                   min_quality=float(config.synthetic.get("min_quality", 0.0)), counts=counts)
    elif any(row != "real" for row in rows):
        raise ValueError(f"rows {rows} need generated data: set synthetic.records=FOLDER (the records written "
                         f"by `datasetdm generate`) or rows=\"('real',)\"")
    t = config.test
    tests = {s: real_arrays(t, s, train=False, num=int(t.num) or None) for s in t.splits}
    return real, synthetic, tests


def _check_classes(config: ml_collections.ConfigDict) -> None:
    """semantic.num_classes must match the dataset's class list (when the dataset has one)."""
    if "semantic" not in tuple(config.tasks):
        return
    from datasetdm_jax.data import sources

    names = sources.class_names(config.real)
    if names and len(names) != int(config.semantic.num_classes):
        raise ValueError(f"semantic.num_classes={config.semantic.num_classes} but {config.real.source} has "
                         f"{len(names)} classes")


def main_downstream(config_path: str, workdir: str | None = None,
                    overrides: Sequence[str] | None = None) -> dict[str, Any]:
    config = load_config(config_path, overrides)
    workdir = storage.check(workdir or str(config.workdir))  # local or gs://; another scheme: one line, at once
    counts: dict[str, Any] = {}
    real, synthetic, tests = load_data(config, counts)
    result = run_comparison(real, synthetic, tests, config)
    if counts.get("min_quality"):
        result["synthetic_filter"] = counts
        print(f"quality filter: kept {counts['kept']} of {counts['read']} synthetic records "
              f"(min_quality {counts['min_quality']:g}, {counts['dropped']} dropped)")
    table = format_table(result)
    print(table)
    storage.makedirs(workdir)
    storage.write_bytes(storage.join(workdir, "report.json"),
                        json.dumps({"config": config.to_dict(), **jsonable(result)}, indent=1, default=str))
    storage.write_bytes(storage.join(workdir, "table.txt"), table + "\n")
    print(f"report: {storage.join(workdir, 'report.json')}")
    return result
