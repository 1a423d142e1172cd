"""ModelRegistry on temporary ComfyUI and A1111 folder trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.errors import DarkroomError, ModelNotFoundError
from core.models.registry import ModelFile, ModelRegistry


def touch(path: Path, size: int = 3) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


@pytest.fixture
def comfy(tmp_path) -> Path:
    root = tmp_path / "ComfyUI"
    m = root / "models"
    touch(m / "checkpoints" / "dreamshaper_8.safetensors", 11)
    touch(m / "checkpoints" / "dreamshaper_8.ckpt")  # same name: .safetensors wins
    touch(m / "checkpoints" / "sd15" / "Realistic Vision.safetensors")
    touch(m / "checkpoints" / "sdxl" / "juggernaut.safetensors")
    touch(m / "checkpoints" / "old.ckpt")
    touch(m / "checkpoints" / "embedding.pt")
    touch(m / "checkpoints" / "readme.txt")
    touch(m / "checkpoints" / ".hidden.safetensors")
    touch(m / "checkpoints" / ".cache" / "x.safetensors")
    touch(m / "vae" / "vae-ft-mse-840000.safetensors")
    touch(m / "loras" / "styles" / "ink.safetensors")
    return root


@pytest.fixture
def a1111(tmp_path) -> Path:
    m = tmp_path / "stable-diffusion-webui" / "models"
    touch(m / "Stable-diffusion" / "v1-5-pruned-emaonly.safetensors")
    touch(m / "Stable-diffusion" / "anything" / "anything-v5.ckpt")
    touch(m / "VAE" / "kl-f8-anime2.ckpt")
    touch(m / "Lora" / "add_detail.safetensors")
    return m  # the "models" folder itself as the root


def names(files: list[ModelFile]) -> list[str]:
    return [f.name for f in files]


def test_comfyui_app_root(comfy):
    reg = ModelRegistry([comfy])
    assert names(reg.checkpoints()) == [
        "dreamshaper_8", "embedding", "old", "sd15/Realistic Vision", "sdxl/juggernaut",
    ]
    dream = reg.checkpoints()[0]
    assert dream.path == comfy / "models" / "checkpoints" / "dreamshaper_8.safetensors" and dream.size == 11
    assert names(reg.vaes()) == ["vae-ft-mse-840000"]
    assert names(reg.loras()) == ["styles/ink"]
    m = comfy / "models"
    assert reg.search_dirs == [m / "checkpoints", m / "vae", m / "loras"]


def test_a1111_models_folder_as_root(a1111):
    reg = ModelRegistry([a1111])
    assert names(reg.checkpoints()) == ["anything/anything-v5", "v1-5-pruned-emaonly"]
    assert names(reg.vaes()) == ["kl-f8-anime2"]
    assert names(reg.loras()) == ["add_detail"]
    assert reg.search_dirs == [a1111 / "Stable-diffusion", a1111 / "VAE", a1111 / "Lora"]


def test_checkpoint_folder_as_root_and_several_roots(comfy, a1111, tmp_path):
    loose = tmp_path / "loose"
    touch(loose / "dreamshaper_8.safetensors")  # same name as in ComfyUI: the earlier root wins
    touch(loose / "mine.safetensors")
    missing = tmp_path / "nowhere"
    reg = ModelRegistry([comfy, a1111, loose, missing])
    by_name = {f.name: f for f in reg.checkpoints()}
    assert set(by_name) == {
        "dreamshaper_8", "embedding", "old", "sd15/Realistic Vision", "sdxl/juggernaut",
        "anything/anything-v5", "v1-5-pruned-emaonly", "mine",
    }
    assert by_name["dreamshaper_8"].path.parent == comfy / "models" / "checkpoints"
    assert names(reg.vaes()) == ["kl-f8-anime2", "vae-ft-mse-840000"]
    assert loose in reg.search_dirs and reg.search_dirs[-1] == missing  # loose: checkpoints; missing: listed


def test_default_roots_from_env(tmp_path, monkeypatch, comfy, a1111):
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DARKROOM_MODELS", f"{comfy}{os.pathsep}{a1111}{os.pathsep}")
    reg = ModelRegistry()
    assert reg.roots == [comfy, a1111, tmp_path / "home" / "data" / "models"]
    assert "v1-5-pruned-emaonly" in names(reg.checkpoints())
    monkeypatch.delenv("DARKROOM_MODELS")
    assert ModelRegistry().roots == [tmp_path / "home" / "data" / "models"]


def test_find_checkpoint_by_every_form(comfy, tmp_path):
    reg = ModelRegistry([comfy])
    ckpts = comfy / "models" / "checkpoints"
    rv = ckpts / "sd15" / "Realistic Vision.safetensors"
    assert reg.find_checkpoint("sd15/Realistic Vision") == rv  # exact relative name
    assert reg.find_checkpoint("sd15/Realistic Vision.safetensors") == rv  # with extension
    assert reg.find_checkpoint("sd15\\Realistic Vision") == rv  # Windows separators
    assert reg.find_checkpoint("Realistic Vision") == rv  # unique stem
    assert reg.find_checkpoint("realistic vision.safetensors") == rv  # case-insensitive stem
    assert reg.find_checkpoint("dreamshaper_8") == ckpts / "dreamshaper_8.safetensors"
    assert reg.find_checkpoint("dreamshaper_8.ckpt") == ckpts / "dreamshaper_8.ckpt"  # asked for the ckpt
    outside = touch(tmp_path / "elsewhere" / "x.safetensors")
    assert reg.find_checkpoint(str(outside)) == outside  # absolute path, even outside the roots
    assert reg.find_checkpoint(outside) == outside


def test_find_vae(comfy):
    reg = ModelRegistry([comfy])
    vae = comfy / "models" / "vae" / "vae-ft-mse-840000.safetensors"
    assert reg.find_vae("vae-ft-mse-840000") == vae
    assert reg.find_vae("vae-ft-mse-840000.safetensors") == vae
    with pytest.raises(ModelNotFoundError, match="VAE 'vae-ft-mse' not found .*close matches: vae-ft-mse-840000"):
        reg.find_vae("vae-ft-mse")


def test_not_found_names_value_folders_and_close_matches(comfy, tmp_path):
    reg = ModelRegistry([comfy])
    with pytest.raises(ModelNotFoundError) as err:
        reg.find_checkpoint("dreamshaper-8")
    message = str(err.value)
    assert "checkpoint 'dreamshaper-8' not found in" in message
    assert str(comfy / "models" / "checkpoints") in message
    assert "close matches: dreamshaper_8" in message
    assert isinstance(err.value, DarkroomError)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        reg.find_checkpoint(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ModelNotFoundError, match="empty"):
        reg.find_checkpoint(" ")


def test_ambiguous_stem(tmp_path):
    touch(tmp_path / "a" / "model.safetensors")
    touch(tmp_path / "b" / "model.safetensors")
    reg = ModelRegistry([tmp_path])
    with pytest.raises(ModelNotFoundError, match="'model' is ambiguous: it matches a/model, b/model"):
        reg.find_checkpoint("model")
    assert reg.find_checkpoint("b/model") == tmp_path / "b" / "model.safetensors"


def test_empty_folders_say_where_they_looked(tmp_path):
    reg = ModelRegistry([tmp_path / "none"])
    assert reg.checkpoints() == [] and reg.search_dirs == [tmp_path / "none"]
    with pytest.raises(ModelNotFoundError, match="there are no checkpoint files in .*none.*DARKROOM_MODELS"):
        reg.find_checkpoint("anything")


def test_refresh_picks_up_new_files_and_symlink_loops_are_safe(tmp_path):
    ckpts = tmp_path / "models" / "checkpoints"
    touch(ckpts / "a.safetensors")
    (ckpts / "loop").symlink_to(ckpts, target_is_directory=True)
    reg = ModelRegistry([tmp_path])
    assert names(reg.checkpoints()) == ["a"]
    touch(ckpts / "b.safetensors")
    assert names(reg.checkpoints()) == ["a"]  # cached
    reg.refresh()
    assert names(reg.checkpoints()) == ["a", "b"]


def test_not_found_lists_only_the_folders_searched_for_that_kind(tmp_path):
    comfy = tmp_path / "ComfyUI" / "models"
    touch(comfy / "checkpoints" / "tiny.safetensors")
    touch(comfy / "vae" / "tinyvae.safetensors")
    touch(comfy / "loras" / "detail.safetensors")
    loose = tmp_path / "loose"
    touch(loose / "other.safetensors")
    reg = ModelRegistry([comfy, loose, tmp_path / "missing"])
    with pytest.raises(ModelNotFoundError) as err:
        reg.find_checkpoint("tinny")
    searched = str(err.value).split(" not found in ", 1)[1].split("; ", 1)[0]
    assert searched.split(", ") == [str(comfy / "checkpoints"), str(loose), str(tmp_path / "missing")]
    with pytest.raises(ModelNotFoundError) as err:
        reg.find_vae("novae")
    searched = str(err.value).split(" not found in ", 1)[1].split("; ", 1)[0]
    assert searched.split(", ") == [str(comfy / "vae"), str(tmp_path / "missing")]


def test_missing_vae_names_the_folders_looked_for_and_where_to_put_them(tmp_path):
    plain = tmp_path / "m"  # --models-dir pointing at a folder of checkpoints
    touch(plain / "tiny.safetensors")
    reg = ModelRegistry([plain])
    with pytest.raises(ModelNotFoundError) as err:
        reg.find_vae("sdxl_vae")
    message = str(err.value)
    assert "(no folders)" not in message
    assert f"looked for {plain / 'vae'}, {plain / 'VAE'}" in message
    assert f"put VAE files (.safetensors, .ckpt, .pt) in {plain / 'vae'}" in message
    a1111 = tmp_path / "webui"
    touch(a1111 / "models" / "Stable-diffusion" / "x.safetensors")
    with pytest.raises(ModelNotFoundError, match=f"in {a1111 / 'models' / 'VAE'}, or give the VAE file's path"):
        ModelRegistry([a1111]).find_vae("any")  # A1111's own name beside its Stable-diffusion folder
    with pytest.raises(ModelNotFoundError, match=f"no LoRA folder .*put LoRA files .* in {plain / 'loras'}"):
        reg.find_lora("detail")


def test_a_plain_checkpoint_folder_keeps_its_checkpoints_when_a_vae_folder_is_added(tmp_path):
    plain = tmp_path / "m"
    touch(plain / "tiny.safetensors")
    touch(plain / "sd15" / "other.safetensors")
    touch(plain / "vae" / "myvae.safetensors")  # where the missing-VAE message says to put it
    reg = ModelRegistry([plain])
    assert names(reg.checkpoints()) == ["sd15/other", "tiny"]  # the VAE is not listed as a checkpoint
    assert names(reg.vaes()) == ["myvae"]
    assert reg.find_vae("myvae") == plain / "vae" / "myvae.safetensors"


def test_a_symlinked_model_keeps_the_name_the_user_gave_it(tmp_path):
    store = tmp_path / "store"
    target = touch(store / "3f9a1c-download.safetensors")
    ckpts = tmp_path / "models" / "checkpoints"
    ckpts.mkdir(parents=True)
    link = ckpts / "dreamy.safetensors"
    link.symlink_to(target)
    (ckpts / "linked-dir").symlink_to(store, target_is_directory=True)
    reg = ModelRegistry([tmp_path / "models"])
    assert names(reg.checkpoints()) == ["dreamy", "linked-dir/3f9a1c-download"]
    assert reg.find_checkpoint("dreamy") == link  # not the target: its stem names the loaded model
    assert reg.find_checkpoint("dreamy.safetensors") == link
    assert reg.find_checkpoint(str(link)) == link
    assert reg.find_checkpoint("linked-dir/3f9a1c-download") == ckpts / "linked-dir" / target.name


def test_a_model_loaded_through_a_symlink_is_named_after_the_link(tmp_path):
    from core.models.testing import write_random_checkpoint
    from core.pipeline import PipelineRunner
    from core.request import GenerationRequest

    target = write_random_checkpoint(tmp_path / "store" / "3f9a1c.safetensors", "sd15", "tiny", seed=0)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "dreamy.safetensors").symlink_to(target)
    runner = PipelineRunner([tmp_path / "models"], device="cpu", previews=False)
    runner.ensure_model(GenerationRequest(model="dreamy"))
    assert runner.loaded_model == "dreamy"  # the status line names the link, not "3f9a1c"
