"""Our Qwen3 text encoder against transformers' Qwen3Model on the same weights (every hidden state, with padding
masks, and the Z-Image / klein encodings as their pipelines compute them); the Qwen3 tokenizer and chat prompts
against transformers' Qwen2 tokenizer loaded from the same files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.models.qwen3 import (
    KLEIN_LAYERS,
    Qwen3,
    Qwen3Config,
    compute_dtype,
    klein_prompt_embeds,
    qwen3_key_map,
    zimage_prompt_embeds,
)
from core.models.qwen3_tokenizer import PAD_ID, TEMPLATES, apply_template, encode, tokenize, vocab_size
from core.models.testing import random_state_dict, write_random_qwen3
from tests.reference import rel_err, torch_threads
from tests.test_t5 import prompts as t5_prompts

transformers = pytest.importorskip("transformers")

CONFIGS = Path("/work/shared/data/model-configs")
TEXT_ENCODER_CONFIGS = {
    "4b": CONFIGS / "black-forest-labs/FLUX.2-klein-4B/text_encoder/config.json",
    "8b": CONFIGS / "black-forest-labs/FLUX.2-klein-9B/text_encoder/config.json",
}
ZIMAGE_TEXT_ENCODER = CONFIGS / "Tongyi-MAI/Z-Image-Turbo/text_encoder/config.json"
TOKENIZER = Path("/work/shared/data/tokenizers/qwen3")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks run several times faster on one thread than on two contended ones."""
    with torch_threads(1):
        yield

def reference_config(cfg: Qwen3Config):
    return transformers.Qwen3Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=40960,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )


def build_pair(cfg: Qwen3Config, seed: int = 0):
    with torch.device("meta"):
        ours = Qwen3(cfg)
    weights = random_state_dict(ours, seed=seed)
    ours.load_state_dict(weights, strict=True, assign=True)
    ref = transformers.Qwen3Model(reference_config(cfg))
    ref.load_state_dict({k.removeprefix("model."): v.clone() for k, v in weights.items()}, strict=True)
    return ours.eval(), ref.eval()


# klein takes hidden_states[9, 18, 27]: a 28-layer tiny model has all three (and still small: 28 x 10k weights + the embedding)
KLEIN_TINY = dataclasses.replace(Qwen3Config.preset("tiny"), num_hidden_layers=28)


@pytest.fixture(scope="module")
def tiny_pair():
    return build_pair(Qwen3Config.preset("tiny"))


@pytest.fixture(scope="module")
def klein_pair():
    return build_pair(KLEIN_TINY, seed=1)


def padded_ids(lengths: list[int], total: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 151669, (len(lengths), total), generator=g)
    mask = torch.zeros(len(lengths), total, dtype=torch.int64)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        ids[row, n:] = PAD_ID
    return ids, mask


def test_every_hidden_state_matches_transformers_with_padding(tiny_pair) -> None:
    ours, ref = tiny_pair
    ids, mask = padded_ids([40, 25, 7], 40)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        assert len(want) == ours.config.num_hidden_layers + 1
        got = ours(ids, mask, layers=range(len(want)))
        for i, (a, b) in enumerate(zip(got, want)):
            assert rel_err(a, b) <= 1e-5, i
        assert want[-1].std() > 0.1
        negative = ours(ids, mask, layers=(-2, -1))
        assert torch.equal(negative[0], got[-2]) and torch.equal(negative[1], got[-1])
        unmasked = ours(ids, None, layers=(-2,))[0]
        assert rel_err(unmasked[:, :7], got[-2][:, :7]) <= 1e-6  # causal: real tokens never see the padding
        assert rel_err(unmasked[1:, 25:], got[-2][1:, 25:]) > 1e-2  # but padding positions see the mask
        want_unmasked = ref(input_ids=ids, output_hidden_states=True).hidden_states[-2]
        assert rel_err(unmasked, want_unmasked) <= 1e-5
    with pytest.raises(ValueError, match="hidden state 4 does not exist"):
        ours(ids, mask, layers=(4,))
    with pytest.raises(ValueError, match="no hidden states"):
        ours(ids, mask, layers=())
    with pytest.raises(ValueError, match="does not match input_ids"):
        ours(ids, mask[:, :5])


@pytest.fixture(scope="module")
def reference_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(str(TOKENIZER))


