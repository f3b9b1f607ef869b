"""A damaged or hostile model folder fails at load with one ModelFormatError naming the field, the limit and the fix."""

from __future__ import annotations

import os

import pytest

import edgellm
from edgellm.contract import GraphOptions, IONames, ModelDims
from edgellm.errors import EdgeLLMError, InvalidParameterError, ModelFormatError
from edgellm.manifest import MANIFEST_NAME, fingerprint


def _delete(section: str, key: str):
    return lambda d: d[section].pop(key)


def _set(section: str | None, key: str, value):
    def change(d):
        (d if section is None else d[section])[key] = value
    return change


def _rename_kv(d):
    d["io"]["past_key"] = [f"kv.{i}.k" for i in range(len(d["io"]["past_key"]))]


# (case, edit of edgellm.json, verify, fragments the one-line message must contain)
MANIFEST_CASES = [
    ("format_version as a string", _set(None, "format_version", "1"), True, ["format_version='1'", "integer"]),
    ("format_version from the future", _set(None, "format_version", 99), True, ["format_version 99", "pip install -U"]),
    ("dims.vocab_size missing", _delete("dims", "vocab_size"), True, ["dims.vocab_size is missing"]),
    ("dims.rms_norm_eps a string", _set("dims", "rms_norm_eps", "1e-5"), True, ["dims.rms_norm_eps='1e-5'"]),
    ("dims.num_layers zero", _set("dims", "num_layers", 0), True, ["dims.num_layers=0", ">= 1"]),
    ("io.past_key missing", _delete("io", "past_key"), True, ["io.past_key is missing"]),
    ("io lists for the wrong layer count", lambda d: d["io"]["past_value"].pop(), True,
     ["io.past_value", "list of 2 names"]),
    ("files.model missing", _delete("files", "model"), True, ["files.model is missing"]),
    ("files.model outside the folder", _set("files", "model", "../model.onnx"), False, ["files.model", "'..'"]),
    ("context_length negative", _set("generation", "context_length", -5), True,
     ["generation.context_length=-5", ">= 2"]),
    ("eos_token_ids as strings", _set("generation", "eos_token_ids", ["2"]), True, ["generation.eos_token_ids"]),
    ("eos_token_ids out of vocabulary", _set("generation", "eos_token_ids", [10**6]), True,
     ["generation.eos_token_ids", "0..383"]),
    ("temperature default a string", _set("generation", "temperature", "0.7"), True, ["generation.temperature"]),
    ("attention_pad_rows a string", _set("graph", "attention_pad_rows", "1"), True, ["graph.attention_pad_rows"]),
    ("checksums empty", _set(None, "checksums", {}), True, ["model.onnx (model)", "have no sha256"]),
    ("add_bos_token a string", _set("special_tokens", "add_bos_token", "yes"), True,
     ["special_tokens.add_bos_token='yes'"]),
    ("checksums leave out the template", lambda d: d["checksums"].pop("chat_template.jinja"), True,
     ["chat_template.jinja (chat_template) have no sha256"]),
    ("checksum not a digest", _set("checksums", "model.onnx", "abc"), True, ["checksums", "sha256"]),
    ("top level not an object", lambda d: d.clear() or d.update({"x": 1}), True, ["name", "non-empty string"]),
    # the graph disagrees with the manifest: found at load, not at the first generate
    ("num_kv_heads disagrees with the graph", _set("dims", "num_kv_heads", 4), False,
     ["dims.num_kv_heads=4", "has 2"]),
    ("head_dim disagrees with the graph", _set("dims", "head_dim", 32), False, ["dims.head_dim=32", "has 16"]),
    ("vocab_size disagrees with the graph", _set("dims", "vocab_size", 1000), False,
     ["dims.vocab_size=1000", "has 384"]),
    ("KV names not in the graph", _rename_kv, False, ["kv.0.k", "not inputs of the graph"]),
]


