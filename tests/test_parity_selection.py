"""Parity of an agent step that selects by score (`AgentSpec.selection`): selections compared
per row and iteration; a near-tie (other indices, scores that agree rank by rank) is accepted
and reported, that row's outputs are not compared; scores that disagree fail at the first
iteration where they do. In the report, its JSON and its table."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from rich.console import Console  # noqa: E402

from worldflux_registry import (  # noqa: E402
    AgentSpec,
    Capability,
    IOContract,
    State,
    TensorSpec,
    WorldModel,
    parity,
)
from worldflux_registry.parity import ParityReport  # noqa: E402

ITERS, K, N = 3, 4, 10
CONTRACT = IOContract(
    observations=(TensorSpec("vector", "float32", ("batch", 4)),),
    state=(TensorSpec("latent", "float32", ("batch", 4)),),
    predictions=(),
    agent=AgentSpec(
        graph="plan",
        action="act",
        outputs=(
            TensorSpec("act", "float32", ("batch", 2)),
            TensorSpec("idx", "int64", ("batch", ITERS, K), kind="discrete", classes=N),
            TensorSpec("score", "float32", ("batch", ITERS, K), tolerance=(1e-4, 1e-4)),
        ),
        selection=("idx", "score"),
    ),
)


class Selector(WorldModel):
    """Scores ``N`` candidates per iteration from the latent and keeps the top ``K``.

    ``fault`` changes what the candidate computes: ``"swap"`` exchanges two tied elites at
    ``iteration`` in row ``row`` (the action follows the swapped order), ``"shift"`` moves that
    iteration's scores by 0.1 (a wrong graph).
    """

    capabilities = frozenset({Capability.ENCODE, Capability.PLAN})

    def __init__(self, fault: str = "none", row: int = 0, iteration: int = 2) -> None:
        super().__init__()
        self.fault, self.row, self.iteration = fault, row, iteration
        self.w = torch.nn.Parameter(torch.linspace(-1, 1, 4 * N).reshape(4, N))

    def io_contract(self) -> IOContract:
        return CONTRACT

    def encode(self, obs, deterministic=False):
        tensors, _ = self.observations(obs)
        return State({"latent": torch.tanh(tensors["vector"])})

    def transition(self, state, action=None, conditions=None, deterministic=False):
        return State({"latent": state["latent"] * 0.5})

    def plan_step(self, state, action=None, conditions=None, deterministic=False):
        z = state["latent"]
        idxs, scores = [], []
        for i in range(ITERS):
            value = (z * (i + 1)) @ self.w
            # Candidates 0 and 1 tie exactly, always among the elites.
            value[:, 1] = value[:, 0] = value.max(-1).values + 1.0
            top = torch.sort(value, dim=-1, descending=True, stable=True).indices[:, :K]
            score = torch.gather(value, 1, top)
            if self.fault == "swap" and i == self.iteration - 1:
                top[self.row, [0, 1]] = top[self.row, [1, 0]]
            if self.fault == "shift" and i == self.iteration - 1:
                score = score + 0.1
            idxs.append(top)
            scores.append(score)
        idx = torch.stack(idxs, 1)
        first = idx[:, -1, :1].float()
        return State(
            {
                **state.tensors,
                "act": torch.cat([first, -first], -1),
                "idx": idx,
                "score": torch.stack(scores, 1),
            }
        )

    def loss(self, batch):  # pragma: no cover - not trained
        raise NotImplementedError


def _check(candidate, batch_sizes=(1, 3)):
    return parity.check(Selector(), candidate, batch_sizes=batch_sizes, modes=("step",))


def test_identical_selections_agree_at_every_iteration():
    report = _check(Selector())
    assert report.passed
    assert [(c.batch, c.agreed, c.near_ties, c.failures) for c in report.selections] == [
        (1, 1, [], []),
        (3, 3, [], []),
    ]


def test_a_near_tie_is_accepted_reported_and_its_row_left_out():
    # At the last iteration: the swapped elites change the action too.
    report = _check(Selector("swap", row=0, iteration=3))
    assert report.passed, report.failing_outputs()
    for sel in report.selections:
        assert sel.passed and sel.agreed == sel.batch - 1
        assert [(t["row"], t["iteration"]) for t in sel.near_ties] == [(0, 3)]
        assert sel.near_ties[0]["score_diff"] == 0.0
        assert sel.first_failing_iteration is None
    # The JSON keeps it, and reads back.
    data = json.loads(report.to_json())
    assert data["selections"][0]["near_ties"][0]["iteration"] == 3
    again = ParityReport.from_json(report.to_json())
    assert again.selections == report.selections
    console = Console(record=True, width=200)
    report.print(console)
    assert "near-tie at iteration 3" in " ".join(console.export_text().split())


def test_a_swap_the_scores_do_not_excuse_fails_at_its_iteration():
    # Without the tie criterion the swapped action alone would fail; with shifted scores
    # nothing excuses it.
    report = _check(Selector("shift", row=0, iteration=2))
    assert not report.passed
    assert "plan/out.score" in report.failing_outputs()
    for sel in report.selections:
        assert not sel.passed and sel.first_failing_iteration == 2 and not sel.near_ties
        assert {f["row"] for f in sel.failures} == set(range(sel.batch))
    console = Console(record=True, width=200)
    report.print(console)
    assert "FAIL from iteration 2" in " ".join(console.export_text().split())


def test_only_the_tied_row_is_left_out():
    # Row 1 of 3 swaps; rows 0 and 2 are compared, and they agree.
    report = _check(Selector("swap", row=1, iteration=2), batch_sizes=(3,))
    assert report.passed
    (sel,) = report.selections
    assert sel.agreed == 2 and [t["row"] for t in sel.near_ties] == [1]
