"""Loading/saving diffusers-format folders: parity with the PyTorch pipeline, round trip, errors."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from datasetdm_jax import pretrained
from datasetdm_jax.pretrained import PretrainedError, load_pipeline, save_pipeline
from datasetdm_jax.tokenizer import load_tokenizer, tokenize, write_clip_tokenizer

import tiny_sd
import torch
from tiny_sd import nchw, nhwc, rel_err

PROMPTS = ["a red circle", "a photo of a small blue star on a green background"]


@pytest.fixture
def broken(tiny_dir, tmp_path):
    """A fresh copy of the tiny folder to damage."""
    return shutil.copytree(tiny_dir, tmp_path / "sd")


# ---------------------------------------------------------------------------------------------
# Parity with the PyTorch modules
# ---------------------------------------------------------------------------------------------

def test_encode_prompt_matches_transformers(pipe, torch_pipe):
    ids = torch_pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids
    np.testing.assert_array_equal(pipe.tokenize(PROMPTS), ids.numpy())
    with torch.no_grad():
        ref = torch_pipe.text_encoder(ids)[0].numpy()
    emb = pipe.encode_prompt(PROMPTS)
    assert emb.shape == (2, 77, 32) and emb.dtype == jnp.float32
    assert rel_err(emb, ref) < 1e-4
    traces = pipe._jits["encode"]._cache_size()  # the session's pipe may hold other shapes' traces
    pipe.encode_prompt(PROMPTS[::-1])  # same shapes: no retrace
    assert pipe._jits["encode"]._cache_size() == traces

    skip1 = dataclasses.replace(pipe, clip_skip=1)
    te = torch_pipe.text_encoder
    final_norm = getattr(te, "text_model", te).final_layer_norm  # transformers 5 dropped text_model
    with torch.no_grad():  # diffusers' clip_skip rule: hidden_states[-(k + 1)] -> final LayerNorm
        ref1 = final_norm(te(ids, output_hidden_states=True).hidden_states[-2]).numpy()
    assert rel_err(skip1.encode_prompt(PROMPTS), ref1) < 1e-4


def test_vae_matches_diffusers(pipe, torch_pipe):
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, tiny_sd.IMAGE_SIZE, tiny_sd.IMAGE_SIZE, 3)).astype(np.float32)
    vae, sf = torch_pipe.vae, torch_pipe.vae.config.scaling_factor
    with torch.no_grad():
        ref_z = nhwc(vae.encode(nchw(images)).latent_dist.mean) * sf
    z = pipe.vae_encode(images)
    assert z.shape == (2, tiny_sd.LATENT_SIZE, tiny_sd.LATENT_SIZE, 4)
    assert rel_err(z, ref_z) < 1e-4
    z_sample = pipe.vae_encode(images, key=jax.random.key(0))
    assert z_sample.shape == z.shape and not np.allclose(z_sample, z)

    latents = rng.standard_normal((2, tiny_sd.LATENT_SIZE, tiny_sd.LATENT_SIZE, 4)).astype(np.float32)
    with torch.no_grad():
        ref_x = nhwc(vae.decode(nchw(latents) / sf).sample)
    x = pipe.vae_decode(latents)
    assert x.shape == images.shape
    assert rel_err(x, ref_x) < 1e-4


def test_unet_matches_diffusers(pipe, torch_pipe):
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((2, tiny_sd.LATENT_SIZE, tiny_sd.LATENT_SIZE, 4)).astype(np.float32)
    emb = rng.standard_normal((2, 77, 32)).astype(np.float32)
    traces = []  # the session's pipe may already hold traces of other shapes: count the growth
    for t in (500, np.array([10, 900])):
        with torch.no_grad():
            ref = nhwc(torch_pipe.unet(nchw(latents), torch.as_tensor(t), torch.from_numpy(emb)).sample)
        eps = pipe.unet_apply(latents, t, emb)
        assert rel_err(eps, ref) < 1e-4
        traces.append(pipe._jits["unet"]._cache_size())
    assert traces[1] == traces[0]  # scalar and (B,) t share one trace

    eps_c, feats = pipe.unet_apply(latents, 500, emb, capture="datasetdm")
    np.testing.assert_allclose(eps_c, pipe.unet_apply(latents, 500, emb), rtol=1e-5, atol=1e-6)
    assert sorted(feats.maps) == [2, 4, 8, 16]
    assert all(m.shape[0] == 1 for m in feats.maps.values())  # one CFG pair -> one image
    assert all(a.shape[0] == 1 and a.shape[-1] == 77 for a in feats.cross_attention.values())
    with pytest.raises(ValueError, match="CFG batch"):
        pipe.unet_apply(latents[:1], 500, emb[:1], capture="datasetdm")


# ---------------------------------------------------------------------------------------------
# Save round trip through diffusers
# ---------------------------------------------------------------------------------------------

def test_save_pipeline_loads_in_diffusers(pipe, torch_pipe, tmp_path):
    out = save_pipeline(pipe, tmp_path / "saved")
    with pytest.raises(PretrainedError, match="already exists"):
        save_pipeline(pipe, out)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    ours = tiny_sd.torch_pipeline(out)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(ours, name).state_dict(), getattr(torch_pipe, name).state_dict()
        b = {k: v for k, v in b.items() if k != "text_model.embeddings.position_ids"}
        a = {k: v for k, v in a.items() if k != "text_model.embeddings.position_ids"}
        assert a.keys() == b.keys(), name
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{name} {k}")

    rng = np.random.default_rng(2)
    latents = torch.from_numpy(rng.standard_normal((1, 4, tiny_sd.LATENT_SIZE, tiny_sd.LATENT_SIZE)).astype(np.float32))
    kw = dict(num_inference_steps=2, guidance_scale=7.5, height=tiny_sd.IMAGE_SIZE, width=tiny_sd.IMAGE_SIZE,
              output_type="np")
    with torch.no_grad():
        ref = torch_pipe(PROMPTS[0], latents=latents.clone(), **kw).images
        got = ours(PROMPTS[0], latents=latents.clone(), **kw).images
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)

    again = load_pipeline(out)
    np.testing.assert_array_equal(again.encode_prompt(PROMPTS[:1]), pipe.encode_prompt(PROMPTS[:1]))


SHIPPED = os.path.join(os.path.dirname(__file__), "..", "datasetdm_jax", "assets", "shapes_sd")


def _diffusers_samples(folder, size, **load_kw):
    """Loads `folder` in diffusers (no dtype argument unless given) and samples one tiny image."""
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(str(folder), **load_kw)
    p.set_progress_bar_config(disable=True)
    dtypes = {name: getattr(p, name).dtype for name in ("unet", "vae", "text_encoder")}
    with torch.no_grad():
        images = p(["a red circle"], num_inference_steps=2, height=size, width=size, output_type="np").images
    assert images.shape == (1, size, size, 3) and np.isfinite(images).all()
    return dtypes, images


def test_shipped_model_samples_in_diffusers_with_the_plain_call():
    """`StableDiffusionPipeline.from_pretrained(<shipped folder>)`, no dtype: its fp16 weights load as
    float32 in every component (transformers would otherwise keep the text encoder in fp16)."""
    size = json.load(open(os.path.join(SHIPPED, "unet", "config.json")))["sample_size"] * 4
    dtypes, images = _diffusers_samples(SHIPPED, size)
    assert set(dtypes.values()) == {torch.float32}, dtypes
    assert images.std() > 0.02  # a picture, not a flat field
    dtypes, _ = _diffusers_samples(SHIPPED, size, dtype=torch.bfloat16)
    assert set(dtypes.values()) == {torch.bfloat16}, dtypes


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_saved_half_precision_folder_samples_in_diffusers(tiny_dir, tmp_path, dtype):
    """save_pipeline writes fp16/bf16 weights that load and sample with the plain call (all float32)
    and with an explicit dtype (all in that dtype)."""
    out = save_pipeline(load_pipeline(tiny_dir, dtype=jnp.dtype(dtype)), tmp_path / "saved")
    from safetensors import safe_open

    with safe_open(str(out / "text_encoder" / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {getattr(torch, dtype)}  # stored as asked
    text_cfg = json.loads((out / "text_encoder" / "config.json").read_text())
    assert text_cfg["dtype"] == "float32"
    dtypes, _ = _diffusers_samples(out, tiny_sd.IMAGE_SIZE)
    assert set(dtypes.values()) == {torch.float32}, dtypes
    dtypes, _ = _diffusers_samples(out, tiny_sd.IMAGE_SIZE, dtype=getattr(torch, dtype))
    assert set(dtypes.values()) == {getattr(torch, dtype)}, dtypes
    from transformers import CLIPTextModel

    assert CLIPTextModel.from_pretrained(str(out / "text_encoder")).dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Errors: one line, naming the file/key; nothing half-loads
# ---------------------------------------------------------------------------------------------

def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_pickle_only_is_refused(broken):
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (broken / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(PretrainedError) as e:
        load_pipeline(broken)
    msg = _one_line(e)
    assert "safetensors" in msg and "execute code" in msg and "diffusion_pytorch_model.bin" in msg
    assert "safe_serialization=True" in msg


def test_missing_unet_folder(broken):
    shutil.rmtree(broken / "unet")
    with pytest.raises(PretrainedError, match="unet") as e:
        load_pipeline(broken)
    _one_line(e)


def test_missing_folder_and_bad_json(broken, tmp_path):
    with pytest.raises(PretrainedError, match="no such folder"):
        load_pipeline(tmp_path / "nope")
    (broken / "vae" / "config.json").write_text("{not json")
    with pytest.raises(PretrainedError, match=r"vae/config.json: invalid JSON") as e:
        load_pipeline(broken)
    _one_line(e)


def test_truncated_safetensors(broken):
    path = broken / "vae" / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PretrainedError, match="vae/diffusion_pytorch_model.safetensors") as e:
        load_pipeline(broken)
    assert "safetensors" in _one_line(e)


def test_misshaped_and_missing_tensors(broken):
    from safetensors.numpy import load_file, save_file

    path = broken / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    tensors["conv_in.bias"] = np.zeros((3,), np.float32)
    del tensors["conv_out.weight"]
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(PretrainedError) as e:
        load_pipeline(broken)
    msg = _one_line(e)
    assert "conv_in.bias" in msg and "(16,)" in msg and "(3,)" in msg
    assert "missing conv_out.weight" in msg


def test_sharded_and_fp16_variant(broken):
    from safetensors.numpy import load_file, save_file

    unet = broken / "unet"
    tensors = load_file(str(unet / "diffusion_pytorch_model.safetensors"))
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(tensors)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, str(unet / name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    vae = broken / "vae"
    vt = load_file(str(vae / "diffusion_pytorch_model.safetensors"))
    (vae / "diffusion_pytorch_model.safetensors").unlink()
    save_file({k: v.astype(np.float16) for k, v in vt.items()}, str(vae / "diffusion_pytorch_model.fp16.safetensors"))

    assert pretrained.read_weights(unet).keys() == tensors.keys()
    p = load_pipeline(broken, dtype=jnp.bfloat16)
    leaves = jax.tree.leaves(p.params["unet"]) + jax.tree.leaves(p.params["vae"])
    assert {x.dtype for x in leaves} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(np.asarray(p.params["vae"]["decoder"]["conv_out"]["bias"][...], np.float32),
                                  vt["decoder.conv_out.bias"].astype(np.float16).astype(jnp.bfloat16).astype(np.float32))


def test_bad_dtype(tiny_dir):
    for bad in (jnp.int8, "float64", "nope"):
        with pytest.raises(ValueError, match="dtype"):
            load_pipeline(tiny_dir, dtype=bad)


def test_long_prompt_truncated_with_warning(pipe, torch_pipe):
    prompts = ["red circle " * 60, "a star"]
    with pytest.warns(UserWarning, match="1 of 2 prompt"):
        emb = pipe.encode_prompt(prompts)
    assert emb.shape == (2, 77, 32)
    with pytest.warns(UserWarning, match="1 of 1 prompt"):
        ids = pipe.tokenize(prompts[:1])
    ref = torch_pipe.tokenizer(prompts[:1], padding="max_length", max_length=77, truncation=True).input_ids
    np.testing.assert_array_equal(ids, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.tokenize(["a star"])  # short prompts: no warning


# ---------------------------------------------------------------------------------------------
# Tokenizer writer
# ---------------------------------------------------------------------------------------------

def test_write_clip_tokenizer(tmp_path):
    from transformers import CLIPTokenizer

    words = ["a", "red", "circle", "circles", "re", "cat", "at", "ca", "rectangle", "café"]
    vocab = write_clip_tokenizer(tmp_path, words)
    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (bos, eos, eos)
    assert tok("a red circle").input_ids == [bos, vocab["a</w>"], vocab["red</w>"], vocab["circle</w>"], eos]
    for w in words:  # every listed word is one token, whatever the overlaps between words
        ids = tok(w).input_ids
        assert len(ids) == 3 and ids[0] == bos and ids[2] == eos
        if w.isascii():
            assert ids[1] == vocab[w + "</w>"]
    assert len(tok("Dog!").input_ids) == 2 + 4  # unknown text falls back to characters
    ids = tokenize(load_tokenizer(tmp_path), ["A  RED circle"])
    assert ids.dtype == np.int32 and ids.shape == (1, 77)
    assert ids[0, :5].tolist() == [bos, vocab["a</w>"], vocab["red</w>"], vocab["circle</w>"], eos]
    assert (ids[0, 5:] == eos).all()
    with pytest.raises(ValueError, match="single word"):
        write_clip_tokenizer(tmp_path / "bad", ["two words"])
    with pytest.raises(ValueError, match="tokenizer"):
        load_tokenizer(tmp_path / "missing")


def test_loading_does_not_import_torch(tiny_dir):
    code = ("import sys; from datasetdm_jax.pretrained import load_pipeline; "
            f"load_pipeline({str(tiny_dir)!r}); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
