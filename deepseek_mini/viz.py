"""Looking inside a DeepseekModel: what to capture, and plots of it.

Capture, all through forward hooks that are removed afterwards (the model keeps nothing):
  * `AttentionWeights(model or attention module)`: a context manager that records the attention
    weights [B, H, S, T] of every attention call inside its `with` block;
    `attention_maps(model, input_ids)`: every layer's weights for one forward.
  * `routing(model, input_ids)`: each MoE layer's expert ids and gate weights [B, S, k]
    (`deepseek_mini.model.record_routing` records them during any forward, training included).
  * `residual_stream(model, input_ids)`: the hidden state after the embedding and after each
    block, [L + 1, B, S, D] (the input of a logit lens).
  * `token_labels(tokenizer, ids)`: one short, printable label per token for axes.

Plots (each returns a matplotlib Figure and never calls `plt.show()`, so they work headless
with the Agg backend and in tests; a notebook shows a returned figure by itself):
  * `attention_grid`: one heatmap per head (and per layer);
  * `routing_heatmap`: share of each token category's routing slots per expert;
  * `logit_lens_heatmap`: a layer x position table, colour = a number, text = a token;
  * `embedding_scatter`: 2-D points coloured by group, a few of them labelled.

`attention_explorer(model, tokenizer, text)` builds an ipywidgets explorer (text box, layer and
head sliders, a heatmap of that head and the experts each token was routed to). It draws into
an `ipywidgets.Image`, so building it needs no live front end (nbgrader runs notebooks
headless); without ipywidgets it returns a static figure instead.
"""

import io

import torch

from deepseek_mini.attention import Attend
from deepseek_mini.model import record_routing

# Visible stand-ins for characters that would otherwise vanish from a plot's labels.
_VISIBLE = str.maketrans({" ": "\u00b7", "\n": "\u21b5", "\t": "\u2192"})


def _drawable(ch: str) -> str:
    """ch itself when matplotlib's default font (DejaVu Sans) has it, else an escape like \\x05,
    so that labels never trigger "Glyph missing" warnings."""
    if ch in "\u00b7\u21b5\u2192\u2026\ufffd" or (ch.isprintable() and ord(ch) < 0x0530):
        return ch
    return ch.encode("unicode_escape").decode("ascii")


def token_labels(tokenizer, ids, max_len: int = 12) -> list[str]:
    """One label per token id: its text with spaces shown as '·', newlines as '↵', tabs as '→',
    other control characters and scripts the default font lacks escaped (\\x05, \\u4e2d), cut to
    max_len characters (bytes that are not whole UTF-8 characters show as '�')."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(f"token_labels: ids must be 1-D, got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    labels = []
    for i in ids:
        text = "".join(_drawable(ch) for ch in tokenizer.decode([int(i)]).translate(_VISIBLE))
        labels.append(text if len(text) <= max_len else text[: max_len - 1] + "\u2026")
    return labels


def _check_ids(model, input_ids):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [batch, seq] tensor, got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}")
    if not hasattr(model, "layers") or not hasattr(model, "embed_tokens"):
        raise TypeError(f"expected a deepseek_mini DeepseekModel, got {type(model).__name__}")


class AttentionWeights:
    """Records attention weights through forward hooks while the `with` block runs:

        with AttentionWeights(model) as attention:
            model(input_ids)
        attention.weights  # one [B, H, S, T] tensor per attention layer (its last call), in order

    Every `Attend` inside the given modules (a model, a block, one attention layer) is watched.
    The hook recomputes the weights from the q and k the layer handed to attention, with the
    reference formula: the forward itself may run flash attention (or, for one new token of
    absorbed MLA on a GPU, the decode kernel), which never forms them."""

    def __init__(self, *modules):
        found = [((k, name.rpartition(".")[0]), m) for k, module in enumerate(modules)
                 for name, m in module.named_modules() if isinstance(m, Attend)]
        if not found:
            raise TypeError(f"AttentionWeights: no attention layer (deepseek_mini.attention.Attend) inside "
                            f"{[type(m).__name__ for m in modules]}")
        # one slot per attention layer: MLA owns two Attends (naive and absorbed), one runs per call
        layers = list(dict.fromkeys(layer for layer, _ in found))
        self.attends = [(layers.index(layer), m) for layer, m in found]
        self.weights: list[torch.Tensor | None] = [None] * len(layers)
        self._handles = []

    def _record(self, i):
        def hook(module, args, kwargs, out):
            with torch.no_grad():
                self.weights[i] = module.weights(*args, **kwargs)
        return hook

    def __enter__(self) -> "AttentionWeights":
        self._handles = [m.register_forward_hook(self._record(i), with_kwargs=True) for i, m in self.attends]
        return self

    def __exit__(self, *exc_info):
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _layer_maps(attention: AttentionWeights) -> list[torch.Tensor]:
    missing = [i for i, w in enumerate(attention.weights) if w is None]
    if missing:
        raise ValueError(f"attention weights: attention layer(s) {missing} were not called by the forward")
    return attention.weights


@torch.no_grad()
def attention_maps(model, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Attention weights of every layer for one forward of input_ids [B, S]: a list with one
    [B, H, S, S] tensor per layer (rows: queries, columns: keys; each row sums to 1)."""
    _check_ids(model, input_ids)
    with AttentionWeights(*(layer.self_attn for layer in model.layers)) as attention:
        model(input_ids)
    return _layer_maps(attention)


