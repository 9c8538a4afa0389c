"""Every registered family and preset keeps its declared contract.

Parametrised over the live registry (first-party, fixture and any installed third-party
families alike), so a new family is tested without being named here. Presets up to
``SMALL_PARAMS`` parameters are built for real on CPU and run; larger ones are built on the meta
device, where shapes and dtypes are still checked without allocating weights (a family whose
steps cannot run on meta is skipped for that check, with the reason).
"""

from __future__ import annotations

import functools

import pytest

torch = pytest.importorskip("torch")

from worldflux_registry import registry  # noqa: E402
from worldflux_registry.contract._io import Capability, IOContract  # noqa: E402
from worldflux_registry.errors import CapabilityError  # noqa: E402
from worldflux_registry.protocol._inputs import (  # noqa: E402
    encode_input,
    make_actions,
    make_conditions,
    make_noise,
    make_observations,
    noise_conditions,
)
from worldflux_registry.protocol._payloads import tensor_problems  # noqa: E402
from worldflux_registry.state._state import State  # noqa: E402

#: Presets with at most this many parameters are built with real weights and run on CPU.
SMALL_PARAMS = 5_000_000
BATCH = 3


def family_presets(source=registry) -> list:
    """``pytest.param(family, preset)`` for every preset of every family ``source`` lists."""
    cases = []
    for name in source.list():
        spec = source.get(name)
        for preset in spec.presets:
            cases.append(pytest.param((name, preset), id=f"{name}:{preset}"))
    return cases


class Case:
    """One family preset; the model is built on first use (real if small, else on meta)."""

    def __init__(self, family: str, preset: str, source=registry) -> None:
        self.family, self.preset, self.source = family, preset, source
        self.spec = source.get(family)
        self.config = self.spec.config(preset)
        self.contract = self.spec.contract_for(self.config)

    @functools.cached_property
    def _built(self):
        spec, config = self.spec, self.config
        size = spec.param_count(config) if spec.param_count is not None else None
        if size is None:
            with torch.device("meta"):
                size = trainable(self.source.build(spec, config, preset=self.preset))
        torch.manual_seed(0)
        if size <= SMALL_PARAMS:
            return self.source.build(spec, config, preset=self.preset), False
        with torch.device("meta"):
            return self.source.build(spec, config, preset=self.preset), True

    @property
    def model(self):
        return self._built[0]

    @property
    def on_meta(self) -> bool:
        return self._built[1]

    def small_model(self):
        """The real model, or skip when the preset is only checked on meta."""
        if self.on_meta:
            pytest.skip(
                f"{self.family}:{self.preset} is above {SMALL_PARAMS:,} parameters: "
                "checked on meta only"
            )
        return self.model


# Module scope groups the tests by preset, so each model is built once.
@pytest.fixture(scope="module", params=family_presets())
def case(request) -> Case:
    return Case(*request.param)


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_tensors(where: str, given: dict, specs, batch: int = BATCH) -> list[str]:
    """Problems of ``given`` against ``specs``: key set, dtypes, shapes with ``batch`` bound."""
    declared = [s.name for s in specs]
    problems = []
    missing = [k for k in declared if k not in given]
    extra = [k for k in given if k not in declared]
    if missing:
        problems.append(f"{where} lacks declared keys {missing}")
    if extra:
        problems.append(f"{where} has undeclared keys {extra}")
    for spec in specs:
        if spec.name in given:
            dims = {"batch": batch}
            problems += tensor_problems(f"{where} {spec.name!r}", given[spec.name], spec, dims)
    return problems


class Steps:
    """Seeded example inputs for one contract and the steps run on them."""

    def __init__(self, model, contract: IOContract, device, seed: int = 0) -> None:
        self.model, self.contract, self.device = model, contract, device
        gen = torch.Generator().manual_seed(seed)
        self.obs = make_observations(contract, (BATCH,), gen, device)
        self.next_obs = make_observations(contract, (BATCH,), gen, device)
        self.action = make_actions(contract, (BATCH,), gen, device)
        self.noise = {
            g: make_noise(contract, g, (BATCH,), gen, device)
            for g in ("encode", "transition", "update", "decode")
        }
        # Side conditions (a multi-task model's task ids) go with every call, noise or not.
        self.conds = make_conditions(contract, (BATCH,), gen, device)

    def conditions(self, graph: str, deterministic: bool = False):
        noise = {} if deterministic else self.noise[graph]
        return noise_conditions(noise, self.conds) if noise or self.conds else None

    def encode(self, deterministic: bool = False) -> State:
        noise = {} if deterministic else self.noise["encode"]
        return self.model.encode(encode_input(self.obs, noise, self.conds), deterministic)

    def transition(self, state: State, deterministic: bool = False) -> State:
        cond = self.conditions("transition", deterministic)
        return self.model.transition(state, self.action, cond, deterministic)

    def update(self, state: State, deterministic: bool = False) -> State:
        cond = self.conditions("update", deterministic)
        return self.model.update(state, self.action, self.next_obs, cond, deterministic)

    def decode(self, state: State):
        return self.model.decode(state, self.conditions("decode"))


def run_steps(model, contract: IOContract, device) -> dict[str, dict]:
    """Outputs of encode, transition, (update,) decode on seeded inputs, keyed by step."""
    steps = Steps(model, contract, device)
    out = {}
    with torch.no_grad():
        out["encode"] = steps.encode().tensors
        state = State(dict(out["encode"]))
        out["transition"] = steps.transition(state).tensors
        if model.supports(Capability.UPDATE):
            out["update"] = steps.update(state).tensors
        out["decode"] = steps.decode(State(dict(out["transition"]))).predictions
    return out