@pytest.mark.parametrize("case,change,verify,fragments", MANIFEST_CASES, ids=[c[0] for c in MANIFEST_CASES])
def test_bad_manifest_fails_at_load_naming_the_field(model_copy, case, change, verify, fragments):
    edgellm.load(model_copy.path, verify=verify)  # the intact copy loads: the edit is what fails
    model_copy.edit(change)
    with pytest.raises(ModelFormatError) as info:
        edgellm.load(model_copy.path, verify=verify)
    message = str(info.value)
    assert "\n" not in message and "Fix:" in message
    for fragment in fragments:
        assert fragment in message


def test_manifest_that_is_not_json(model_copy):
    (model_copy.path / MANIFEST_NAME).write_bytes(b"\xff{not json")
    with pytest.raises(ModelFormatError, match="cannot be read as JSON"):
        edgellm.load(model_copy.path)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# (case, damage done to the folder, recompute checksums afterwards, verify, fragments)
FOLDER_CASES = [
    ("truncated weights, verified", lambda p: _truncate(p / "model.onnx.data"), False, True,
     ["model.onnx.data does not match its sha256"]),
    ("truncated weights, verify=False", lambda p: _truncate(p / "model.onnx.data"), False, False,
     ["onnxruntime cannot load", "re-run `edgellm convert`"]),
    ("truncated graph, verify=False", lambda p: [_truncate(g) for g in p.glob("model*.onnx")], False, False,
     ["onnxruntime cannot load"]),  # model.onnx and its kernel twin (load runs the twin where it can)
    ("corrupt tokenizer with matching checksums", lambda p: (p / "tokenizer.json").write_text('{"model": 5}'), True,
     True, ["tokenizer.json is not a valid tokenizer"]),
    ("tokenizer not UTF-8", lambda p: (p / "tokenizer.json").write_bytes(b"\xff\xfe"), True, True,
     ["tokenizer.json cannot be read as UTF-8"]),
    ("tokenizer unreadable (a folder)", lambda p: ((p / "tokenizer.json").unlink(), (p / "tokenizer.json").mkdir()),
     False, False, ["tokenizer.json (tokenizer file named in edgellm.json) is not a regular file"]),
    ("weights missing", lambda p: (p / "model.onnx.data").unlink(), False, True, ["model.onnx.data is missing"]),
]


@pytest.mark.parametrize("case,damage,recompute,verify,fragments", FOLDER_CASES, ids=[c[0] for c in FOLDER_CASES])
def test_damaged_folder_fails_at_load(model_copy, case, damage, recompute, verify, fragments):
    damage(model_copy.path)
    if recompute:
        model_copy.recompute_checksums()
    with pytest.raises(ModelFormatError) as info:
        edgellm.load(model_copy.path, verify=verify)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_symlinked_weights_leaving_the_folder_are_refused(model_copy, tmp_path):
    outside = tmp_path / "elsewhere.data"
    (model_copy.path / "model.onnx.data").rename(outside)
    (model_copy.path / "model.onnx.data").symlink_to(outside)
    with pytest.raises(ModelFormatError, match="outside the model folder"):
        edgellm.load(model_copy.path, verify=False)


def test_symlink_inside_the_folder_is_fine(model_copy):
    (model_copy.path / "tokenizer.json").rename(model_copy.path / "tok.json")
    (model_copy.path / "tokenizer.json").symlink_to("tok.json")
    edgellm.load(model_copy.path, verify=False)


def test_external_data_pointing_outside_the_folder(model_copy, tmp_path):
    import onnx

    path = model_copy.path / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    (model_copy.path / "model.onnx.data").rename(tmp_path / "stolen.data")
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../stolen.data"
    onnx.save(model, str(path))
    model_copy.edit(lambda d: d["checksums"].pop("model.onnx.data"))
    model_copy.edit(lambda d: d["files"].pop("weights"))
    model_copy.recompute_checksums()
    with pytest.raises(ModelFormatError, match="onnxruntime cannot load"):
        edgellm.load(model_copy.path)


