"""TD-MPC2 against files written by the official code (``tests/data/official/tdmpc2``).

For every case (single-task, episodic, multitask) the official ``checkpoint.pt`` is imported and
every reference output the model exposes is reproduced: ``model/*`` (encode, next, reward, pi
with its recorded eps, each Q head online and target, Q min/avg with the recorded heads,
termination, the in-place renormalised task embedding), and ``loss/*`` and ``loss_nodrop/*``
(TD targets, latent rollout, Q logits with the recorded dropout keep-masks, reward logits,
termination logits, every loss term, the gradient norm, and the ``update_pi`` quantities after
the official Adam step). Float32 within 1e-5 relative to ``max(1, |ref|)`` (absolute below 1):
Q values, TD targets and losses reach a few hundred, where one float32 ulp is 3e-5, so an
absolute 1e-5 holds only where torch's CPU kernels sum in exactly the reference run's order
(AVX-512); AVX2 kernels land 1-4 ulp away. The ``update_pi`` quantities after the official
Adam step: the same bound on the reference kernels, 1e-3 on others (``tests/_kernels.py``).
Indices identical.

Left out, and why:

- ``pi.action_prob`` (the official constant 1.0) and the ``*.two_hot`` targets (inputs of the
  cross-entropies, whose results are checked).
- ``loss/returned/*`` duplicates the locals checked here (``.detach().mean()`` of them).
- Multitask ``update_pi`` quantities (``pi.scaled_entropy``, ``pi.entropy``, ``pi.action``,
  ``pi.q_avg``, ``pi_loss``) depend on the Adam-stepped task embedding, whose gradient the
  official vmap sums in another order (the reference README: <= 1.4e-6 relative); the same
  1e-5 relative bound covers them.
- ``pi_grad_norm``: the policy step itself (a separate official optimizer) is not part of the
  model; its loss is checked.

The planner outputs (``plan/*``) are checked in ``tests/test_tdmpc2_planner.py``.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")
pytest.importorskip("worldflux_tdmpc2")

from _kernels import SAME_KERNELS  # noqa: E402
from worldflux_tdmpc2.importer import SOURCE_FORMAT, import_checkpoint  # noqa: E402

from worldflux_registry import CheckpointError, ConfigError, registry  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "official" / "tdmpc2"
CASES = ("single-task", "episodic", "multitask")
#: What each case's task needs beyond the weights (the official env-derived settings).
CONFIG = {
    "single-task": {"episode_length": "500"},
    "episodic": {"episode_length": "1000", "discount_max": "0.99", "rho": "0.7"},
    "multitask": {"episode_lengths": "500,100,500"},
}
ATOL = 1e-5
#: After the official Adam step: its first update moves each weight by ``lr * sign(grad)``, so a
#: near-zero gradient summed in another order lands ``2 * lr = 6e-4`` away (`_kernels`).
AFTER_ADAM = ATOL if SAME_KERNELS else 1e-3


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load_case(case: str) -> dict:
    with np.load(DATA / case / "cases.npz", allow_pickle=False) as npz:
        return {k: torch.from_numpy(npz[k].copy()) for k in npz.files}


def imported(case: str, **extra: str):
    return import_checkpoint(DATA / case / "checkpoint.pt", {**CONFIG[case], **extra})


def close(got, ref, atol=ATOL):
    """Assert ``|got - ref| / max(1, |ref|) <= atol`` everywhere (absolute below 1)."""
    got = got.detach().to(torch.float32)
    ref = ref.to(torch.float32).reshape(got.shape)
    err = (got - ref).abs() / ref.abs().clamp(min=1.0)
    worst = float(err.max()) if err.numel() else 0.0
    assert worst <= atol, f"max error {worst:.3g} > {atol}"


# -- import -------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_import_accounts_for_every_source_tensor(case):
    imp = imported(case)
    keys = {
        row["key"]
        for row in json.loads((DATA / case / "config.json").read_text())["checkpoint"]["state_dict"]
    }
    assert set(imp.mapped) | set(imp.dropped) == keys
    assert not set(imp.mapped) & set(imp.dropped)
    assert imp.source_format == SOURCE_FORMAT == "tdmpc2-official-pt"
    assert imp.official_commit == "e9f5932"
    sha = json.loads((DATA / case / "config.json").read_text())["checkpoint"]["sha256"]
    assert imp.source_sha256 == "sha256:" + sha
    assert all(
        k.startswith("_detach_Qs_params")
        or "__" in k
        or k in ("log_std_min", "log_std_dif", "_action_masks")
        for k in imp.dropped
    )


@pytest.mark.parametrize("case", CASES)
def test_import_infers_the_official_config(case):
    imp = imported(case)
    official = json.loads((DATA / case / "config.json").read_text())
    model_cfg, cfg = official["model"], imp.model.config
    for key in ("latent_dim", "enc_dim", "mlp_dim", "num_enc_layers", "num_q", "num_bins"):
        assert imp.inferred[key] == model_cfg[key], key
    assert cfg["action_dim"] == model_cfg["action_dim"]
    assert cfg["obs_dim"] == model_cfg["obs_shape"]["state"][0]
    assert cfg["episodic"] == model_cfg["episodic"]
    assert cfg["log_std_min"] == model_cfg["log_std_min"]
    assert cfg["log_std_max"] == model_cfg["log_std_max"]
    if model_cfg["multitask"]:
        assert cfg["tasks"] == len(model_cfg["tasks"]) and cfg["task_dim"] == model_cfg["task_dim"]
        assert cfg["action_dims"] == model_cfg["action_dims"]
        assert imp.model.discount_table.tolist() == official["derived"]["discount"]
        masks = torch.tensor(official["derived"]["action_masks"])
        assert torch.equal(imp.model.action_masks, masks)
    else:
        assert imp.model.discounts == [pytest.approx(0.99, abs=1e-12)]
    expected_params = {"single-task": 1_214_651, "episodic": 1_412_156, "multitask": 1_427_675}
    trainable = sum(p.numel() for p in imp.model.parameters() if p.requires_grad)
    assert trainable == expected_params[case]


# -- model/* ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_model_outputs_match_the_official_ones(case):
    model = imported(case).model.eval()
    ref = load_case(case)
    task = ref.get("inputs/task")
    obs, action = ref["inputs/obs"], ref["inputs/action"]
    with torch.no_grad():
        z = model.encode_vector(obs, task)
        close(z, ref["model/encode.z"])
        nz = model.next(z, action, task)
        close(nz, ref["model/next.z"])
        close(model.reward(z, action, task), ref["model/reward.logits"])
        close(model.reward_value(z, action, task), ref["model/reward.value"])
        info = model.pi_info(z, task, eps=ref["model/pi.eps"])
        for key in ("action", "mean", "log_std", "entropy", "scaled_entropy"):
            close(info[key], ref[f"model/pi.{key}"])
        for net, target in (("online", False), ("target", True)):
            logits = model.q_logits(z, action, target, task)
            close(logits, ref[f"model/Q.all.{net}"])
            close(model._two_hot_inv(logits), ref[f"model/Q.all.{net}.decoded"])
            for kind in ("min", "avg"):
                heads = ref[f"model/Q.{kind}.{net}.qidx"]
                q = model.q_value(z, action, kind, target, task, heads=heads)
                close(q, ref[f"model/Q.{kind}.{net}"])
        if case == "episodic":
            logits = model.termination_logits(nz)
            close(logits, ref["model/termination.logits"])
            close(torch.sigmoid(logits), ref["model/termination.prob"])
            state = model.transition(model.encode(obs), action)
            close(model.decode(state).predictions["continue"], 1 - ref["model/termination.prob"])
        if case == "multitask":
            close(model.task_emb.weight, ref["model/task_emb.weight.after"])
            assert torch.equal(model.action_masks, ref["model/action_masks"])


def test_multitask_embedding_is_renormalised_in_place_on_first_lookup():
    model = imported("multitask").model
    before = model.task_emb.weight.detach().clone()
    norms = before.norm(dim=-1)
    assert norms[1] > 1 and (norms[[0, 2]] < 1).all()  # the reference's row 1 is too long
    ref = load_case("multitask")
    with torch.no_grad():
        model.task_embedding(torch.tensor([1]))
    after = model.task_emb.weight.detach()
    assert not torch.equal(after[1], before[1])
    torch.testing.assert_close(after, ref["model/task_emb.weight.after"], atol=0, rtol=0)
    assert torch.equal(after[[0, 2]], before[[0, 2]])


def test_target_q_never_drops_out_in_training_mode():
    model = imported("single-task", dropout="0.5").model.train()
    ref = load_case("single-task")
    z, a = ref["model/encode.z"], ref["inputs/action"]
    with torch.no_grad():
        close(model.q_logits(z, a, target=True), ref["model/Q.all.target"])
        assert not model.target_qs.training
        online = model.q_logits(z, a)
    assert (online - ref["model/Q.all.online"]).abs().max() > 1e-3  # online heads do drop out


# -- loss/* -------------------------------------------------------------------------------------
def _loss_batch(ref):
    obs, act = ref["loss/inputs/obs"], ref["loss/inputs/action"]
    rew, term = ref["loss/inputs/reward"][..., 0], ref["loss/inputs/terminated"][..., 0]
    b = obs.shape[1]
    # The registry layout: step t holds o_t, a_t, r_t and continue_t (the last a, r unused).
    batch = {
        "vector": obs.transpose(0, 1),
        "action": torch.cat([act, act[-1:]]).transpose(0, 1),
        "reward": torch.cat([rew, rew[-1:]]).transpose(0, 1),
        "continue": torch.cat([1 - term, torch.ones(1, b)]).transpose(0, 1),
    }
    if "loss/inputs/task" in ref:
        batch["task"] = ref["loss/inputs/task"]
    return batch


def _loss_noise(ref, section):
    draws = [ref[k] for k in sorted(k for k in ref if k.startswith(f"{section}/noise/"))]
    if section == "loss":
        names = ("td_pi_eps", "td_q_heads", "q_dropout", "pi_eps", "pi_q_dropout", "pi_q_heads")
    else:
        names = ("td_pi_eps", "td_q_heads", "pi_eps", "pi_q_heads")
    assert len(draws) == len(names)
    return dict(zip(names, draws, strict=True))


@pytest.mark.parametrize("section", ["loss", "loss_nodrop"])
@pytest.mark.parametrize("case", CASES)
def test_loss_matches_the_official_update(case, section):
    extra = {"dropout": "0.0"} if section == "loss_nodrop" else {}
    model = imported(case, **extra).model.train()
    ref = load_case(case)
    batch, noise = _loss_batch(ref), _loss_noise(ref, section)

    def r(key):
        return ref[f"{section}/{key}"]

    terms = model.loss_terms(batch, noise, policy=False)
    for ours, theirs in [
        ("next_z", "next_z"),
        ("td_targets", "td_targets"),
        ("zs", "zs"),
        ("qs", "qs"),
        ("reward_preds", "reward_preds"),
        ("consistency", "consistency_loss"),
        ("reward", "reward_loss"),
        ("value", "value_loss"),
        ("termination", "termination_loss"),
        ("total", "total_loss"),
    ]:
        close(terms[ours], r(theirs))
    if case == "episodic":
        close(terms["termination_pred"], r("termination_pred"))
    # The official step: backward, clip at 20, Adam (lr 3e-4, encoder x0.3), then update_pi.
    terms["total"].backward()
    close(torch.nn.utils.clip_grad_norm_(model.parameters(), 20.0), r("grad_norm"))
    torch.optim.Adam(model.param_groups(3e-4)).step()
    pi = model.policy_loss(terms["zs"].detach(), batch.get("task"), noise)
    for ours, theirs in [
        ("action", "pi.action"),
        ("entropy", "pi.entropy"),
        ("scaled_entropy", "pi.scaled_entropy"),
        ("q_avg", "pi.q_avg"),
        ("q_scaled", "pi.q_scaled"),
        ("loss", "pi_loss"),
    ]:
        close(pi[ours], r(theirs), atol=AFTER_ADAM)
    if section == "loss":
        close(pi["scale"], r("scale.value.after"), atol=AFTER_ADAM)


def test_loss_metrics_report_the_official_termination_statistics():
    model = imported("episodic").model.train()
    ref = load_case("episodic")
    out = model.loss(_loss_batch(ref), _loss_noise(ref, "loss"))
    assert "termination" in out.components
    close(out.metrics["termination_rate"], ref["loss/returned/termination_rate"])
    close(out.metrics["termination_f1"], ref["loss/returned/termination_f1"])
    close(out.loss, ref["loss/total_loss"])


def test_first_training_loss_uses_the_imported_target_and_the_next_one_soft_updates():
    model = imported("single-task").model.train()
    before = [p.clone() for p in model.target_qs.parameters()]
    model.loss(_loss_batch(load_case("single-task")))
    assert all(torch.equal(a, b) for a, b in zip(before, model.target_qs.parameters()))
    model.loss(_loss_batch(load_case("single-task")))
    online = list(model.qs.parameters())
    for b, t, o in zip(before, model.target_qs.parameters(), online, strict=True):
        torch.testing.assert_close(t, b.lerp(o.detach(), 0.01))


# -- importer errors ----------------------------------------------------------------------------
def _state_dict(case="single-task"):
    return torch.load(DATA / case / "checkpoint.pt", weights_only=True, map_location="cpu")


def test_unknown_tensor_is_an_error_naming_it(tmp_path):
    ckpt = _state_dict()
    ckpt["model"]["_mystery.0.weight"] = torch.zeros(3, 3)
    torch.save(ckpt, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"_mystery\.0\.weight"):
        import_checkpoint(tmp_path / "c.pt", CONFIG["single-task"])


def test_unknown_top_level_entry_is_an_error(tmp_path):
    ckpt = _state_dict()
    ckpt["extra"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="'extra'"):
        import_checkpoint(tmp_path / "c.pt", CONFIG["single-task"])


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > " + os.devnull,))


def test_a_pickle_with_a_foreign_global_is_refused_by_weights_only(tmp_path, monkeypatch):
    path = tmp_path / "evil.pt"
    torch.save({"model": {"x": _Evil()}}, path)  # a real torch zip whose pickle calls os.system
    raw = tmp_path / "evil.pkl"  # and a bare (legacy) pickle
    raw.write_bytes(pickle.dumps({"model": _Evil()}))
    calls = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a) or 0)
    with pytest.raises(CheckpointError, match="weights_only") as info:
        import_checkpoint(path, CONFIG["single-task"])
    assert info.value.hint
    with pytest.raises(CheckpointError):
        import_checkpoint(raw, CONFIG["single-task"])
    assert calls == []


def test_not_a_checkpoint_and_missing_model_entry_are_typed_errors(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip or a pickle at all")
    with pytest.raises(CheckpointError, match="not a") as info:
        import_checkpoint(junk, CONFIG["single-task"])
    assert info.value.hint
    with pytest.raises(CheckpointError, match="not a file"):
        import_checkpoint(tmp_path / "absent.pt", CONFIG["single-task"])
    no_model = tmp_path / "no_model.pt"
    torch.save({"weights": {}}, no_model)
    with pytest.raises(CheckpointError, match="'model'"):
        import_checkpoint(no_model, CONFIG["single-task"])
    zipped = tmp_path / "other.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("a.txt", "hello")
    with pytest.raises(CheckpointError):
        import_checkpoint(zipped, CONFIG["single-task"])


def test_wrong_shapes_are_a_checkpoint_error(tmp_path):
    ckpt = _state_dict()
    ckpt["model"]["_reward.1.bias"] = torch.zeros(7)
    torch.save(ckpt, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"_reward\.1\.bias"):
        import_checkpoint(tmp_path / "c.pt", CONFIG["single-task"])


def test_a_detach_alias_that_differs_from_the_online_q_is_refused(tmp_path):
    ckpt = _state_dict()
    ckpt["model"]["_detach_Qs_params.0.bias"] = ckpt["model"]["_detach_Qs_params.0.bias"] + 1
    torch.save(ckpt, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"_detach_Qs_params\.0\.bias"):
        import_checkpoint(tmp_path / "c.pt", CONFIG["single-task"])


@pytest.mark.parametrize(
    ("case", "field"), [("single-task", "episode_length"), ("multitask", "episode_lengths")]
)
def test_missing_config_field_is_named_with_the_config_hint(case, field):
    with pytest.raises(CheckpointError, match=field) as info:
        import_checkpoint(DATA / case / "checkpoint.pt", {})
    assert "--config KEY=VALUE" in str(info.value)
    # An explicit discount replaces the episode length.
    imp = import_checkpoint(DATA / case / "checkpoint.pt", {"discount": "0.9"})
    assert imp.model.discounts[0] == pytest.approx(0.9)


def test_bad_config_values_are_config_errors():
    with pytest.raises(ConfigError, match="episode_lenght"):
        import_checkpoint(DATA / "single-task" / "checkpoint.pt", {"episode_lenght": "500"})
    with pytest.raises(ConfigError, match="rho"):
        import_checkpoint(
            DATA / "single-task" / "checkpoint.pt", {**CONFIG["single-task"], "rho": "half"}
        )
    with pytest.raises(CheckpointError, match="latent_dim"):
        import_checkpoint(
            DATA / "single-task" / "checkpoint.pt", {**CONFIG["single-task"], "latent_dim": "64"}
        )


def test_the_older_q_ensemble_layout_imports_to_the_same_model(tmp_path):
    ckpt = _state_dict()
    sd = ckpt["model"]
    old = {}
    names = ("weight", "bias", "ln.weight", "ln.bias")
    for key, value in sd.items():
        if key.startswith("_detach_Qs_params") or "__" in key:
            continue
        for src, dst in (
            ("_Qs.params.", "_Qs.params."),
            ("_target_Qs_params.", "_target_Qs.params."),
        ):
            if key.startswith(src):
                layer, name = key[len(src) :].split(".", 1)
                key = f"{dst}{int(layer) * 4 + names.index(name)}"
                break
        old[key] = value
    torch.save({"model": old}, tmp_path / "old.pt")
    new_model = imported("single-task").model
    old_model = import_checkpoint(tmp_path / "old.pt", CONFIG["single-task"]).model
    for (k1, v1), (k2, v2) in zip(new_model.state_dict().items(), old_model.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1


# -- round trip ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_imported_model_round_trips_through_save_pretrained(case, tmp_path):
    model = imported(case).model.eval()
    ref = load_case(case)
    out = model.save_pretrained(tmp_path / "ckpt")
    loaded = registry.load(str(out))
    assert loaded.config == json.loads(json.dumps(model.config))
    task = ref.get("inputs/task")
    obs, action = ref["inputs/obs"], ref["inputs/action"]
    with torch.no_grad():
        for m in (model, loaded):
            m.encode_vector(obs, task)  # the first lookup renormalises in place on both
        pairs = [
            (
                m.encode_vector(obs, task),
                m.q_logits(ref["model/encode.z"], action, True, task),
                m.pi_info(ref["model/encode.z"], task, eps=ref["model/pi.eps"])["action"],
            )
            for m in (model, loaded)
        ]
    for a, b in zip(*pairs, strict=True):
        assert torch.equal(a, b)
    if case == "episodic":
        assert loaded.termination_head is not None