def assert_outputs_follow_contract(model, contract: IOContract, device) -> None:
    outputs = run_steps(model, contract, device)
    problems = []
    for step in ("encode", "transition", "update"):
        if step in outputs:
            problems += check_tensors(f"{step}() state", outputs[step], contract.state)
    problems += check_tensors("decode() predictions", outputs["decode"], contract.predictions)
    assert not problems, "\n".join(problems)


# -- the tests ----------------------------------------------------------------------------------
def test_registry_lists_families():
    assert family_presets(), "no family is registered: the conformance matrix is empty"


def test_spec_contract_is_valid_and_round_trips(case):
    contract = case.contract
    assert IOContract.from_dict(contract.to_dict()) == contract
    assert contract.fingerprint() == case.spec.contract_for(dict(case.config)).fingerprint()


def test_model_declares_what_its_spec_declares(case):
    spec, model = case.spec, case.model
    assert model.family == spec.name
    assert type(model).capabilities == spec.capabilities
    assert model.io_contract() == case.contract
    assert model.contract_fingerprint() == case.contract.fingerprint()
    if spec.param_count is not None:
        assert spec.param_count(case.config) == trainable(model)


def test_outputs_have_the_declared_keys_shapes_and_dtypes(case):
    model, contract = case.model, case.contract
    if not case.on_meta:
        assert_outputs_follow_contract(model, contract, "cpu")
        return
    try:
        outputs = run_steps(model, contract, "meta")
    except (NotImplementedError, RuntimeError) as exc:
        pytest.skip(
            f"{case.family}:{case.preset} is checked on meta and a step cannot run there: {exc}"
        )
    problems = []
    for step in ("encode", "transition", "update"):
        if step in outputs:
            problems += check_tensors(f"{step}() state", outputs[step], contract.state)
    problems += check_tensors("decode() predictions", outputs["decode"], contract.predictions)
    assert not problems, "\n".join(problems)


def _same(a: dict, b: dict) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_outputs_are_finite(case):
    model = case.small_model()
    outputs = run_steps(model, case.contract, "cpu")
    bad = [
        f"{step}:{key}"
        for step, tensors in outputs.items()
        for key, value in tensors.items()
        if value.is_floating_point() and not torch.isfinite(value).all()
    ]
    assert not bad, f"non-finite outputs: {bad}"


def test_deterministic_steps_and_given_noise_are_reproducible(case):
    model = case.small_model()
    steps = Steps(model, case.contract, "cpu")
    with torch.no_grad():
        for deterministic in (True, False):
            runs = []
            for seed in (1, 2):
                # The global generator differs between runs: only declared noise may vary output.
                torch.manual_seed(seed)
                enc = steps.encode(deterministic)
                out = {f"encode.{k}": v for k, v in enc.tensors.items()}
                tr = steps.transition(enc, deterministic)
                out |= {f"transition.{k}": v for k, v in tr.tensors.items()}
                if model.supports(Capability.UPDATE):
                    up = steps.update(enc, deterministic)
                    out |= {f"update.{k}": v for k, v in up.tensors.items()}
                out |= {f"decode.{k}": v for k, v in steps.decode(tr).predictions.items()}
                runs.append(out)
            differ = _same(*runs)
            mode = "deterministic=True" if deterministic else "explicit noise inputs"
            assert not differ, f"with {mode}, these outputs changed between calls: {differ}"


def test_update_is_available_exactly_when_declared(case):
    model = case.small_model()
    steps = Steps(model, case.contract, "cpu")
    with torch.no_grad():
        state = steps.encode(deterministic=True)
        if Capability.UPDATE in case.spec.capabilities:
            steps.update(state, deterministic=True)
        else:
            with pytest.raises(CapabilityError):
                steps.update(state, deterministic=True)


def test_rollout_returns_one_state_per_action(case):
    model = case.small_model()
    if Capability.ROLLOUT not in case.spec.capabilities:
        pytest.skip(f"{case.family} does not declare rollout")
    gen = torch.Generator().manual_seed(0)
    horizon = 4
    actions = make_actions(case.contract, (horizon, BATCH), gen)
    with torch.no_grad():
        steps = Steps(model, case.contract, "cpu")
        state = steps.encode(deterministic=True)
        traj = model.rollout(state, actions, steps.conditions("transition", True), True)
    assert len(traj.states) == horizon + 1
    for key, value in traj.predictions.items():
        assert tuple(value.shape[:2]) == (horizon, BATCH), key
    if traj.rewards is not None:
        assert tuple(traj.rewards.shape[:2]) == (horizon, BATCH)


def test_the_checker_reports_wrong_keys_shapes_and_dtypes():
    from worldflux_registry.contract._io import TensorSpec

    specs = (
        TensorSpec("latent", "float32", ("batch", 4)),
        TensorSpec("reward", "float32", ("batch",)),
    )
    good = {"latent": torch.zeros(BATCH, 4), "reward": torch.zeros(BATCH)}
    assert check_tensors("state", good, specs) == []
    bad = {"latent": torch.zeros(BATCH, 5, dtype=torch.float64), "extra": torch.zeros(BATCH)}
    problems = " | ".join(check_tensors("state", bad, specs))
    for needle in ("lacks declared keys ['reward']", "undeclared keys ['extra']", "float64", "5"):
        assert needle in problems, problems
    assert check_tensors("state", {**good, "reward": torch.zeros(BATCH + 1)}, specs)