def _shaped(recorded: dict, input_ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """`record_routing`'s last call per layer, as (expert ids, weights) [B, S, k]."""
    B, S = input_ids.shape
    return {i: (calls[-1].topk_idx.view(B, S, -1), calls[-1].topk_weight.view(B, S, -1))
            for i, calls in recorded.items() if calls}


@torch.no_grad()
def routing(model, input_ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{MoE layer index: (expert ids [B, S, k], gate weights [B, S, k])} for one forward of
    input_ids [B, S] (an empty dict for a model without MoE layers)."""
    _check_ids(model, input_ids)
    with record_routing(model) as recorded:
        model(input_ids)
    return _shaped(recorded, input_ids)


@torch.no_grad()
def residual_stream(model, input_ids: torch.Tensor) -> torch.Tensor:
    """[L + 1, B, S, D]: index 0 is the token embedding, index l the output of block l - 1; the
    last one is what the final norm and the LM head turn into the model's logits."""
    _check_ids(model, input_ids)
    captured = []
    hooks = [model.embed_tokens.register_forward_hook(lambda mod, args, out: captured.append(out))]
    # a block returns (hidden state, auxiliary loss)
    hooks += [layer.register_forward_hook(lambda mod, args, out: captured.append(out[0])) for layer in model.layers]
    try:
        model(input_ids)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(captured)


def _numpy(x):
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    import numpy as np

    return np.asarray(x, dtype=float)


def _tick_labels(ax, labels, axis, max_labels):
    """Put at most max_labels token labels on an axis (every k-th one when there are more)."""
    if labels is None:
        return
    step = max(1, -(-len(labels) // max_labels))
    ticks = list(range(0, len(labels), step))
    if axis == "x":
        ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=7)
    else:
        ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=7)


def attention_grid(weights, labels: list[str] | None = None, *, layer_names: list[str] | None = None,
                   title: str | None = None, max_labels: int = 32, cell_size: float = 2.6):
    """Heatmaps of attention weights: [H, S, T] (one row of heads) or [L, H, S, T] (a layer per
    row). labels: one per key position (and per query when S == T). Returns the Figure."""
    import matplotlib.pyplot as plt

    w = _numpy(weights)
    if w.ndim == 3:
        w = w[None]
    if w.ndim != 4:
        raise ValueError(f"attention_grid: weights must be [H, S, T] or [L, H, S, T], got shape {w.shape}")
    L, H, S, T = w.shape
    if labels is not None and len(labels) != T:
        raise ValueError(f"attention_grid: {len(labels)} labels for {T} key positions")
    if layer_names is not None and len(layer_names) != L:
        raise ValueError(f"attention_grid: {len(layer_names)} layer names for {L} layers")
    fig, axes = plt.subplots(L, H, figsize=(cell_size * H + 0.6, cell_size * L + 0.6), squeeze=False)
    for li in range(L):
        for h in range(H):
            ax = axes[li, h]
            ax.imshow(w[li, h], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"{layer_names[li] if layer_names else f'layer {li}'}, head {h}", fontsize=8)
            if labels is None or li < L - 1:
                ax.set_xticks([])
            else:
                _tick_labels(ax, labels, "x", max_labels)
            if labels is None or h > 0:
                ax.set_yticks([])
            else:
                _tick_labels(ax, labels[T - S:], "y", max_labels)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def routing_heatmap(fractions, row_labels: list[str], *, title: str | None = None, annotate: bool = True,
                    ax=None):
    """fractions [C, E] (e.g. the share of each token category's routing slots that expert e
    got) as a heatmap with one row per category and the values written in the cells."""
    import matplotlib.pyplot as plt

    f = _numpy(fractions)
    if f.ndim != 2 or f.shape[0] != len(row_labels):
        raise ValueError(f"routing_heatmap: fractions must be [{len(row_labels)} rows, n_experts], got shape {f.shape}")
    C, E = f.shape
    if ax is None:
        fig, ax = plt.subplots(figsize=(0.55 * E + 2.5, 0.45 * C + 1.2))
    else:
        fig = ax.figure
    image = ax.imshow(f, cmap="magma", vmin=0.0, vmax=max(float(f.max()), 1e-9), aspect="auto")
    ax.set_xticks(range(E), [str(e) for e in range(E)])
    ax.set_yticks(range(C), row_labels)
    ax.set_xlabel("expert")
    if annotate:
        top = float(f.max()) or 1.0
        for c in range(C):
            for e in range(E):
                ax.text(e, c, f"{f[c, e]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if f[c, e] > 0.6 * top else "white")
    fig.colorbar(image, ax=ax, fraction=0.04)
    if title:
        ax.set_title(title)
    return fig


def logit_lens_heatmap(values, *, cell_text=None, x_labels: list[str] | None = None,
                       y_labels: list[str] | None = None, title: str | None = None, cmap: str = "viridis_r",
                       colorbar_label: str | None = None, cell_width: float = 0.62):
    """A [rows, positions] table drawn as a heatmap (e.g. rows = layers, colour = log rank of
    the true next token) with optional text in each cell (e.g. the top-1 token)."""
    import matplotlib.pyplot as plt

    v = _numpy(values)
    if v.ndim != 2:
        raise ValueError(f"logit_lens_heatmap: values must be 2-D [rows, positions], got shape {v.shape}")
    R, P = v.shape
    if cell_text is not None and (len(cell_text) != R or any(len(row) != P for row in cell_text)):
        raise ValueError(f"logit_lens_heatmap: cell_text must be {R} rows of {P} strings")
    for name, labels, n in (("x_labels", x_labels, P), ("y_labels", y_labels, R)):
        if labels is not None and len(labels) != n:
            raise ValueError(f"logit_lens_heatmap: {name} has {len(labels)} entries, expected {n}")
    fig, ax = plt.subplots(figsize=(cell_width * P + 2.5, 0.5 * R + 1.6))
    image = ax.imshow(v, cmap=cmap, aspect="auto")
    if cell_text is not None:
        for r in range(R):
            for p in range(P):
                ax.text(p, r, cell_text[r][p], ha="center", va="center", fontsize=6, color="white",
                        bbox=dict(boxstyle="round,pad=0.1", fc="black", alpha=0.35, lw=0))
    if x_labels is not None:
        ax.set_xticks(range(P), x_labels, rotation=90, fontsize=7)
    if y_labels is not None:
        ax.set_yticks(range(R), y_labels)
    colorbar = fig.colorbar(image, ax=ax, fraction=0.03)
    if colorbar_label:
        colorbar.set_label(colorbar_label)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def embedding_scatter(xy, groups: list[str], *, texts: list[str] | None = None, n_texts: int = 30,
                      title: str | None = None, ax=None, seed: int = 0, group_order: list[str] | None = None):
    """Points xy [N, 2] coloured by group (a legend with the counts); n_texts of them, picked at
    random with `seed`, labelled with their text. group_order fixes each group's colour (C0, C1,
    ... in that order), so several plots agree; the largest group is drawn first, under the others."""
    import matplotlib.pyplot as plt
    import numpy as np

    p = _numpy(xy)
    if p.ndim != 2 or p.shape[1] != 2 or p.shape[0] != len(groups):
        raise ValueError(f"embedding_scatter: xy must be [{len(groups)}, 2] (one point per group label), "
                         f"got shape {p.shape}")
    if texts is not None and len(texts) != len(groups):
        raise ValueError(f"embedding_scatter: {len(texts)} texts for {len(groups)} points")
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.5, 5.5))
    else:
        fig = ax.figure
    groups = list(groups)
    order = list(group_order) if group_order is not None else list(dict.fromkeys(groups))  # default: first seen
    missing = set(groups) - set(order)
    if missing:
        raise ValueError(f"embedding_scatter: groups {sorted(missing)} are not in group_order {order}")
    counts = {name: sum(g == name for g in groups) for name in order}
    for name in sorted((n for n in order if counts[n]), key=lambda n: -counts[n]):
        mask = np.array([g == name for g in groups])
        ax.scatter(p[mask, 0], p[mask, 1], s=8, color=f"C{order.index(name) % 10}", label=f"{name} ({counts[name]})",
                   alpha=0.8)
    if texts is not None and n_texts:
        rng = np.random.default_rng(seed)
        for i in rng.choice(len(texts), size=min(n_texts, len(texts)), replace=False):
            ax.annotate(texts[i], p[i], fontsize=7, alpha=0.9)
    ax.legend(fontsize=8, markerscale=2)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    return fig


def _figure_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def explorer_figure(model, tokenizer, text: str, layer: int, head: int, max_tokens: int = 48):
    """What the explorer shows: the (layer, head) attention heatmap of `text` and, for an MoE
    layer, which experts each token went to. Returns the Figure."""
    import matplotlib.pyplot as plt
    import numpy as np

    cfg = model.config
    if not 0 <= layer < cfg.num_hidden_layers:
        raise ValueError(f"layer must be in [0, {cfg.num_hidden_layers}), got {layer}")
    if not 0 <= head < cfg.num_attention_heads:
        raise ValueError(f"head must be in [0, {cfg.num_attention_heads}), got {head}")
    ids = tokenizer.encode(text)[:max_tokens] or [tokenizer.eot_id]
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    with torch.no_grad(), AttentionWeights(model.layers[layer].self_attn) as attention, \
            record_routing(model) as recorded:
        model(input_ids)
    weights = _layer_maps(attention)[0][0, head]
    labels = token_labels(tokenizer, ids)
    layer_routing = _shaped(recorded, input_ids).get(layer)
    rows = 2 if layer_routing is not None else 1
    size = 0.18 * len(ids) + 2.5
    fig, axes = plt.subplots(rows, 1, figsize=(size, size + (1.2 if rows == 2 else 0)), squeeze=False,
                             gridspec_kw={"height_ratios": [len(ids), 4] if rows == 2 else [1]})
    ax = axes[0, 0]
    ax.imshow(_numpy(weights), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    _tick_labels(ax, labels, "x", 64)
    _tick_labels(ax, labels, "y", 64)
    ax.set_title(f"layer {layer}, head {head}: attention (rows attend to columns)", fontsize=9)
    if layer_routing is not None:
        idx, w = layer_routing[0][0], layer_routing[1][0]  # [S, k]
        chosen = np.zeros((cfg.n_routed_experts, len(ids)))
        for t in range(len(ids)):
            for e, weight in zip(idx[t].tolist(), w[t].tolist()):
                chosen[e, t] = weight
        ax = axes[1, 0]
        ax.imshow(chosen, cmap="Greys", aspect="auto", interpolation="nearest")
        ax.set_yticks(range(cfg.n_routed_experts))
        ax.set_ylabel("expert", fontsize=8)
        _tick_labels(ax, labels, "x", 64)
        ax.set_title(f"layer {layer}: routed experts per token (shade = gate weight)", fontsize=9)
    fig.tight_layout()
    return fig


def attention_explorer(model, tokenizer, text: str = "def add(a, b):\n    return a + b\n", *,
                       layer: int = 0, head: int = 0, max_tokens: int = 48):
    """An ipywidgets explorer: a text box, layer and head sliders and the picture of
    `explorer_figure`, redrawn on every change. Building it needs no front end (it draws into an
    `ipywidgets.Image`); without ipywidgets installed it returns `explorer_figure(...)`."""
    try:
        import ipywidgets as widgets
    except ImportError:
        return explorer_figure(model, tokenizer, text, layer, head, max_tokens)

    cfg = model.config
    text_box = widgets.Textarea(value=text, description="text", layout=widgets.Layout(width="95%", height="70px"))
    layer_slider = widgets.IntSlider(value=layer, min=0, max=cfg.num_hidden_layers - 1, description="layer")
    head_slider = widgets.IntSlider(value=head, min=0, max=cfg.num_attention_heads - 1, description="head")
    image = widgets.Image(format="png")
    status = widgets.HTML()

    def redraw(_change=None):
        try:
            fig = explorer_figure(model, tokenizer, text_box.value, layer_slider.value, head_slider.value, max_tokens)
        except ValueError as error:  # e.g. text that is too long or empty: say so in the panel
            status.value = f"<b>{error}</b>"
            return
        image.value = _figure_png(fig)
        n = min(len(tokenizer.encode(text_box.value)), max_tokens)
        status.value = f"{n} tokens (at most {max_tokens} shown)"

    for control in (text_box, layer_slider, head_slider):
        control.observe(redraw, names="value")
    redraw()
    box = widgets.VBox([text_box, widgets.HBox([layer_slider, head_slider]), status, image])
    box.redraw = redraw  # for tests and for callers that change the model
    return box
