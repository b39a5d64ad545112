"""DeepSeek-V3 multi-token prediction (deepseek_mini.mtp) and its checkpoint names (hf.py).

References: transformers' own `MtpModel` (depth 1, loaded by transformers from a checkpoint we
wrote), a step-by-step re-derivation of every depth's loss from the report's equations, the causal
property position by position, and gradient flow."""

import json
import math

import pytest
import torch

from deepseek_mini.hf import load_pretrained, save_pretrained
from deepseek_mini.model import Block, DeepseekConfig, DeepseekModel
from deepseek_mini.mtp import forward_with_hidden, loss_with_mtp, mtp_logits, mtp_loss_fn, mtp_losses

TINY = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, kv_lora_rank=16, q_lora_rank=24,
            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, intermediate_size=40, moe_intermediate_size=12,
            n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, max_position_embeddings=64)


def random_model(depth=2, seed=0, **changes):
    """A model with MTP whose every weight is random (norm weights in [0.5, 1.5]), so that a mixed-up
    tensor (the halves of eh_proj, enorm vs hnorm, the head's norm) changes the outputs."""
    torch.manual_seed(seed)
    model = DeepseekModel(DeepseekConfig(**{**TINY, "num_nextn_predict_layers": depth, **changes}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    return model.eval()


def test_modules_and_names_follow_the_release():
    model = random_model(depth=2, first_k_dense_replace=5)  # MTP blocks are MoE whatever first_k_dense_replace says
    assert [m.layer_idx for m in model.mtp.layers] == [2, 3]
    module = model.mtp.layers[0]
    assert module.eh_proj.weight.shape == (32, 64)
    assert type(module.mlp).__name__ == "MoE" and type(model.layers[1].mlp).__name__ == "MLP"
    names = {k.split(".", 3)[3] for k in model.state_dict() if k.startswith("mtp.layers.0.")}
    assert {"enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
            "input_layernorm.weight", "self_attn.q_a_proj.weight"} <= names
    # the embedding and the output head are the main model's (no copies)
    assert not any("embed_tokens" in k or "head.weight" in k for k in names)
    assert not hasattr(DeepseekModel(DeepseekConfig(**TINY)), "mtp")


def test_depth_one_matches_transformers_mtp_model(tmp_path):
    """Our checkpoint, loaded by transformers (DeepseekV3ForCausalLM + its MtpModel, which reads the
    MTP layer by its release names): the same main logits and the same MTP logits."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_layers import MtpModel

    model = random_model(depth=1)
    save_pretrained(model, tmp_path)
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    # MtpModel finds the MTP layer through this pattern (written for V3's 61 layers; ours has 2)
    hf._keys_to_ignore_on_load_unexpected = [r"model\.layers\.2\..*"]
    reference = MtpModel.from_pretrained(hf).eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 15), generator=torch.Generator().manual_seed(1))
    S = ids.shape[1]
    with torch.no_grad():
        out, hidden = forward_with_hidden(model, ids)
        torch.testing.assert_close(out, hf(ids).logits, atol=1e-5, rtol=0)
        ours = mtp_logits(model, hidden, ids)[0]
        # transformers' MtpModel: the main hidden states at positions 0..S-2 with tokens 1..S-1
        h = reference.forward_layer(0, hidden[:, :-1], torch.arange(1, S)[None].expand(2, -1), None,
                                    input_ids=ids[:, 1:])
        theirs = reference._project_to_logits(h)
    assert ours.shape == theirs.shape == (2, S - 1, TINY["vocab_size"])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def test_every_depth_against_a_step_by_step_rederivation():
    """The report's equations written out (float64): the eh_proj halves applied separately, the
    shifts by explicit indices, the loss token by token with ignored labels."""
    model = random_model(depth=3, seed=2, rms_norm_eps=0.05).double()
    D, S, V, eps = 3, 11, TINY["vocab_size"], 0.05
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (2, S), generator=g)
    labels = ids.clone()
    labels[0, 5] = labels[1, 9] = labels[1, 3] = -100
    with torch.no_grad():
        out, h0 = forward_with_hidden(model, ids, labels=labels)
        losses = mtp_losses(model, h0, ids, labels)
        total = loss_with_mtp(model, ids, labels, weight=0.7)
        emb, head = model.embed_tokens.weight, model.lm_head.weight
        h, want = h0, []
        for k in range(1, D + 1):
            m = model.mtp.layers[k - 1]
            W = m.eh_proj.weight
            T = S - k  # positions i = 0 .. S-k-1 combine h_i^{k-1} with Emb(t_{i+k})
            e = emb[ids[:, k:k + T]]
            x = _rms(e, m.enorm.weight, eps) @ W[:, :32].T + _rms(h[:, :T], m.hnorm.weight, eps) @ W[:, 32:].T
            h = Block.forward(m, x, model.rope_cos[k:S].double(), model.rope_sin[k:S].double())[0]  # [1]: aux loss
            logp = (_rms(h, m.shared_head.norm.weight, eps) @ head.T).log_softmax(-1)
            nll = [-logp[b, i, labels[b, i + k + 1]] for b in range(2) for i in range(T - 1) if labels[b, i + k + 1] != -100]
            want.append(torch.stack(nll).mean())
    assert len(losses) == D
    for k in range(D):
        torch.testing.assert_close(losses[k], want[k], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(total.loss, out.loss + 0.7 / D * sum(want), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(total.main_loss, out.loss)
    assert all(abs(l.item() - math.log(V)) > 0.05 for l in losses), "random weights: the losses are not uniform guesses"


def test_predictions_never_see_their_target_or_later_tokens():
    """Depth k at position i predicts t_{i+k+1} from t_0 .. t_{i+k}: changing t_j leaves every
    prediction with i + k < j unchanged, and changes the one that embeds it (i = j - k)."""
    model = random_model(depth=2, seed=4).double()  # float64: unchanged means equal to 1e-12
    S, V = 9, TINY["vocab_size"]
    ids = torch.randint(0, V, (1, S), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        base = mtp_logits(model, forward_with_hidden(model, ids)[1], ids)
        for j in range(S):
            changed = ids.clone()
            changed[0, j] = (changed[0, j] + 17) % V
            logits = mtp_logits(model, forward_with_hidden(model, changed)[1], changed)
            for k, (a, b) in enumerate(zip(base, logits), start=1):
                seen = j - k  # the first position whose inputs include t_j
                if seen > 0:
                    torch.testing.assert_close(a[0, :seen], b[0, :seen], atol=1e-12, rtol=0)
                if 0 <= seen < a.shape[1]:
                    assert (a[0, seen] - b[0, seen]).abs().max() > 1e-4, f"depth {k} ignores t_{j} at position {seen}"


def test_the_mtp_loss_trains_the_main_model_and_every_mtp_weight():
    model = random_model(depth=2, seed=6).train()
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(7))
    _, hidden = forward_with_hidden(model, ids)
    torch.stack(mtp_losses(model, hidden, ids)).sum().backward()
    for name, p in model.named_parameters():
        if ".experts." in name:  # routed experts get gradient only where tokens went
            continue
        if name.startswith("mtp.") or name.startswith(("layers.", "embed_tokens", "lm_head")):
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient from the MTP loss in {name}"
    assert model.norm.weight.grad is None, "the main model's final norm is not on the MTP path"


def test_trainer_loss_fn_lowers_both_losses():
    from deepseek_mini.train import Trainer, TrainConfig

    torch.manual_seed(8)
    model = DeepseekModel(DeepseekConfig(**{**TINY, "num_nextn_predict_layers": 1}))
    ids = torch.randint(0, 16, (4, 16), generator=torch.Generator().manual_seed(9)).repeat(1, 2)  # a repeated pattern
    batch = {"input_ids": ids, "labels": ids}
    before = loss_with_mtp(model, ids)
    Trainer(model, TrainConfig(max_steps=30, lr=3e-3, warmup_steps=0, progress=False), lambda i: batch,
            loss_fn=mtp_loss_fn(0.3)).fit()
    after = loss_with_mtp(model, ids)
    assert after.main_loss < before.main_loss - 1 and after.mtp_losses[0] < before.mtp_losses[0] - 1


def test_errors_name_the_problem():
    plain = DeepseekModel(DeepseekConfig(**TINY))
    ids = torch.randint(0, 96, (1, 6))
    with pytest.raises(ValueError, match="no MTP modules"):
        loss_with_mtp(plain, ids)
    model = random_model(depth=3)
    with pytest.raises(ValueError, match="depth 3 needs sequences of at least 5 tokens, got 4"):
        loss_with_mtp(model, ids[:, :4])
    with pytest.raises(ValueError, match="labels must have the shape"):
        loss_with_mtp(model, ids, ids[:, :5])
    with pytest.raises(ValueError, match="weight"):
        loss_with_mtp(model, ids, weight=-0.1)
    with pytest.raises(ValueError, match="num_nextn_predict_layers=-1"):
        DeepseekConfig(num_nextn_predict_layers=-1)


def test_checkpoint_round_trip_with_mtp_layers(tmp_path):
    model = random_model(depth=2, seed=10)
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 2 and config["num_hidden_layers"] == 2
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "model.safetensors")
    for layer in (2, 3):  # as DeepSeek's release: the MTP layers after the last block, with the shared copies
        for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                     "embed_tokens.weight", "shared_head.head.weight", "self_attn.o_proj.weight",
                     "mlp.experts.7.up_proj.weight"):
            assert f"model.layers.{layer}.{name}" in tensors
    assert torch.equal(tensors["model.layers.3.shared_head.head.weight"], model.lm_head.weight.detach())

    again = load_pretrained(tmp_path, mtp=True)
    assert list(again.state_dict()) == list(model.state_dict())
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        for a, b in zip(loss_with_mtp(model, ids).mtp_losses, loss_with_mtp(again, ids).mtp_losses):
            assert torch.equal(a, b)

    # without mtp=True: today's behaviour (the main model only), and a warning that says so
    with pytest.warns(UserWarning, match=r"skipped the multi-token-prediction layer\(s\) \[2, 3\]"):
        main_only = load_pretrained(tmp_path)
    assert not hasattr(main_only, "mtp") and main_only.config.num_nextn_predict_layers == 0
    with torch.no_grad():
        assert torch.equal(main_only(ids), model(ids))


def test_tied_embeddings_and_checkpoint_errors(tmp_path):
    model = random_model(depth=1, seed=11, tie_word_embeddings=True)
    save_pretrained(model, tmp_path / "tied")
    again = load_pretrained(tmp_path / "tied", mtp=True)
    assert again.lm_head.weight is again.embed_tokens.weight
    ids = torch.randint(0, 96, (2, 8))
    with torch.no_grad():
        assert torch.equal(loss_with_mtp(model, ids).loss, loss_with_mtp(again, ids).loss)

    from safetensors.torch import load_file, save_file

    save_pretrained(random_model(depth=1, seed=12), tmp_path / "copy")
    tensors = load_file(tmp_path / "copy" / "model.safetensors")
    tensors["model.layers.2.embed_tokens.weight"] = tensors["model.layers.2.embed_tokens.weight"] + 1
    save_file(tensors, tmp_path / "copy" / "model.safetensors")
    with pytest.raises(ValueError, match=r"MTP tensor 'layers.2.embed_tokens.weight' differs from the main model's"):
        load_pretrained(tmp_path / "copy", mtp=True)
    tensors["model.layers.2.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    del tensors["model.layers.2.eh_proj.weight"]
    save_file(tensors, tmp_path / "copy" / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \['mtp.layers.0.eh_proj.weight'\]"):
        load_pretrained(tmp_path / "copy", mtp=True)

    save_pretrained(DeepseekModel(DeepseekConfig(**TINY)), tmp_path / "plain")
    with pytest.raises(ValueError, match="declares no multi-token-prediction layers"):
        load_pretrained(tmp_path / "plain", mtp=True)
    v2 = DeepseekConfig(**{**TINY, "num_nextn_predict_layers": 1, "scoring_func": "softmax", "topk_method": "greedy",
                           "norm_topk_prob": False})
    with pytest.raises(ValueError, match="multi-token prediction is a DeepSeek-V3 feature"):
        save_pretrained(DeepseekModel(v2), tmp_path / "v2")
