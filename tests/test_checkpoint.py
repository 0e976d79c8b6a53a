"""Model folders: round trips in our format and diffusers', the null class and the latent shift through
diffusers' config, dtype on load, and safe loading (every broken folder raises EncdiffError naming the
file and the key or field at fault). None of this needs diffusers installed."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_AE, TINY_UNET, TINY_UNET_CLASSES, assert_state_dicts_equal, randomize_
from encdiff import Autoencoder, EncdiffError, UNet

SRC = Path(__file__).resolve().parents[1] / "src"
OUR_WEIGHTS = "model.safetensors"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def edit_config(folder: Path, edit) -> None:
    config = read_json(folder / "config.json")
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def weights_file(folder: Path) -> Path:
    return folder / (OUR_WEIGHTS if (folder / OUR_WEIGHTS).exists() else DIFFUSERS_WEIGHTS)


def rewrite_weights(folder: Path, edit) -> None:
    """Change the tensors of a folder's weights file; in our format also re-record the sha256, so that only
    the change itself (not the checksum) can be what the loader objects to."""
    path = weights_file(folder)
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))
    if path.name == OUR_WEIGHTS:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        edit_config(folder, lambda c: c.update(weights_sha256=digest))


def unet_outputs(unet: UNet, classes: torch.Tensor | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, 16, 16, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([3.0, 700.0]), classes)


def ae_outputs(ae: Autoencoder) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = ae.encode(x)
        return latents, ae.decode(latents)


MODELS = {
    "unet": lambda: randomize_(UNet(TINY_UNET_CLASSES).eval(), 1),
    "unet-uncond": lambda: randomize_(UNet(TINY_UNET).eval(), 2),
    "autoencoder": lambda: randomize_(Autoencoder(TINY_AE).eval(), 3),
}


def outputs(model):
    return ae_outputs(model) if isinstance(model, Autoencoder) else (unet_outputs(model),)


# ---------------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("diffusers", [False, True], ids=["ours", "diffusers"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_save_load_round_trip_preserves_config_weights_and_outputs(tmp_path, name, diffusers):
    model = MODELS[name]()
    folder = model.save_pretrained(tmp_path / "model", diffusers=diffusers)
    loaded = type(model).from_pretrained(folder)
    assert loaded.config == model.config
    assert_state_dicts_equal(loaded.state_dict(), model.state_dict())
    for a, b in zip(outputs(loaded), outputs(model)):
        assert torch.equal(a, b)
    assert not loaded.training
    assert all(p.requires_grad for p in loaded.parameters())  # ready for fine-tuning
    # Exactly the two files, no temporary leftovers.
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["config.json", DIFFUSERS_WEIGHTS if diffusers else OUR_WEIGHTS])


def test_our_config_records_class_version_config_and_weights_sha256(tmp_path):
    model = MODELS["unet"]()
    folder = model.save_pretrained(tmp_path)
    config = read_json(folder / "config.json")
    assert config["encdiff_class"] == "UNet"
    assert config["format_version"] == 1
    assert config["config"] == json.loads(json.dumps(dataclasses.asdict(model.config)))
    assert config["weights_sha256"] == hashlib.sha256((folder / OUR_WEIGHTS).read_bytes()).hexdigest()


def test_saving_again_overwrites_the_folder(tmp_path):
    first, second = MODELS["unet"](), randomize_(UNet(TINY_UNET_CLASSES), 9)
    first.save_pretrained(tmp_path)
    second.save_pretrained(tmp_path)
    assert_state_dicts_equal(UNet.from_pretrained(tmp_path).state_dict(), second.state_dict())
    assert len(list(tmp_path.iterdir())) == 2


def test_null_class_survives_diffusers_config(tmp_path):
    model = MODELS["unet"]()
    model.save_pretrained(tmp_path, diffusers=True)
    config = read_json(tmp_path / "config.json")
    assert config["_class_name"] == "UNet2DModel"
    assert config["_encdiff_null_class"] is True
    assert config["num_class_embeds"] == TINY_UNET_CLASSES.num_classes + 1  # the table includes the null row
    loaded = UNet.from_pretrained(tmp_path)
    assert loaded.config.num_classes == TINY_UNET_CLASSES.num_classes and loaded.config.null_class
    null = torch.full((2,), TINY_UNET_CLASSES.num_classes)
    assert torch.equal(unet_outputs(loaded), unet_outputs(model, null))


def test_diffusers_class_table_without_our_marker_has_no_null_class(tmp_path):
    """A class-conditional diffusers model (no `_encdiff_null_class`) uses every row as a real class."""
    MODELS["unet"]().save_pretrained(tmp_path, diffusers=True)
    edit_config(tmp_path, lambda c: c.pop("_encdiff_null_class"))
    loaded = UNet.from_pretrained(tmp_path)
    assert loaded.config.num_classes == TINY_UNET_CLASSES.num_classes + 1
    assert not loaded.config.null_class
    unet_outputs(loaded, torch.tensor([0, TINY_UNET_CLASSES.num_classes]))  # every row is a valid label
    with pytest.raises(EncdiffError, match="null class"):
        unet_outputs(loaded)


def test_unconditional_unet_exports_no_class_table(tmp_path):
    MODELS["unet-uncond"]().save_pretrained(tmp_path, diffusers=True)
    config = read_json(tmp_path / "config.json")
    assert config["num_class_embeds"] is None and config["_encdiff_null_class"] is False


def test_per_channel_shift_factor_is_exported_as_latents_mean(tmp_path):
    model = MODELS["autoencoder"]()
    model.save_pretrained(tmp_path, diffusers=True)
    config = read_json(tmp_path / "config.json")
    assert config["_class_name"] == "AutoencoderKL"
    assert config["latents_mean"] == list(TINY_AE.shift_factor)
    assert config["latents_std"] == [1.0] * TINY_AE.latent_channels
    assert config["shift_factor"] is None
    assert config["scaling_factor"] == TINY_AE.scaling_factor
    loaded = Autoencoder.from_pretrained(tmp_path)
    assert loaded.config.shift_factor == TINY_AE.shift_factor
    for a, b in zip(ae_outputs(loaded), ae_outputs(model)):
        assert torch.equal(a, b)


def test_uniform_shift_factor_is_exported_as_scalar_shift_factor(tmp_path):
    config = dataclasses.replace(TINY_AE, shift_factor=(0.25,) * 4)
    Autoencoder(config).save_pretrained(tmp_path, diffusers=True)
    exported = read_json(tmp_path / "config.json")
    assert exported["shift_factor"] == 0.25 and exported["latents_mean"] is None
    assert Autoencoder.from_pretrained(tmp_path).config.shift_factor == (0.25,) * 4


def test_diffusers_latents_mean_and_std_give_the_sdxl_normalisation(tmp_path):
    """latents = (z - latents_mean) * scaling_factor / latents_std, as diffusers' pipelines compute it."""
    model = MODELS["autoencoder"]()
    model.save_pretrained(tmp_path, diffusers=True)
    mean, std = [0.5, -0.5, 0.25, 0.0], 2.0
    edit_config(tmp_path, lambda c: c.update(latents_mean=mean, latents_std=[std] * 4, scaling_factor=0.6))
    loaded = Autoencoder.from_pretrained(tmp_path)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = loaded.posterior(x).mean
        expected = (z - torch.tensor(mean).view(1, 4, 1, 1)) * 0.6 / std
        assert torch.allclose(loaded.encode(x), expected, atol=1e-6)