def test_tampered_folder_with_recomputed_checksums_fails_its_fingerprint(model_copy):
    pinned = fingerprint(model_copy.path)
    edgellm.load(model_copy.path, fingerprint=pinned)
    template = model_copy.path / "chat_template.jinja"
    template.write_text(template.read_text().replace("assistant", "assistant (pwned)"))
    model_copy.recompute_checksums()
    edgellm.load(model_copy.path)  # checksums alone cannot tell: they were recomputed
    with pytest.raises(ModelFormatError, match="not the one you pinned"):
        edgellm.load(model_copy.path, fingerprint=pinned)
    with pytest.raises(InvalidParameterError, match="fingerprint needs verify=True"):
        edgellm.load(model_copy.path, verify=False, fingerprint=fingerprint(model_copy.path))


@pytest.mark.parametrize("value", [-5, 0, 1, "512", 1.5, True, 10**9])
def test_context_length_argument_out_of_range(tiny_int8_dir, value):
    with pytest.raises(InvalidParameterError) as info:
        edgellm.load(tiny_int8_dir, context_length=value)
    assert f"context_length={value!r}" in str(info.value) and "2..2048" in str(info.value)


def test_pad_rows_come_from_the_manifest(tiny_int8_dir, tiny_int8_invariant_dir):
    plain, invariant = edgellm.load(tiny_int8_dir, context_length=64), edgellm.load(tiny_int8_invariant_dir,
                                                                                     context_length=64)
    assert invariant.manifest.graph.attention_pad_rows == 1 and plain.manifest.graph.attention_pad_rows == 0
    assert invariant.session._kv[0].shape()[2] == 65 and plain.session._kv[0].shape()[2] == 64
    # both fill their whole context
    for llm in (plain, invariant):
        result = llm.generate(list(range(10, 20)), edgellm.SamplingParams(max_new_tokens=500, ignore_eos=True))
        assert result.finish_reason == "length" and len(result.token_ids) == 64 - 10 + 1


def test_contract_round_trips_and_names_bad_fields():
    dims = ModelDims(vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=2, rms_norm_eps=1e-5, max_positions=64)
    assert ModelDims.from_dict(dims.to_dict()) == dims
    io = IONames.for_layers(2)
    assert IONames.from_dict(io.to_dict(), 2) == io and io.kv_pairs[0] == ("past_key_values.0.key", "present.0.key")
    graph = GraphOptions.for_build(True, "head.npy")
    assert GraphOptions.from_dict(graph.to_dict()) == graph and graph.attention_pad_rows == 1
    assert GraphOptions.from_dict({"batch_invariant": True}).attention_pad_rows == 1  # folders from before the field
    with pytest.raises(ModelFormatError, match="dims.num_kv_heads=3 is invalid: it must be a divisor of num_heads=4"):
        ModelDims(**{**dims.to_dict(), "num_kv_heads": 3})
    with pytest.raises(ModelFormatError, match="dims.head_dim=True"):
        ModelDims.from_dict({**dims.to_dict(), "head_dim": True})
    assert issubclass(ModelFormatError, EdgeLLMError)


def test_manifest_write_is_atomic(model_copy):
    from edgellm.manifest import read_manifest

    manifest = read_manifest(model_copy.path)
    manifest.write(model_copy.path)
    assert read_manifest(model_copy.path) == manifest
    assert [p.name for p in model_copy.path.iterdir() if p.name.startswith(".")] == []
    assert os.path.getsize(model_copy.path / MANIFEST_NAME) > 100


@pytest.mark.parametrize("kwargs,error,fragment", [
    ({"threads": "2"}, InvalidParameterError, "threads='2'"),
    ({"threads": 0}, InvalidParameterError, "threads=0"),
    ({"providers": 5}, edgellm.errors.ProviderError, "providers=5"),
    ({"providers": []}, edgellm.errors.ProviderError, "providers=[]"),
    ({"providers": ["nosuch"]}, edgellm.errors.ProviderError, "'nosuch' is not available"),
    ({"draft": 5}, InvalidParameterError, "draft=5 must be a model folder"),
])
def test_bad_load_arguments(tiny_int8_dir, kwargs, error, fragment):
    with pytest.raises(error) as info:
        edgellm.load(tiny_int8_dir, **kwargs)
    assert fragment in str(info.value) and "Fix:" in str(info.value)


def test_load_path_of_the_wrong_type():
    with pytest.raises(InvalidParameterError, match="path=None must be a model folder path"):
        edgellm.load(None)
