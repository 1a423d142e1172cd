"""T5 v1.1 encoder against transformers' T5EncoderModel on the same weights; the T5 tokenizer against
transformers' T5TokenizerFast on generated prompts."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.models.t5 import T5Config, T5EncoderModel, compute_dtype, relative_position_bucket, t5_key_map
from core.models.t5_tokenizer import EOS_ID, MAX_LENGTH, PAD_ID, tokenize, vocab_size
from core.models.testing import random_t5_state_dict, write_random_t5

transformers = pytest.importorskip("transformers")

T5_CONFIG = Path("/work/shared/data/model-configs/black-forest-labs/FLUX.1-dev/text_encoder_2/config.json")
TOKENIZER = Path("/work/shared/data/tokenizers/t5")


def reference_config(cfg: T5Config):
    return transformers.T5Config(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.d_kv,
        d_ff=cfg.d_ff,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        layer_norm_epsilon=cfg.layer_norm_epsilon,
        feed_forward_proj="gated-gelu",  # T5 v1.1: dense_act_fn gelu_new, is_gated_act
        dropout_rate=0.0,
        is_encoder_decoder=False,
    )


def build_pair(cfg: T5Config, seed: int = 0):
    with torch.device("meta"):
        meta = T5EncoderModel(cfg)
    from core.models.testing import random_state_dict

    weights = random_state_dict(meta, seed=seed)
    weights["shared.weight"] = weights["shared.weight"] * cfg.d_model**0.5
    ours = T5EncoderModel(cfg)
    ours.load_state_dict(weights, strict=True)
    ref = transformers.T5EncoderModel(reference_config(cfg))
    # the real files' keys; transformers ties encoder.embed_tokens to shared
    missing, unexpected = ref.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"encoder.embed_tokens.weight"}, (missing, unexpected)
    assert torch.equal(ref.encoder.embed_tokens.weight, weights["shared.weight"])
    return ours.eval(), ref.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 32100, (batch, length), generator=g)
    for row in range(batch):  # </s> then padding at a different place in each row, as the tokenizer gives
        end = max(1, length - 1 - 37 * row)
        ids[row, end] = EOS_ID
        ids[row, end + 1 :] = PAD_ID
    return ids


@pytest.mark.parametrize("length", [7, 77, 300])  # 300 > max_distance 128: the far logarithmic buckets
def test_matches_transformers(length: int) -> None:
    cfg = dataclasses.replace(T5Config.preset("t5xxl", "tiny"), num_layers=3)
    ours, ref = build_pair(cfg)
    ids = random_ids(2, length)
    with torch.no_grad():
        got = ours(ids)
        want = ref(input_ids=ids).last_hidden_state
    assert got.shape == (2, length, cfg.d_model)
    assert rel_err(got, want) <= 1e-5
    assert want.std() > 0.1


def test_attention_mask_matches_transformers() -> None:
    cfg = T5Config.preset("t5xxl", "tiny")
    ours, ref = build_pair(cfg, seed=2)
    ids = random_ids(3, 40, seed=1)
    mask = (ids != PAD_ID).long()
    mask[:, : 40 - 2 * 37] = 1
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        assert rel_err(got, want) <= 1e-5
        assert rel_err(ours(ids), want) > 1e-3  # the mask matters


def test_bf16_runs_and_fp16_is_refused() -> None:
    cfg = T5Config.preset("t5xxl", "tiny")
    ours, ref = build_pair(cfg, seed=3)
    ids = random_ids(1, 16)
    with torch.no_grad():
        want = ref(input_ids=ids).last_hidden_state
        bf16 = ours.to(torch.bfloat16)(ids)
        assert bf16.dtype == torch.bfloat16 and rel_err(bf16.float(), want) < 0.05
        with pytest.raises(ValueError, match="bfloat16 or float32"):
            ours.to(torch.float16)(ids)
    assert compute_dtype(torch.float16) == torch.bfloat16
    assert compute_dtype(torch.float8_e4m3fn) == torch.bfloat16
    assert compute_dtype(torch.float32) == torch.float32


def test_relative_position_buckets_match_transformers() -> None:
    pos = torch.arange(600)
    rel = pos[None, :] - pos[:, None]
    from transformers.models.t5.modeling_t5 import T5Attention

    want = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
    assert torch.equal(relative_position_bucket(rel, 32, 128), want)


def test_full_preset_is_flux_t5xxl_and_keys_match_transformers() -> None:
    real = json.loads(T5_CONFIG.read_text())
    cfg = T5Config.preset("t5xxl", "full")
    for field in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                  "relative_attention_num_buckets", "layer_norm_epsilon"):
        assert getattr(cfg, field) == real[field], field
    assert real["dense_act_fn"] == "gelu_pytorch_tanh" and real["is_gated_act"]
    with torch.device("meta"):
        ours = T5EncoderModel(cfg)
        ref = transformers.T5EncoderModel(reference_config(cfg))
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert set(ref_sd) - set(ours_sd) <= {"encoder.embed_tokens.weight"}
    assert set(ours_sd) <= set(ref_sd)
    for key, value in ours_sd.items():
        assert ref_sd[key].shape == value.shape, key
    assert len(ours_sd) == 2 + 24 * 9 + 1  # shared, final norm, 9 tensors per block, one position bias
    assert T5Config.from_state_dict({k: tuple(v.shape) for k, v in ours_sd.items()}) == cfg


@pytest.mark.parametrize("size", ["tiny", "full"])
def test_from_state_dict_round_trip_and_key_map(size: str) -> None:
    base = T5Config.preset("t5xxl", size)
    for cfg in (base, dataclasses.replace(base, num_layers=1, d_ff=base.d_ff // 2, num_heads=base.num_heads // 2)):
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in T5EncoderModel(cfg).state_dict().items()}
        assert T5Config.from_state_dict(shapes) == cfg
        # exports that keep the tied copy only, or an encoder-decoder file
        tied = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in shapes.items()}
        assert T5Config.from_state_dict(tied) == cfg
        mapping = t5_key_map([*tied, "decoder.block.0.layer.0.SelfAttention.q.weight"])
        assert set(mapping) == set(shapes) and mapping["shared.weight"] == "encoder.embed_tokens.weight"
        both = t5_key_map([*shapes, "encoder.embed_tokens.weight"])
        assert both == {k: k for k in shapes}


def test_from_state_dict_reports_bad_files() -> None:
    with pytest.raises(ValueError, match="shared.weight|embed_tokens"):
        T5Config.from_state_dict({"encoder.final_layer_norm.weight": (4096,)})
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in T5EncoderModel(T5Config.preset("t5xxl", "tiny")).state_dict().items()}
    v10 = {k.replace("wi_0", "wi"): v for k, v in shapes.items() if "wi_1" not in k}
    with pytest.raises(ValueError, match="T5 v1.0"):
        T5Config.from_state_dict(v10)
    gap = {k.replace("block.1.", "block.4."): v for k, v in shapes.items()}
    with pytest.raises(ValueError, match=r"not numbered 0..n \(found \[0, 4\]\)"):
        T5Config.from_state_dict(gap)


def test_written_fp16_file_loads_as_bf16_on_meta(tmp_path) -> None:
    """The loader's path for ComfyUI's t5xxl_fp16 layout: shapes -> config -> meta model -> bf16 weights."""
    path = write_random_t5(tmp_path / "t5xxl_fp16.safetensors", "tiny", seed=5)
    weights = load_file(str(path))
    assert "shared.weight" in weights and weights["shared.weight"].dtype == torch.float16
    assert not any(k.startswith("encoder.embed_tokens") for k in weights)
    cfg = T5Config.from_state_dict({k: tuple(v.shape) for k, v in weights.items()})
    assert cfg == T5Config.preset("t5xxl", "tiny")
    with torch.device("meta"):
        model = T5EncoderModel(cfg)
    dtype = compute_dtype(torch.float16)
    model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=True, assign=True)
    with torch.no_grad():
        out = model(tokenize(["a cat", "a dog on a skateboard"], 32).input_ids)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 32, 32) and torch.isfinite(out).all()
    assert torch.equal(random_t5_state_dict("tiny", seed=5)["shared.weight"], weights["shared.weight"])


# ------------------------------------------------------------------------------------------------------------
# Tokenizer


def prompts() -> list[str]:
    """Deterministic, varied prompts: plain, A1111 weights, punctuation, numbers, unicode, whitespace, long."""
    rng = random.Random(1234)
    words = (
        "a photo of cat dog astronaut riding horse on the moon portrait woman man city night neon rain "
        "cyberpunk watercolor painting oil canvas studio lighting bokeh 35mm film grain highly detailed 8k "
        "masterpiece best quality intricate ornate golden hour sunset mountain lake forest misty fantasy "
        "castle dragon knight armor steampunk robot futuristic vintage analog Kodak Portra isn't don't "
        "it's we're they'll NASA GPU T-shirt e-mail co-operate re-enter U.S.A. Dr. Mr. St. vs."
    ).split()
    unicode_bits = [
        "café", "naïve", "Zürich", "résumé", "São Paulo", "Ærøskøbing", "Łódź", "straße", "İstanbul",
        "東京の夜景", "一只猫", "고양이", "кошка на крыше", "γάτα", "قطة", "חתול", "बिल्ली", "แมว",
        "🐱", "🚀✨", "👩‍🚀", "❤️", "Ｆｕｌｌ ｗｉｄｔｈ", "ﬁne ﬂow", "x²", "½ cup", "№5", "™", "©2024",
        "e\u0301", "\u00a0nbsp", "zero\u200bwidth", "tab\tsep", "new\nline", "crlf\r\nend", "\u3000ideo",
        "“quoted”", "‘single’", "em—dash", "en–dash", "…", "«guillemets»", "¿qué?", "¡sí!",
    ]
    punctuation = ["!", "?", ".", ",", ";", ":", "...", "--", "/", "\\", "|", "#", "@", "$", "%", "^", "&", "*",
                   "(", ")", "[", "]", "{", "}", "<", ">", "=", "+", "~", "`", "'", '"', "_"]
    out = [
        "", " ", "a", "A", "   leading spaces", "trailing spaces   ", "many     inner      spaces",
        "\t\ttabs\tand\nnewlines\n", "UPPER lower MiXeD", "1234567890", "3.14159 2,000 1e-5 -42 +7 0x1F",
        "(masterpiece:1.2), (best quality), [worse:0.8], ((double)), [[double]]", "a (red:1.3) car BREAK blue sky",
        "<lora:detail:0.7> a castle", "\\(escaped\\) parens", "(unbalanced (parens", "weights:1.5 without parens",
        "a cat</s>after eos", "<pad> padded", "<unk>", "<extra_id_0> sentinel <extra_id_99>", "</s>",
        "hello" * 60, " ".join(["word"] * 600), "no-space,punctuation;everywhere.ok?", "a,b,c,d,e,f",
    ]
    for i in range(320):
        kind = i % 8
        n = rng.randint(1, 40 if kind != 7 else 400)
        parts = []
        for _ in range(n):
            r = rng.random()
            if r < 0.6:
                parts.append(rng.choice(words))
            elif r < 0.75:
                parts.append(rng.choice(unicode_bits))
            elif r < 0.9:
                parts.append(rng.choice(punctuation))
            else:
                parts.append(str(rng.choice([rng.randint(0, 10**6), round(rng.uniform(-10, 10), rng.randint(0, 4))])))
        if kind == 1:  # A1111 emphasis
            parts = [f"({p}:{rng.uniform(0.5, 1.8):.2f})" if rng.random() < 0.3 else p for p in parts]
        sep = [" ", "  ", ", ", ",", " \t ", "\n"][kind % 6] if kind in (2, 3, 4) else " "
        text = sep.join(parts)
        if kind == 5:
            text = rng.choice(["   ", "\n", "\t", ""]) + text + rng.choice(["   ", "\n", ""])
        out.append(text)
    return out


@pytest.fixture(scope="module")
def reference_tokenizer():
    return transformers.T5TokenizerFast.from_pretrained(str(TOKENIZER))


@pytest.mark.parametrize("max_length", [MAX_LENGTH["dev"], MAX_LENGTH["schnell"], 77])
def test_tokenizer_matches_t5_tokenizer_fast(reference_tokenizer, max_length: int) -> None:
    texts = prompts()
    assert len(texts) >= 300
    # FluxPipeline._get_t5_prompt_embeds calls the tokenizer so
    want = reference_tokenizer(
        texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    )
    got = tokenize(texts, max_length)
    assert got.input_ids.shape == (len(texts), max_length)
    mismatched = [t for t, a, b in zip(texts, got.input_ids, want.input_ids) if not torch.equal(a, b)]
    assert not mismatched, mismatched[:3]
    assert torch.equal(got.attention_mask, want.attention_mask)
    truncated = [len(reference_tokenizer(t).input_ids) - max_length for t in texts]
    assert got.truncated == [max(0, n) for n in truncated]
    assert any(got.truncated) and not all(got.truncated)


def test_tokenizer_shape_of_output() -> None:
    out = tokenize("a cat", 8)
    assert out.input_ids.tolist() == [[3, 9, 1712, EOS_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID]]
    assert out.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0, 0, 0]]
    assert tokenize("", 4).input_ids.tolist() == [[EOS_ID, PAD_ID, PAD_ID, PAD_ID]]
    long = tokenize("cat " * 20, 5)
    assert long.input_ids[0, -1] == EOS_ID and long.truncated == [16]
    assert vocab_size() == 32100
    with pytest.raises(ValueError, match="max_length"):
        tokenize("x", 0)


def test_tokenizer_is_package_data() -> None:
    data = Path(__file__).resolve().parents[1] / "core" / "models" / "data" / "t5"
    assert (data / "tokenizer.json").read_bytes() == (TOKENIZER / "tokenizer.json").read_bytes()
    assert "Apache License" in (data / "LICENSE-NOTE.md").read_text()
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"data/t5/*"' in pyproject and '"tokenizers>=' in pyproject


def test_attention_with_bias_and_scale_is_the_plain_formula() -> None:
    """The picker's bias/scale path (T5: unscaled logits plus relative position bias) computes
    softmax(q k^T * scale + bias) v per head."""
    from core.accel.attention import attention

    g = torch.Generator().manual_seed(0)
    b, n, heads, d = 2, 9, 3, 4
    q, k, v = (torch.randn(b, n, heads * d, generator=g) for _ in range(3))
    bias = torch.randn(1, heads, n, n, generator=g)
    got = attention(q, k, v, heads, bias=bias, scale=1.0)
    qh, kh, vh = (t.view(b, n, heads, d).transpose(1, 2) for t in (q, k, v))
    want = torch.softmax(qh @ kh.transpose(-1, -2) + bias, dim=-1) @ vh
    assert torch.allclose(got, want.transpose(1, 2).reshape(b, n, heads * d), atol=1e-6)
    default = attention(q, k, v, heads)
    assert torch.allclose(attention(q, k, v, heads, scale=d**-0.5), default, atol=1e-6)
