"""`datasetdm bench` on the tiny model: one run of every section (1 repeat), then checks on the
report's fields, FLOPs and ratios. No timing asserts: timings depend on the machine's load."""

import json
import math

import pytest

from datasetdm_jax import bench, cli
from datasetdm_jax.bench import peaks, report
from datasetdm_jax.bench.run import run_bench


@pytest.fixture(scope="module")
def rep(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    argv = ["bench", "--model", "tiny", "--batch", "2", "--steps", "2", "--repeats", "1", "--memory-model", "tiny",
            "--memory-sizes", "16", "--workdir", str(root / "work"), "--json", str(root / "report.json")]
    args = cli.build_parser().parse_args(argv)
    out = bench.main(bench.from_args(args), args.json)
    with open(root / "report.json") as f:
        assert json.load(f) == json.loads(json.dumps(out))
    return out


def _row(rep, prefix):
    rows = [r for r in rep["rows"] if r["name"].startswith(prefix)]
    assert rows, f"no row starting with {prefix!r} in {[r['name'] for r in rep['rows']]}"
    return rows[0]


def test_rows_have_flops_rates_and_mfu(rep):
    assert rep["device"]["peak_tflops"] > 0
    for prefix in ("unet fwd (", "unet fwd +capture", "sampler step", "generate b2", "generate b2 +capture",
                   "P-Decoder train step"):
        r = _row(rep, prefix)
        assert r["gflop"] > 0 and r["median_s"] > 0 and r["compile_s"] > 0
        assert math.isclose(r["tflops"], r["gflop"] / 1e3 / r["median_s"])
        assert r["mfu"] == pytest.approx(r["tflops"] / (rep["device"]["peak_tflops"] * r["devices"]))
    # Generation FLOPs include every loop iteration: more than one sampler step per denoising step.
    assert _row(rep, "generate b2")["gflop"] > 2 * _row(rep, "sampler step")["gflop"] * 0.99
    assert _row(rep, "generate b2")["images_per_s"] == pytest.approx(2 / _row(rep, "generate b2")["median_s"])


def test_diffusers_side_by_side_ratios(rep):
    (g,) = rep["generation"]
    assert g["batch"] == 2
    for dt in ("float32", "bfloat16"):
        assert g[f"speedup_vs_{dt}"] == pytest.approx(g[f"diffusers_{dt}_s"] / g["jax_s"])
        assert _row(rep, f"diffusers {dt} b2")["median_s"] == pytest.approx(g[f"diffusers_{dt}_s"])
    assert g["capture_overhead"] == pytest.approx(g["jax_capture_s"] / g["jax_s"] - 1)
    assert _row(rep, "generate.sample b2")["median_s"] == pytest.approx(g["python_api_s"])  # the Python API row
    assert rep["capture_overhead_unet"] > -1
    assert rep["torch"]["torch"] and rep["torch"]["diffusers"]


def test_compile_probe_and_memory(rep):
    c = rep["compile"]
    assert c["cold"]["compile_s"] > 0 and c["warm"]["compile_s"] > 0
    (m,) = rep["memory"]
    assert m["size"] == 16 and m["model"] == "tiny" and m["capture"] == "datasetdm"
    assert m["per_image_bytes"] > 0 and m["peak_b1_bytes"] > m["per_image_bytes"]
    assert m["max_batch"] >= 1 and m["peak_at_max_batch_bytes"] <= m["budget_bytes"]


def test_report_text_names_every_section(rep):
    text = report.format_report(rep)
    for needle in ("| generate b2 +capture |", "| generate.sample b2 |", "generate.sample s (Python API)",
                   "diffusers float32 s", "JAX speedup vs bfloat16", "cold",
                   "largest batch in budget", rep["device"]["peak_source"]):
        assert needle in text


def test_peak_table():
    assert peaks.table_peak_tflops("TPU v5 lite") == 197.0
    assert peaks.table_peak_tflops("TPU v5p") == 459.0
    assert peaks.table_peak_tflops("TPU v6 lite") == 918.0
    assert peaks.table_peak_tflops("TPU v4") == 275.0
    assert peaks.table_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peaks.table_peak_tflops("NVIDIA A100-SXM4-40GB") == 312.0
    assert peaks.table_peak_tflops("cpu") is None


def test_bad_model_is_a_one_line_error():
    with pytest.raises(ValueError, match="--model must be one of"):
        run_bench(bench.BenchConfig(model="sd3"))
