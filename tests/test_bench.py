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


# --- --model sdxl: timings on the tiny random SDXL beside diffusers' StableDiffusionXLPipeline ----

@pytest.fixture(scope="module")
def sdxl_rep(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_sdxl")
    argv = ["bench", "--model", "sdxl", "--batch", "1", "--steps", "2", "--repeats", "1", "--scheduler", "euler",
            "--no-compile-probe", "--no-train-step", "--memory-model", "tiny_sdxl", "--memory-sizes", "32",
            "--workdir", str(root / "work")]
    return bench.main(bench.from_args(cli.build_parser().parse_args(argv)))


def test_sdxl_rows_and_diffusers_images(sdxl_rep):
    m = sdxl_rep["model"]
    assert m["name"] == "sdxl" and "TINY_SDXL" in m["source"] and m["params"]["text_encoder_2"] > 0
    for prefix in ("unet fwd (", "unet fwd +capture", "sampler step (euler", "generate b1", "generate b1 +capture",
                   "generate.sample b1", "diffusers float32 b1", "diffusers bfloat16 b1"):
        assert _row(sdxl_rep, prefix)["median_s"] > 0
    assert _row(sdxl_rep, "generate b1 +capture")["gflop"] > 0
    (g,) = sdxl_rep["generation"]
    # diffusers' SDXL pipeline from the same folder, x_T, prompt and Euler steps draws the same image
    assert g["max_abs_diff_vs_float32"] < 2e-3, g
    assert g["max_abs_diff_vs_bfloat16"] < 0.1, g
    text = report.format_report(sdxl_rep)
    assert "max abs image diff vs float32" in text and "text 4" in text  # both towers' parameter counts


def test_sdxl_memory_rows(sdxl_rep):
    rows = sdxl_rep["memory"]
    assert [r["program"] for r in rows] == ["unet_cfg", "unet_cfg_capture", "text", "vae_decode"]
    for r in rows:
        assert r["model"] == "tiny_sdxl" and r["size"] == 32 and r["batch"] == 1
        assert r["peak_gib"] >= r["argument_gib"] > 0 and r["gflop"] > 0
    assert "| tiny_sdxl | unet_cfg_capture | 32 | 1 |" in report.format_report(sdxl_rep)


def test_sdxl_memory_defaults_to_sdxl_base():
    from datasetdm_jax.bench.config import memory_settings

    assert memory_settings(bench.BenchConfig(model="sdxl")) == ("sdxl", (1024,))
    assert memory_settings(bench.BenchConfig(model="tiny")) == ("sd15", (512, 768))
    assert memory_settings(bench.BenchConfig(model="sdxl", memory_model="sd21")) == ("sd21", (512, 768))