def test_diffusers_scalar_shift_factor_applies_to_every_channel(tmp_path):
    MODELS["autoencoder"]().save_pretrained(tmp_path, diffusers=True)
    edit_config(tmp_path, lambda c: c.update(latents_mean=None, latents_std=None, shift_factor=0.1159,
                                             scaling_factor=0.3611))
    config = Autoencoder.from_pretrained(tmp_path).config
    assert config.shift_factor == (0.1159,) * 4 and config.scaling_factor == 0.3611


def test_diffusers_config_defaults_fill_missing_fields(tmp_path):
    """diffusers omits nothing when it saves, but hand-written configs may: missing fields take
    diffusers' defaults (e.g. norm_eps 1e-5, attention_head_dim 8, flip_sin_to_cos True)."""
    config = dataclasses.replace(TINY_UNET, block_out_channels=(16, 16), norm_eps=1e-5, attention_head_dim=8,
                                 flip_sin_to_cos=True, freq_shift=0)
    UNet(config).save_pretrained(tmp_path, diffusers=True)
    edit_config(tmp_path, lambda c: [c.pop(k) for k in ("norm_eps", "attention_head_dim", "flip_sin_to_cos",
                                                          "freq_shift", "dropout", "num_train_timesteps")])
    loaded = UNet.from_pretrained(tmp_path).config
    assert (loaded.norm_eps, loaded.attention_head_dim, loaded.flip_sin_to_cos, loaded.freq_shift, loaded.dropout) \
        == (1e-5, 8, True, 0, 0.0)
    assert loaded.block_out_channels == config.block_out_channels


