"""A criterion that does not fit the model's outputs and the data's targets: one `CriterionError`
(a `PlanningError`; in the torch-only attributions package a `CriterionMismatchError`, a
`ValueError`) naming the criterion, the shapes and the criterion's own message; token targets with
cross_entropy point to the causal_lm criterion."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import pruneplan as pp
from pruneplan import loading
from pruneplan.attributions import CriterionMismatchError, TaylorAttributionMetric

IDS = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))


def lm() -> nn.Sequential:
    """Token ids (N, T) -> logits (N, T, 96)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(96, 8), nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 96)).eval()


def token_message(cause: BaseException) -> str:
    # outputs (4, 16, 96) with targets (4, 16): F.cross_entropy reads axis 1 (16) as the classes
    # and asks for targets (4, 96); the message says so and names the causal_lm criterion
    assert isinstance(cause, RuntimeError) and str(cause) == "Expected target size [4, 96], got [4, 16]"
    return ("criterion 'cross_entropy' needs outputs [N, classes] and targets [N] (here N = 4); the model "
            "gives outputs [4, 16, 96] and the data int64 targets [4, 16], one per token (cross_entropy "
            "would read axis 1, of size 16, as the classes: RuntimeError: Expected target size [4, 96], "
            "got [4, 16]); for next-token targets use the causal_lm criterion")


def test_seed_api_cross_entropy_with_token_targets() -> None:
    metric = TaylorAttributionMetric(lm(), [(IDS, IDS)], F.cross_entropy, "cpu")
    with pytest.raises(CriterionMismatchError) as err:
        metric.run("1")
    assert isinstance(err.value, ValueError)
    assert str(err.value) == token_message(err.value.__cause__)
    # the library's planning: the same message as a PlanningError
    with pytest.raises(pp.CriterionError) as err2:
        pp.plan_from_metric(lm(), IDS, "taylor", 0.25, data=[(IDS, IDS)], criterion="cross_entropy")
    assert isinstance(err2.value, pp.PlanningError)
    assert str(err2.value) == token_message(err2.value.__cause__)


def test_another_criterion_failure_names_the_criterion_and_shapes() -> None:
    def my_loss(output: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        raise ValueError("boom\nsecond line")

    with pytest.raises(CriterionMismatchError) as err:
        TaylorAttributionMetric(lm(), [(IDS, IDS)], my_loss, "cpu").run("1")
    assert str(err.value) == ("criterion 'my_loss' does not fit the model's outputs (float32 [4, 16, 96]) "
                              "and the targets (int64 [4, 16]): ValueError: boom; second line")


def test_hugging_face_outputs_are_checked_by_their_logits() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                   max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    data = [(IDS, IDS)]
    with pytest.raises(pp.CriterionError) as err:  # the library, while scoring
        pp.plan_from_metric(model, IDS, "taylor", 0.25, data=data, criterion="cross_entropy")
    assert str(err.value) == token_message(err.value.__cause__)
    with pytest.raises(pp.CriterionError) as err:  # the CLI's check before scoring
        loading.check_criterion(model, data[0], "cross_entropy")
    assert str(err.value) == token_message(err.value.__cause__)
    # the criterion the message names fits: a plan
    loading.check_criterion(model, data[0], "causal_lm")
    plan = pp.plan_from_metric(model, IDS, "taylor", 0.25, data=data, criterion="causal_lm")
    assert sum(len(g.removed) for g in plan.groups) > 0