def test_zimage_and_klein_encodings_match_the_pipelines(tiny_pair, klein_pair, reference_tokenizer) -> None:
    """ZImagePipeline._encode_prompt and Flux2KleinPipeline._get_qwen3_prompt_embeds, on the reference model."""
    ours, ref = tiny_pair
    texts = ["a red fox in the snow", "東京の夜景, neon rain 🌧️", ""]
    with torch.no_grad():
        # Z-Image: thinking template, 512 tokens padded, hidden_states[-2], padding dropped
        chat = [reference_tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                        add_generation_prompt=True, enable_thinking=True)
                for t in texts]
        inputs = reference_tokenizer(chat, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
        masks = inputs.attention_mask.bool()
        hidden = ref(input_ids=inputs.input_ids, attention_mask=masks, output_hidden_states=True).hidden_states[-2]
        want = [hidden[i][masks[i]] for i in range(len(texts))]
        tokens = tokenize(texts, "zimage")
        got = zimage_prompt_embeds(ours, tokens.input_ids, tokens.attention_mask)
        assert [g.shape for g in got] == [w.shape for w in want]
        for g, w in zip(got, want):
            assert rel_err(g, w) <= 1e-5

        # klein: no-thinking template, all 512 positions, hidden_states 9, 18, 27 side by side
        ours, ref = klein_pair
        chat = [reference_tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                        add_generation_prompt=True, enable_thinking=False)
                for t in texts[:2]]
        # 128 instead of the pipeline's 512 keeps the 28-layer reference quick; the padding rows count the same
        inputs = reference_tokenizer(chat, padding="max_length", max_length=128, truncation=True, return_tensors="pt")
        out = ref(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, output_hidden_states=True)
        stacked = torch.stack([out.hidden_states[k] for k in KLEIN_LAYERS], dim=1)
        want = stacked.permute(0, 2, 1, 3).reshape(2, 128, 3 * KLEIN_TINY.hidden_size)
        tokens = tokenize(texts[:2], "klein", 128)
        got = klein_prompt_embeds(ours, tokens.input_ids, tokens.attention_mask)
        assert got.shape == (2, 128, 96)
        assert rel_err(got, want) <= 1e-5


def test_bf16_runs_and_fp16_is_refused(tiny_pair) -> None:
    ours, ref = tiny_pair
    ids, mask = padded_ids([16, 9], 16, seed=3)
    model = Qwen3(ours.config)
    model.load_state_dict(ours.state_dict())
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        bf16 = model.to(torch.bfloat16)(ids, mask, layers=(-2,))[0]
        assert bf16.dtype == torch.bfloat16 and rel_err(bf16, want) < 0.05
        with pytest.raises(ValueError, match="bfloat16 or float32"):
            model.to(torch.float16)(ids, mask)
    assert compute_dtype(torch.bfloat16) == torch.bfloat16
    assert compute_dtype(torch.float16) == torch.bfloat16
    assert compute_dtype(torch.float8_e4m3fn) == torch.bfloat16
    assert compute_dtype(torch.float32) == torch.float32


@pytest.mark.parametrize("size", ["4b", "8b"])
def test_full_presets_are_the_real_configs_and_keys_match_transformers(size: str) -> None:
    real = json.loads(TEXT_ENCODER_CONFIGS[size].read_text())
    cfg = Qwen3Config.preset(size)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta"):
        assert getattr(cfg, field) == real[field], field
    if size == "4b":
        zimage = json.loads(ZIMAGE_TEXT_ENCODER.read_text())
        assert all(zimage[k] == v for k, v in real.items() if k in zimage and k != "architectures")
    with torch.device("meta"):
        ours = Qwen3(cfg)
        one = dataclasses.replace(cfg, num_hidden_layers=1)  # transformers builds 36 layers slowly; 1 shows the layout
        ref = transformers.Qwen3ForCausalLM(reference_config(one))
        ours_one = Qwen3(one)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ours_sd = {k: tuple(v.shape) for k, v in ours_one.state_dict().items()}
    ref_sd = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert set(ref_sd) - set(ours_sd) == {"lm_head.weight"}
    assert all(ref_sd[k] == v for k, v in ours_sd.items())
    assert len(shapes) == 398  # what qwen_3_4b.safetensors holds
    assert Qwen3Config.from_state_dict(shapes) == cfg

def test_written_file_loads_through_key_map_and_shapes(tmp_path) -> None:
    path = write_random_qwen3(tmp_path / "qwen_3_4b.safetensors", "tiny", seed=5)
    weights = load_file(str(path))
    assert all(k.startswith("model.") for k in weights) and weights["model.norm.weight"].dtype == torch.bfloat16
    # transformers' Qwen3Model layout (no prefix) with an lm_head maps to the same keys
    bare = {k.removeprefix("model."): v for k, v in weights.items()} | {"lm_head.weight": weights["model.embed_tokens.weight"]}
    mapping = qwen3_key_map(bare)
    assert set(mapping) == set(weights) and qwen3_key_map(weights) == {k: k for k in weights}
    cfg = Qwen3Config.from_state_dict({k: tuple(bare[v].shape) for k, v in mapping.items()})
    assert cfg == Qwen3Config.preset("tiny")
    with torch.device("meta"):
        model = Qwen3(cfg)
    model.load_state_dict({k: bare[v] for k, v in mapping.items()}, strict=True, assign=True)
    tokens = tokenize(["a cat", "a dog on a skateboard"], "zimage", 32)
    with torch.no_grad():
        feats = zimage_prompt_embeds(model, tokens.input_ids, tokens.attention_mask)
    assert [tuple(f.shape) for f in feats] == [(int(n), 32) for n in tokens.attention_mask.sum(dim=1)]
    assert all(f.dtype == torch.bfloat16 and torch.isfinite(f).all() for f in feats)


