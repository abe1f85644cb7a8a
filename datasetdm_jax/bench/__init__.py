"""`datasetdm bench`: speed, FLOPs, MFU, memory and a side-by-side with diffusers on this device.

`run.run_bench(BenchConfig(...))` returns the report (a JSON-ready dict); `report.format_report`
renders it as markdown tables. Importing this package does not import JAX.
"""

from datasetdm_jax.bench.config import BenchConfig, add_arguments, from_args

__all__ = ["BenchConfig", "add_arguments", "from_args", "main"]


def main(cfg: BenchConfig, json_out: str | None = None) -> dict:
    """CLI body: run, print the tables, optionally write the JSON report."""
    import json

    from datasetdm_jax.bench.report import print_report
    from datasetdm_jax.bench.run import run_bench

    rep = run_bench(cfg)
    print_report(rep)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(rep, f, indent=1)
    return rep
