"""SmoothQuant scaling changes the weights but not the function the fp32 model computes."""

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from edgellm.convert.graph import build_decoder
from edgellm.convert.pipeline import decoder_dims
from edgellm.convert.smooth import activation_maxima, smooth_state_dict
from edgellm.convert.sources import LoadedModel
from edgellm.runtime.session import DecoderSession
from edgellm.convert.graph import io_names, save_model

TOKENS = [5, 17, 99, 3, 250, 42, 7, 300, 12, 64]


def test_smoothing_preserves_fp32_logits(tiny_hf_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_hf_dir)
    loaded = LoadedModel(model, tokenizer, "", None, {}, (2,), 1, False)
    dims, inv_freq, scaling = decoder_dims(loaded)
    state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    maxima = activation_maxima(model, tokenizer)
    assert set(maxima) == {f"{i}.{n}" for i in range(dims.num_layers) for n in ("qkv", "o", "gate_up", "down")}
    smoothed = dict(state)
    smooth_state_dict(smoothed, maxima, dims, alpha=0.5)
    moved = np.abs(smoothed["model.layers.0.input_layernorm.weight"] - state["model.layers.0.input_layernorm.weight"])
    assert moved.max() > 1e-3  # the scales really did something
    save_model(build_decoder(dims, smoothed, inv_freq, scaling), str(tmp_path / "model.onnx"))
    session = DecoderSession(tmp_path / "model.onnx", io_names(dims.num_layers), dims.to_dict(), 64, threads=1)
    with torch.no_grad():
        expected = model(torch.tensor([TOKENS])).logits[0].numpy()
    got = session.forward(TOKENS, keep=len(TOKENS))
    assert np.abs(got - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())
