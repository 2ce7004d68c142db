"""Scoring and selecting on transformers: token-sequence units, the causal-LM criterion, head
groups scored from their query projection, activation magnitude, per-kind ratios, equal counts."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import pruneplan as pp
from pruneplan.attributions import (
    ActivationMagnitudeAttributionMetric,
    RandomAttributionMetric,
    SensitivityAttributionMetric,
    ShapleyAttributionMetric,
    TaylorAttributionMetric,
    WeightNormAttributionMetric,
    causal_lm_loss,
)
from pruneplan.graph.spec import Group as GroupSpec
from pruneplan.graph.spec import SliceSpec
from pruneplan.loading import score_groups

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

V = 128


def llama():
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=V)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(2):
        x = torch.randint(0, V, (3, 6), generator=g)
        out.append((x, x))
    return out


def test_causal_lm_loss_equals_the_models_own_loss_per_example() -> None:
    model = llama()
    (x, _), _ = batches()
    with torch.no_grad():
        per = causal_lm_loss(model(x), x, reduction="none")
        # independent reference: transformers' loss with labels, one example at a time
        expected = torch.stack([model(x[i:i + 1], labels=x[i:i + 1]).loss for i in range(3)])
    torch.testing.assert_close(per, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(causal_lm_loss(model(x).logits, x), per.mean(), rtol=1e-5, atol=1e-6)
    masked = x.clone()
    masked[0, 3:] = -100  # ignored tokens do not count
    with torch.no_grad():
        torch.testing.assert_close(causal_lm_loss(model(x), masked, reduction="none")[0],
                                   model(x[:1], labels=masked[:1]).loss, rtol=1e-5, atol=1e-6)


def capture(model, name: str, x: torch.Tensor, grad: bool = False):
    """The output of module ``name`` (N, T, units) and, with grad, d(sum of per-example losses)/d it."""
    store = {}
    module = model.get_submodule(name)
    h = module.register_forward_hook(lambda m, i, o: store.setdefault("z", o))
    try:
        if grad:
            out = model(x)
            loss = causal_lm_loss(out, x, reduction="none").sum()
            (g,) = torch.autograd.grad(loss, store["z"])
            return store["z"].detach(), g
        with torch.no_grad():
            model(x)
        return store["z"], None
    finally:
        h.remove()


def test_metrics_score_the_features_of_a_linear_on_a_sequence() -> None:
    model = llama()
    data = batches()
    name = "model.layers.0.mlp.up_proj"
    zs = [capture(model, name, x, grad=True) for x, _ in data]
    # activation magnitude: mean |z| over the tokens of an example, then over the 6 examples
    act = ActivationMagnitudeAttributionMetric(model, data, causal_lm_loss, "cpu", progress=False).run(name)
    expected = torch.cat([z.abs().mean(1) for z, _ in zs]).mean(0).double().numpy()
    assert act.shape == (128,)
    np.testing.assert_allclose(act, expected, rtol=1e-5)
    # Taylor: |sum over tokens of -(dL/dz * z)| per example, each example's own loss
    taylor = TaylorAttributionMetric(model, data, causal_lm_loss, "cpu", progress=False).run(name)
    expected = torch.cat([(-(g * z)).sum(1).abs() for z, g in zs]).mean(0).double().numpy()
    np.testing.assert_allclose(taylor, expected, rtol=1e-4, atol=1e-9)
    sens = SensitivityAttributionMetric(model, data, causal_lm_loss, "cpu", progress=False).run(name)
    np.testing.assert_allclose(sens, torch.cat([g.abs().sum(1) for _, g in zs]).mean(0).double().numpy(),
                               rtol=1e-4, atol=1e-9)
    # a plain criterion sees the logits of the ModelOutput
    import torch.nn.functional as F

    def token_ce(logits, target, reduction="mean"):
        return F.cross_entropy(logits.transpose(1, 2), target, reduction=reduction)

    assert TaylorAttributionMetric(model, data, token_ce, "cpu", progress=False).run(name).shape == (128,)
    assert RandomAttributionMetric(model, data, None, "cpu", seed=0).run(name).shape == (128,)
    shap = ShapleyAttributionMetric(model, data[:1], causal_lm_loss, "cpu", progress=False, sv_samples=2)
    assert shap.run("model.layers.1.mlp.down_proj").shape == (64,)


def test_head_groups_are_scored_by_aggregating_their_query_outputs() -> None:
    model = llama()
    a = "model.layers.0.self_attn"
    heads = GroupSpec(name=f"{a}.heads", size=4, roots=(f"{a}.q_proj",), kind="heads", blocks=2,
                      slices=(SliceSpec(f"{a}.q_proj.weight", 0, repeat=16), SliceSpec(f"{a}.o_proj.weight", 1, repeat=16)))
    scores = score_groups(model, [heads], "weight_norm")
    w = model.get_submodule(f"{a}.q_proj").weight.detach().double()
    # independent: L1 norm of each q row, then the mean over each head's 16 rows
    np.testing.assert_allclose(scores[f"{a}.q_proj"], w.abs().sum(1).reshape(4, 16).mean(1).numpy(), rtol=1e-12)
    # selection keeps grouped-query attention even: one head of each key/value head's pair goes
    s = scores[f"{a}.q_proj"]
    removed = pp.select_indices(scores, {"heads": 0.5}, groups=[heads])
    assert removed == {f"{a}.heads": [int(np.argmin(s[:2])), 2 + int(np.argmin(s[2:]))]}


def test_weight_norm_of_an_embedding_scores_its_features() -> None:
    model = llama()
    s = WeightNormAttributionMetric(model, [], None, "cpu").run("model.embed_tokens")
    np.testing.assert_allclose(s, model.model.embed_tokens.weight.detach().double().abs().sum(0).numpy())


def test_select_ratio_per_kind_and_equal_counts() -> None:
    groups = [SimpleNamespace(name="a", roots=("a",), kind="channels", size=4),
              SimpleNamespace(name="b", roots=("b",), kind="channels", size=4),
              SimpleNamespace(name="h", roots=("h",), kind="heads", size=4)]
    scores = {"a": [1.0, 2.0, 3.0, 4.0], "b": [10.0, 20.0, 30.0, 40.0], "h": [4.0, 3.0, 2.0, 1.0]}
    # per kind: channels lose 1 of 4, heads 2 of 4; a name wins over its kind
    assert pp.select_indices(scores, {"channels": 0.25, "heads": 0.5}, groups=groups) == {
        "a": [0], "b": [0], "h": [2, 3]}
    assert pp.select_indices(scores, {"channels": 0.25, "b": 0.5}, groups=groups) == {"a": [0], "b": [0, 1]}
    # global ranking without normalisation takes a's 3 units first (b keeps all); with equal
    # counts the set is ranked as one: step j takes the j-th lowest unit of a and of b (2 units),
    # so the 4 asked (0.5 of 8) are 2 steps, a's and b's two lowest (it used to take the
    # smaller count afterwards, min(3, 1) = 1 each: 2 of the 4 asked)
    two = {"a": scores["a"], "b": scores["b"]}
    assert pp.select_indices(two, 0.5, scope="global", normalize=None, groups=groups[:2]) == {"a": [0, 1, 2], "b": [0]}
    assert pp.select_indices(two, 0.5, scope="global", normalize=None, groups=groups[:2],
                             same_count=[["a", "b"]]) == {"a": [0, 1], "b": [0, 1]}
    # 0.375 of 8 = 3: one step (2 units) fits, a second (2 more) does not: passed over
    assert pp.select_indices(two, 0.375, scope="global", normalize=None, groups=groups[:2],
                             same_count=[["a", "b"]]) == {"a": [0], "b": [0]}
    with pytest.raises(pp.PlanningError, match="ratio given for 'mlp', which has no scores"):
        pp.select_indices(scores, {"mlp": 0.5}, groups=groups)


def test_plan_from_metric_on_a_causal_lm_keeps_the_config_expressible(tmp_path) -> None:
    model = llama()
    x = batches()[0][0]
    plan = pp.plan_from_metric(model, x, "taylor", 0.3, scope="global", data=batches(), criterion="causal_lm")
    mlp = [g for g in plan.groups if ".mlp." in g.name]
    assert len(mlp) == 2 and len({len(g.removed) for g in mlp}) == 1  # equal counts: one config value
    assert plan.config.problems() == []
    assert plan.provenance.metric_params == {"criterion": "causal_lm"}
    pp.apply_plan(model, plan)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