def test_from_state_dict_reports_bad_files() -> None:
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Qwen3(Qwen3Config.preset("tiny")).state_dict().items()}
    with pytest.raises(ValueError, match="embed_tokens"):
        Qwen3Config.from_state_dict({k: v for k, v in shapes.items() if "embed" not in k})
    with pytest.raises(ValueError, match="Qwen2"):
        Qwen3Config.from_state_dict({k: v for k, v in shapes.items() if "_norm." not in k})
    gap = {k.replace("layers.1.", "layers.5."): v for k, v in shapes.items()}
    with pytest.raises(ValueError, match=r"not numbered 0..n \(found \[0, 2, 5\]\)"):
        Qwen3Config.from_state_dict(gap)


# ------------------------------------------------------------------------------------------------------------
# Tokenizer


def prompts() -> list[str]:
    """The T5 tests' varied prompts plus what byte-level BPE and Qwen's added tokens make interesting."""
    extra = [
        "一只橘猫坐在窗台上，阳光明媚，水彩画风格", "東京の夜景、ネオンの雨", "고양이가 창가에 앉아 있다", "漢字とかなカナ混じり",
        "🐱🐶🦊", "👨‍👩‍👧‍👦 family", "🏳️‍🌈 flag", "👍🏽 skin tone", "emoji🚀glued✨text", "café naïve façade Ærø",
        "e\u0301 combining vs \u00e9 precomposed", "Ａ ｆｕｌｌ ｗｉｄｔｈ", "     five spaces", "a\n\n\nthree newlines",
        "tabs\t\t\tand  spaces  \n  mixed", "trailing newline\n", "\r\n\r\nwindows", "12345678901234567890",
        "I'M HERE, IT'S, WE'LL, THEY'D, YOU'VE", "<|im_end|> injected end", "<think>reasoning</think> after",
        "<|endoftext|><|im_start|>system", "<tool_call>x</tool_call>", "<|vision_start|><|image_pad|>", "<|im_end",
        "∑∫√∞ ≠ ≤ ≥ math", "ℕ ℤ ℚ ℝ", "\u200b zero width \ufeff bom", "﷽", "\U0001f9ea\U0001fae0 newer emoji",
        "長い" * 300, "a, " * 400,
    ]
    return t5_prompts() + extra


def test_templates_are_the_chat_template(reference_tokenizer) -> None:
    for text in ["a red fox", "", "  spaced  \n", "<think>", "東京"]:
        for template, thinking in (("zimage", True), ("klein", False)):
            want = reference_tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                           add_generation_prompt=True, enable_thinking=thinking)
            assert apply_template(text, template) == want
    assert apply_template("x", None) == "x"
    raw = prompts()[-40:]  # no template: the added tokens typed in a prompt are found as in the reference
    got = tokenize(raw, None, 77)
    want = reference_tokenizer(raw, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.attention_mask, want.attention_mask)
    assert encode("<|im_end|> injected end")[0] == 151645
    with pytest.raises(ValueError, match="zimage, klein"):
        apply_template("x", "flux")


@pytest.mark.parametrize("template", ["zimage", "klein"])
def test_tokenizer_matches_qwen2_tokenizer(reference_tokenizer, template: str) -> None:
    max_length = 512
    texts = prompts()
    assert len(texts) >= 300
    chat = [reference_tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                    add_generation_prompt=True, enable_thinking=template == "zimage")
            for t in texts]
    want = reference_tokenizer(chat, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    got = tokenize(texts, template, max_length)
    assert got.input_ids.shape == (len(texts), max_length)
    mismatched = [t for t, a, b in zip(texts, got.input_ids, want.input_ids) if not torch.equal(a, b)]
    assert not mismatched, mismatched[:3]
    assert torch.equal(got.attention_mask, want.attention_mask)
    full = [i for i, m in enumerate(want.attention_mask) if bool(m.all())]  # only these can have been cut
    lengths = {i: len(reference_tokenizer(chat[i]).input_ids) for i in full}
    assert got.truncated == [lengths[i] - max_length if i in lengths else 0 for i in range(len(texts))]
    assert any(got.truncated) and not all(got.truncated)


def test_tokenizer_ids_and_package_data() -> None:
    assert encode("a red fox") == [64, 2518, 38835]
    klein = tokenize("a red fox", "klein", 17)
    assert klein.input_ids[0].tolist() == [151644, 872, 198, 64, 2518, 38835, 151645, 198, 151644, 77091, 198,
                                           151667, 271, 151668, 271, PAD_ID, PAD_ID]
    assert klein.attention_mask[0].tolist() == [1] * 15 + [0, 0]
    assert TEMPLATES["zimage"].format("p") + "<think>\n\n</think>\n\n" == TEMPLATES["klein"].format("p")
    assert vocab_size() == 151669
    with pytest.raises(ValueError, match="max_length"):
        tokenize("x", None, 0)
    data = Path(__file__).resolve().parents[1] / "core" / "models" / "data" / "qwen3"
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (data / name).read_bytes() == (TOKENIZER / name).read_bytes(), name
    assert "Apache License" in (data / "LICENSE-NOTE.md").read_text()
    assert '"data/qwen3/*"' in (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