@pytest.mark.parametrize("diffusers", [False, True], ids=["ours", "diffusers"])
def test_fp16_folder_loads_as_float32_by_default(tmp_path, diffusers):
    model = MODELS["unet"]()
    model.half().save_pretrained(tmp_path, diffusers=diffusers)
    assert all(t.dtype == torch.float16 for t in load_file(str(weights_file(tmp_path))).values())
    loaded = UNet.from_pretrained(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert_state_dicts_equal(loaded.state_dict(), model.float().state_dict())
    assert {p.dtype for p in UNet.from_pretrained(tmp_path, dtype=torch.float64).parameters()} == {torch.float64}


# ---------------------------------------------------------------------------------------------------------
# Safe loading: every broken folder is refused with a message naming the file and the key / field.


def _set(**changes):
    return lambda folder: edit_config(folder, lambda c: c.update(changes))


def _set_field(**changes):
    return lambda folder: edit_config(folder, lambda c: c["config"].update(changes))


def _write(name: str, data: bytes):
    return lambda folder: (folder / name).write_bytes(data)


def _unlink(name: str):
    return lambda folder: (folder / name).unlink()


def _truncate(folder: Path) -> None:
    path = weights_file(folder)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _zero_bytes(folder: Path) -> None:
    weights_file(folder).write_bytes(b"")


def _tamper(folder: Path) -> None:
    """Change one byte of tensor data: the file stays a valid safetensors file."""
    path = weights_file(folder)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x55
    path.write_bytes(bytes(data))


def _garbage_header(folder: Path) -> None:
    path = weights_file(folder)
    data = path.read_bytes()
    path.write_bytes((10**12).to_bytes(8, "little") + data[8:])


def _drop_key(key: str):
    return lambda folder: rewrite_weights(folder, lambda s: s.pop(key))


def _add_key(key: str):
    return lambda folder: rewrite_weights(folder, lambda s: s.update({key: torch.zeros(3)}))


def _reshape_key(key: str):
    return lambda folder: rewrite_weights(folder, lambda s: s.update({key: torch.zeros(s[key].numel() + 1)}))


def _int_key(key: str):
    return lambda folder: rewrite_weights(folder, lambda s: s.update({key: s[key].to(torch.int32)}))


# (id, corruption of a saved UNet folder, regexes the message must contain). {W}: the weights file name.
BROKEN_OURS = [
    ("missing-config", _unlink("config.json"), ["config.json"]),
    ("invalid-json", _write("config.json", b'{"encdiff_class": "UNet",'), ["config.json", "JSON"]),
    ("json-not-an-object", _write("config.json", b"[1, 2]"), ["config.json", "object"]),
    ("binary-config", _write("config.json", b"\xff\xfe\x00garbage"), ["config.json"]),
    ("wrong-encdiff-class", _set(encdiff_class="Autoencoder"), ["config.json", "encdiff_class", "Autoencoder"]),
    ("no-encdiff-class", lambda f: edit_config(f, lambda c: c.pop("encdiff_class")), ["config.json", "encdiff_class"]),
    ("wrong-format-version", _set(format_version=99), ["config.json", "format_version", "99"]),
    ("missing-config-object", lambda f: edit_config(f, lambda c: c.pop("config")), ["config.json", "config"]),
    ("unknown-field", _set_field(cross_attention_dim=768), ["config.json", "cross_attention_dim"]),
    ("bad-field-value", _set_field(norm_num_groups=5), ["config.json", "norm_num_groups", "5"]),
    ("bad-field-type", _set_field(layers_per_block="two"), ["config.json", "layers_per_block", "two"]),
    ("field-not-a-list", _set_field(block_out_channels=8), ["config.json", "block_out_channels"]),
    ("zero-groups", _set_field(norm_num_groups=0), ["config.json", "'norm_num_groups'"]),
    ("missing-weights", _unlink(OUR_WEIGHTS), [OUR_WEIGHTS]),
    ("truncated-weights", _truncate, [OUR_WEIGHTS]),
    ("zero-byte-weights", _zero_bytes, [OUR_WEIGHTS]),
    ("tampered-weights", _tamper, [OUR_WEIGHTS, "sha256"]),
    ("missing-key", _drop_key("conv_in.weight"), [OUR_WEIGHTS, "missing", "conv_in.weight"]),
    ("unexpected-key", _add_key("extra.weight"), [OUR_WEIGHTS, "unexpected", "extra.weight"]),
    ("misshaped-key", _reshape_key("conv_in.bias"), [OUR_WEIGHTS, "conv_in.bias", "shape"]),
    ("integer-key", _int_key("conv_out.weight"), [OUR_WEIGHTS, "conv_out.weight", "int32"]),
]

BROKEN_DIFFUSERS = [
    ("wrong-class-name", _set(_class_name="AutoencoderKL"), ["config.json", "_class_name", "AutoencoderKL"]),
    ("missing-weights", _unlink(DIFFUSERS_WEIGHTS), [DIFFUSERS_WEIGHTS]),
    ("truncated-weights", _truncate, [DIFFUSERS_WEIGHTS]),
    ("zero-byte-weights", _zero_bytes, [DIFFUSERS_WEIGHTS]),
    ("garbage-header", _garbage_header, [DIFFUSERS_WEIGHTS]),
    ("missing-key", _drop_key("mid_block.attentions.0.to_q.weight"),
     [DIFFUSERS_WEIGHTS, "missing", r"mid_block\.attentions\.0\.to_q\.weight"]),
    ("unexpected-key", _add_key("mid_block.attentions.1.to_q.weight"),
     [DIFFUSERS_WEIGHTS, "unexpected", r"mid_block\.attentions\.1\.to_q\.weight"]),
    ("misshaped-key", _reshape_key("class_embedding.weight"), [DIFFUSERS_WEIGHTS, "class_embedding.weight", "shape"]),
    ("field-not-a-list", _set(block_out_channels=8), ["config.json", "block_out_channels"]),
    ("zero-groups", _set(norm_num_groups=0, attn_norm_num_groups=0), ["config.json", "'norm_num_groups'"]),
]


def _check_refused(folder: Path, patterns: list[str]) -> None:
    with pytest.raises(EncdiffError) as info:
        UNet.from_pretrained(folder)
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in {message!r}"


@pytest.mark.parametrize("corrupt, patterns", [c[1:] for c in BROKEN_OURS], ids=[c[0] for c in BROKEN_OURS])
def test_broken_folder_in_our_format_is_refused_naming_file_and_key(tmp_path, corrupt, patterns):
    folder = MODELS["unet"]().save_pretrained(tmp_path / "model")
    UNet.from_pretrained(folder)  # intact, it loads
    corrupt(folder)
    _check_refused(folder, patterns)


@pytest.mark.parametrize("corrupt, patterns", [c[1:] for c in BROKEN_DIFFUSERS], ids=[c[0] for c in BROKEN_DIFFUSERS])
def test_broken_folder_in_diffusers_format_is_refused_naming_file_and_key(tmp_path, corrupt, patterns):
    folder = MODELS["unet"]().save_pretrained(tmp_path / "model", diffusers=True)
    UNet.from_pretrained(folder)
    corrupt(folder)
    _check_refused(folder, patterns)


@pytest.mark.parametrize("make", ["missing", "file"])
def test_path_that_is_not_a_folder_is_refused_naming_it(tmp_path, make):
    path = tmp_path / "no-such-model"
    if make == "file":
        path.write_text("{}")
    with pytest.raises(EncdiffError, match="no-such-model"):
        UNet.from_pretrained(path)


def test_folder_of_the_other_network_is_refused(tmp_path):
    MODELS["autoencoder"]().save_pretrained(tmp_path / "ours")
    MODELS["autoencoder"]().save_pretrained(tmp_path / "theirs", diffusers=True)
    with pytest.raises(EncdiffError, match="encdiff_class.*Autoencoder"):
        UNet.from_pretrained(tmp_path / "ours")
    with pytest.raises(EncdiffError, match="_class_name.*AutoencoderKL"):
        UNet.from_pretrained(tmp_path / "theirs")


# A diffusers config field or value encdiff cannot honour (or that is invalid) is refused, never silently ignored.
UNSUPPORTED_UNET = [
    ("time_embedding_type", "fourier"),
    ("resnet_time_scale_shift", "spatial"),
    ("down_block_types", ["AttnDownBlock2D", "CrossAttnDownBlock2D"]),
    ("up_block_types", ["AttnUpBlock2D", "ResnetUpsampleBlock2D"]),
    ("up_block_types", ["AttnUpBlock2D", "UpBlock2D"]),  # not the mirror of the down blocks
    ("down_block_types", ["AttnDownBlock2D"]),  # one block for two levels
    ("mid_block_type", "UNetMidBlock2DCrossAttn"),
    ("mid_block_type", None),
    ("mid_block_scale_factor", 1.414),
    ("center_input_sample", True),
    ("act_fn", "gelu"),
    ("class_embed_type", "timestep"),
    ("downsample_type", "resnet"),
    ("upsample_type", "resnet"),
    ("attn_norm_num_groups", 2),
    ("cross_attention_dim", 768),  # unknown to UNet2DModel
    ("attention_head_dim", [8, 8]),  # a per-level list (UNet2DConditionModel style)
    ("freq_shift", None),
]
UNSUPPORTED_AE = [
    ("act_fn", "relu"),
    ("down_block_types", ["DownEncoderBlock2D", "CrossAttnDownBlock2D", "DownEncoderBlock2D"]),
    ("up_block_types", ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]),  # not the mirror
    ("latents_std", [1.0, 2.0, 1.0, 1.0]),
    ("shift_factor", 0.1),  # together with latents_mean
    ("use_tiling", True),
    ("latents_mean", [0.1, 0.2]),  # 2 values for 4 latent channels
    ("latents_std", [0.0] * 4),
    ("scaling_factor", None),
]


