"""deepseek_mini.viz on a small pretrained DeepSeek (MLA + MoE), built in a temporary
DEEPSEEK_MINI_HOME: captured attention and residual stream against the model's own forward,
and every plot helper builds a figure with the right shapes and labels, headless (Agg)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from deepseek_mini import viz  # noqa: E402
from deepseek_mini.attention import scaled_dot_product_attention  # noqa: E402
from deepseek_mini.pretrained import pretrained  # noqa: E402
from deepseek_mini.rope import apply_rope  # noqa: E402

SMALL_MODEL = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16,
                   qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, intermediate_size=64,
                   first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                   moe_intermediate_size=16)
FAST = dict(corpus_chars=60_000, vocab_size=300, seq_len=32, batch_size=4, steps=4, warmup_steps=1, lr=1e-2,
            eval_batches=1, model=SMALL_MODEL, progress=False)
TEXT = "def add(a, b):\n    return a + 42\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEEPSEEK_MINI_HOME", str(tmp_path_factory.mktemp("deepseek_mini_home")))
        yield pretrained("tiny", **FAST)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _ids(tiny, text=TEXT):
    return torch.tensor([tiny.tokenizer.encode(text)])


def test_token_labels_are_visible(tiny):
    ids = tiny.tokenizer.encode(" x\n\t")
    labels = viz.token_labels(tiny.tokenizer, torch.tensor(ids))
    assert len(labels) == len(ids)
    assert "".join(labels) == "\u00b7x\u21b5\u2192"

    class Long:  # a tokenizer whose tokens are long words
        def decode(self, ids):
            return "abcdefghij" * len(ids)

    assert viz.token_labels(Long(), [3, 4], max_len=5) == ["abcd\u2026", "abcd\u2026"]

    class Odd:  # control characters and a script DejaVu Sans lacks: escaped, so plots raise no glyph warning
        def decode(self, ids):
            return {0: "\x05", 1: "\u4e2d", 2: "\u00e9\ufffd"}[ids[0]]

    assert viz.token_labels(Odd(), [0, 1, 2]) == ["\\x05", "\\u4e2d", "\u00e9\ufffd"]
    with pytest.raises(ValueError, match="1-D"):
        viz.token_labels(tiny.tokenizer, torch.zeros(2, 2, dtype=torch.long))


def test_every_token_label_draws_without_a_glyph_warning(tiny):
    import warnings

    labels = viz.token_labels(tiny.tokenizer, list(range(tiny.tokenizer.vocab_size)))  # all 256 bytes included
    fig, ax = plt.subplots()
    for i, label in enumerate(labels):
        ax.text(0, i, label)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig.savefig(__import__("io").BytesIO(), format="png")


def test_attention_maps_match_the_layers_own_attention(tiny):
    model, ids = tiny.model, _ids(tiny)
    maps = viz.attention_maps(model, ids)
    cfg, S = model.config, ids.shape[1]
    assert len(maps) == cfg.num_hidden_layers
    assert all(tuple(m.shape) == (1, cfg.num_attention_heads, S, S) for m in maps)
    assert torch.allclose(maps[0].sum(-1), torch.ones(1, cfg.num_attention_heads, S), atol=1e-5)
    assert torch.all(maps[1].triu(1) == 0), "causal: no weight on future keys"
    assert not any(m._forward_hooks for m in model.modules()), "the recording hooks must be removed"
    # recompute layer 0 from its input: q, k from the MLA projections, then the reference formula
    attn, x = model.layers[0].self_attn, model.layers[0].input_layernorm(model.embed_tokens(ids))
    cos, sin = model.rope_cos[:S], model.rope_sin[:S]
    with torch.no_grad():
        q_nope, q_pe = attn.project_q(x)
        c_kv, k_pe = attn.project_kv_latent(x)
        k_nope = attn.kv_b_proj(c_kv[:, 0]).view(1, S, attn.n_heads, -1).transpose(1, 2)[..., :attn.qk_nope_head_dim]
        q = torch.cat((q_nope, apply_rope(q_pe, cos, sin, attn.rope_interleaved)), dim=-1)
        k = torch.cat((k_nope, apply_rope(k_pe, cos, sin, attn.rope_interleaved).expand(-1, attn.n_heads, -1, -1)), -1)
        _, expected = scaled_dot_product_attention(q, k, k, scale=attn.softmax_scale, return_weights=True)
    assert torch.allclose(maps[0], expected, atol=1e-5)


def test_residual_stream_ends_in_the_logits(tiny):
    model, ids = tiny.model, _ids(tiny)
    hidden = viz.residual_stream(model, ids)
    L, D = model.config.num_hidden_layers, model.config.hidden_size
    assert tuple(hidden.shape) == (L + 1, 1, ids.shape[1], D)
    with torch.no_grad():
        assert torch.equal(hidden[0], model.embed_tokens(ids))
        assert torch.allclose(model.lm_head(model.norm(hidden[-1])), model(ids), atol=1e-5)
    assert not model.embed_tokens._forward_hooks and not model.layers[0]._forward_hooks, "hooks must be removed"
    with pytest.raises(ValueError, match="batch, seq"):
        viz.residual_stream(model, ids[0])


def test_attention_grid_shapes_and_labels(tiny):
    ids = _ids(tiny)
    maps = viz.attention_maps(tiny.model, ids)
    labels = viz.token_labels(tiny.tokenizer, ids[0])
    fig = viz.attention_grid(torch.stack([m[0] for m in maps]), labels, title="all layers")
    L, H = tiny.model.config.num_hidden_layers, tiny.model.config.num_attention_heads
    assert len(fig.axes) == L * H
    assert fig.axes[0].get_title() == "layer 0, head 0" and fig.axes[-1].get_title() == f"layer {L - 1}, head {H - 1}"
    assert fig.axes[0].images[0].get_array().shape == (ids.shape[1], ids.shape[1])
    assert [t.get_text() for t in fig.axes[(L - 1) * H].get_xticklabels()] == labels
    assert fig._suptitle.get_text() == "all layers"
    one = viz.attention_grid(maps[0][0], layer_names=["first"])  # [H, S, T]
    assert len(one.axes) == H and one.axes[1].get_title() == "first, head 1"
    with pytest.raises(ValueError, match="labels"):
        viz.attention_grid(maps[0][0], labels[:-1])


def test_routing_heatmap(tiny):
    fractions = torch.rand(5, 4)
    fig = viz.routing_heatmap(fractions, ["keyword", "identifier", "number", "punctuation", "whitespace"], title="t")
    ax = fig.axes[0]
    assert ax.images[0].get_array().shape == (5, 4)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["keyword", "identifier", "number", "punctuation", "whitespace"]
    assert len(ax.texts) == 20 and ax.texts[0].get_text() == f"{fractions[0, 0]:.2f}"
    assert ax.get_xlabel() == "expert" and ax.get_title() == "t"
    with pytest.raises(ValueError, match="rows"):
        viz.routing_heatmap(fractions, ["a", "b"])


def test_logit_lens_heatmap():
    values = torch.arange(12.0).view(3, 4)
    text = [[f"{r}{p}" for p in range(4)] for r in range(3)]
    fig = viz.logit_lens_heatmap(values, cell_text=text, x_labels=list("abcd"), y_labels=["emb", "l0", "l1"],
                                 colorbar_label="rank")
    ax = fig.axes[0]
    assert ax.images[0].get_array().shape == (3, 4)
    assert sorted(t.get_text() for t in ax.texts) == sorted(sum(text, []))
    assert [t.get_text() for t in ax.get_yticklabels()] == ["emb", "l0", "l1"]
    assert fig.axes[1].get_ylabel() == "rank"
    with pytest.raises(ValueError, match="cell_text"):
        viz.logit_lens_heatmap(values, cell_text=text[:2])


def test_embedding_scatter():
    xy = torch.randn(10, 2)
    groups = ["a"] * 6 + ["b"] * 4
    fig = viz.embedding_scatter(xy, groups, texts=[str(i) for i in range(10)], n_texts=3, title="emb")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a (6)", "b (4)"]
    assert sum(len(c.get_offsets()) for c in ax.collections) == 10
    assert len(ax.texts) == 3 and ax.get_title() == "emb"
    with pytest.raises(ValueError, match="xy"):
        viz.embedding_scatter(torch.randn(10, 3), groups)
    # a fixed order gives each group the same colour in every plot, whatever its size
    fixed = viz.embedding_scatter(xy, groups, group_order=["b", "a", "c"]).axes[0]
    colours = {t.get_text(): tuple(c.get_facecolor()[0]) for t, c in zip(fixed.get_legend().get_texts(), fixed.collections)}
    assert colours == {"a (6)": matplotlib.colors.to_rgba("C1", 0.8), "b (4)": matplotlib.colors.to_rgba("C0", 0.8)}
    with pytest.raises(ValueError, match="group_order"):
        viz.embedding_scatter(xy, groups, group_order=["a"])


def test_explorer_builds_and_redraws_without_a_front_end(tiny, capfd):
    widgets = pytest.importorskip("ipywidgets")
    box = viz.attention_explorer(tiny.model, tiny.tokenizer, TEXT, layer=1, head=1)
    assert isinstance(box, widgets.VBox)
    text_box, sliders, status, image = box.children
    assert sliders.children[0].max == tiny.model.config.num_hidden_layers - 1
    assert sliders.children[1].max == tiny.model.config.num_attention_heads - 1
    first = image.value
    assert first[:8] == b"\x89PNG\r\n\x1a\n", "the explorer draws a PNG"
    sliders.children[0].value = 0  # a dense layer: attention only
    assert image.value[:8] == b"\x89PNG\r\n\x1a\n" and image.value != first
    text_box.value = "x = 1"
    assert status.value.startswith(f"{len(tiny.tokenizer.encode('x = 1'))} tokens")
    assert capfd.readouterr().err == "", "building or using the explorer must not write to stderr"


def test_explorer_figure_shows_routing_for_moe_layers(tiny):
    dense = viz.explorer_figure(tiny.model, tiny.tokenizer, TEXT, layer=0, head=0)
    moe = viz.explorer_figure(tiny.model, tiny.tokenizer, TEXT, layer=2, head=1)
    assert len(dense.axes) == 1 and len(moe.axes) == 2
    chosen = moe.axes[1].images[0].get_array()
    assert chosen.shape == (tiny.model.config.n_routed_experts, len(tiny.tokenizer.encode(TEXT)))
    assert ((chosen > 0).sum(axis=0) == tiny.model.config.num_experts_per_tok).all(), "k experts per token"
    with pytest.raises(ValueError, match="head"):
        viz.explorer_figure(tiny.model, tiny.tokenizer, TEXT, layer=0, head=9)
