"""`datasetdm bench --memory-only` on the tiny model: compile-only peak memory, largest batch in
budget, and GFLOP per image with the v5e 50%-MFU estimate (nothing is run)."""

import jax.numpy as jnp
import pytest

from datasetdm_jax import bench, cli
from datasetdm_jax.bench import models, programs, report
from datasetdm_jax.bench.timing import compile_fn


@pytest.fixture(scope="module")
def rep(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_memory")
    argv = ["bench", "--memory-only", "--memory-model", "tiny", "--memory-sizes", "16", "--steps", "5",
            "--workdir", str(root / "work")]
    return bench.main(bench.from_args(cli.build_parser().parse_args(argv)))


def test_memory_only_report(rep):
    assert rep["rows"] == [] and "generation" not in rep
    (m,) = rep["memory"]
    assert m["model"] == "tiny" and m["size"] == 16 and m["steps"] == 5 and m["capture"] == "datasetdm"
    assert m["per_image_bytes"] > 0 and m["max_batch"] >= 1 and m["peak_at_max_batch_bytes"] <= m["budget_bytes"]
    assert m["est_v5e_img_per_s_at_50pct_mfu"] == pytest.approx(0.5 * 197e3 / m["gflop_per_image"])
    text = report.format_report(rep)
    assert "largest batch in budget" in text and "an estimate, not a measurement" in text
    assert f"{m['gflop_per_image']:,.1f} (5)" in text


def test_gflop_per_image_counts_every_step(rep, tmp_path):
    """XLA counts the loop body once whatever the steps (so the 2-step program stands in for any
    step count); the estimate adds one sampler step per further loop trip."""
    (m,) = rep["memory"]
    pipe = models.abstract_pipeline("tiny", tmp_path / "tiny", jnp.bfloat16)
    gen = lambda steps: programs.generation(pipe, 1, 16, steps=steps, scheduler="pndm", capture="datasetdm",
                                            devices=1)
    g2, g5 = (compile_fn(p.fn, *p.args).gflop for p in (gen(2), gen(5)))
    assert g2 == pytest.approx(g5, rel=1e-6)
    step = programs.sampler_step(pipe, 1, 16, steps=5, scheduler="pndm", devices=1)
    step_gflop = compile_fn(step.fn, *step.args).gflop
    trips = programs.loop_trips(pipe, 5, "pndm", "datasetdm")
    assert trips >= 4 and step_gflop > 0
    assert m["gflop_per_image"] == pytest.approx(g2 + (trips - 1) * step_gflop, rel=1e-6)