@pytest.mark.parametrize("model, field, value",
                         [("unet", f, v) for f, v in UNSUPPORTED_UNET] + [("autoencoder", f, v) for f, v in UNSUPPORTED_AE],
                         ids=[f"unet-{f}={v}" for f, v in UNSUPPORTED_UNET] + [f"ae-{f}={v}" for f, v in UNSUPPORTED_AE])
def test_unsupported_or_invalid_diffusers_config_is_refused_naming_field_and_value(tmp_path, model, field, value):
    net = MODELS[model]()
    net.save_pretrained(tmp_path, diffusers=True)
    edit_config(tmp_path, lambda c: c.update({field: value}))
    with pytest.raises(EncdiffError) as info:
        type(net).from_pretrained(tmp_path)
    message = str(info.value)
    assert "config.json" in message
    assert repr(field) in message
    assert repr(value) in message


# ---------------------------------------------------------------------------------------------------------
# No pickle anywhere in the library: weights are safetensors only.


def unsafe_loads(source: str) -> list[str]:
    """`torch.load(...)` calls without `weights_only=True`, and pickle imports, in Python source."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            problems += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in ("pickle", "dill", "cloudpickle")]
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in ("pickle", "dill", "cloudpickle"):
                problems.append(f"from {node.module} import")
            if node.module == "torch" and any(a.name == "load" for a in node.names):
                problems.append("from torch import load")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
              and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            if not safe:
                problems.append(f"torch.load at line {node.lineno}")
    return problems


@pytest.mark.parametrize("source, bad", [
    ("import torch\nstate = torch.load(path)\n", True),
    ("import torch\nstate = torch.load(path, weights_only=False)\n", True),
    ("import torch\nstate = torch.load(\n    path,\n    map_location='cpu',\n    weights_only=True,\n)\n", False),
    ("import pickle\n", True),
    ("from pickle import loads\n", True),
    ("import json\njson.load(f)\n", False),
])
def test_unsafe_load_detector_works(source, bad):
    assert bool(unsafe_loads(source)) == bad


def test_no_source_file_unpickles():
    files = sorted(SRC.rglob("*.py"))
    assert files, SRC
    problems = {str(f.relative_to(SRC)): p for f in files if (p := unsafe_loads(f.read_text()))}
    assert problems == {}


def test_loading_a_generator_neither_initialises_randomly_nor_imports_the_compiler(tmp_path):
    """Start-up is most of `encdiff sample --fast`: building a model only to overwrite its weights must not draw random
    numbers or touch torch._dynamo (meta-device init imports it, 1.4-1.9 s). Both backbones, bit-exact weights."""
    import subprocess
    import sys

    from encdiff import MPUNet
    from encdiff.presets import MP_UNETS

    adm = UNet(TINY_UNET_CLASSES)
    randomize_(adm)  # no zero-initialised layers: every tensor must be the file's
    adm.save_pretrained(tmp_path / "adm")
    MPUNet(MP_UNETS["tiny"]).save_pretrained(tmp_path / "mp")
    script = (
        "import sys, torch\n"
        "from encdiff import UNet, MPUNet\n"
        "from safetensors.torch import load_file\n"
        "for cls, name in ((UNet, 'adm'), (MPUNet, 'mp')):\n"
        f"    folder = {str(tmp_path)!r} + '/' + name\n"
        "    state = torch.random.get_rng_state()\n"
        "    model = cls.from_pretrained(folder)\n"
        "    assert torch.equal(torch.random.get_rng_state(), state), 'random numbers were drawn'\n"
        "    saved = load_file(folder + '/model.safetensors')\n"
        "    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())\n"
        "print('torch._dynamo' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], env={"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
