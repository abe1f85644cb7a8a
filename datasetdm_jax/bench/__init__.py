"""`datasetdm bench`: speed, FLOPs, MFU, memory and a side-by-side with diffusers on this device.

`run.run_bench(BenchConfig(...))` returns the report; `report.print_report` renders it.
"""

from datasetdm_jax.bench.run import BenchConfig, run_bench

__all__ = ["BenchConfig", "run_bench", "main"]


def main(cfg: BenchConfig, json_out: str | None = None) -> dict:
    """CLI body: run, print the tables, optionally write the JSON report."""
    import json

    from datasetdm_jax.bench.report import print_report

    rep = run_bench(cfg)
    print_report(rep)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(rep, f, indent=1)
    return rep
