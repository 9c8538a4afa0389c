"""Ray Serve for exports (worldflux-serve-ray), on a REAL local Ray instance: batched results
are exactly the single-process ones for every caller, bad payloads get typed 4xx errors, a
killed replica is replaced and no caller ever receives another caller's State.

The module starts one Ray instance (2 CPUs, no dashboard) and one application with 2 replicas
serving the toy fixture family's export. Ray is a test dependency (``make`` installs it): when it
is missing these tests fail, they do not skip.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

try:
    import ray
    from ray import serve
except ImportError as exc:  # pragma: no cover - make installs ray
    pytest.fail(
        f"ray[serve] is not importable ({exc}): the serving tests need it; run `make install` "
        "or pip install -c requirements/dev-constraints.txt 'ray[serve]' -e serving/ray",
        pytrace=False,
    )

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from test_onnx_export import THIRD_PARTY, exported  # noqa: E402
from worldflux_serve_ray import (  # noqa: E402
    Client,
    Engine,
    PayloadError,
    RemoteWorldModel,
    ReplicaUnavailableError,
    ServeOptions,
    SessionLostError,
    serve_export,
)
from worldflux_serve_ray.wire import (  # noqa: E402
    BINARY,
    Request,
    _pack,
    decode_reply,
    encode_request,
)

from worldflux_registry import (  # noqa: E402
    ConditionPayload,
    ContractError,
    State,
    StateFormatError,
    WorldModelInput,
)
from worldflux_registry.plugin_api import make_actions, make_noise, make_observations  # noqa: E402

CLIENTS, STEPS = 32, 50
os.environ.setdefault("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "5")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return exported(tmp_path_factory, THIRD_PARTY, "random")


@pytest.fixture(scope="module")
def served(toy):
    """(handle client, HTTP client, port) of 2 replicas serving the toy export."""
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve_export(toy.directory, ServeOptions(replicas=2, max_batch_size=32), port=port)
        yield Client.connect(), Client.http(f"http://127.0.0.1:{port}"), port
    finally:
        serve.shutdown()
        ray.shutdown()


def _noise(contract, graph, lead, g):
    noise = make_noise(contract, graph, lead, g)
    return ConditionPayload({f"wf.noise.{k}": v for k, v in noise.items()}) if noise else None


def _client_inputs(contract, seed, steps):
    """One caller's inputs: its own batch size, observations, actions and noise per step."""
    g = torch.Generator().manual_seed(seed)
    batch = 1 + seed % 3
    obs = make_observations(contract, (batch,), g)
    enc = _noise(contract, "encode", (batch,), g)
    actions = [make_actions(contract, (batch,), g) for _ in range(steps)]
    noise = [_noise(contract, "transition", (batch,), g) for _ in range(steps)]
    return obs, enc, actions, noise


def _trace(model, inputs):
    """Every State and prediction of one caller's run: encode, then transition + decode."""
    obs, enc, actions, noise = inputs
    state = model.encode(WorldModelInput(obs, enc))
    out = [state]
    for action, cond in zip(actions, noise, strict=True):
        state = model.transition(state, action, cond)
        out += [state, model.decode(state).predictions]
    return out


def _same(a, b) -> bool:
    if isinstance(a, State):
        a, b = a.tensors, b.tensors
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_engine_batches_mixed_callers_exactly_and_isolates_a_bad_one(toy):
    engine = Engine(toy.onnx, toy.onnx.manifest)
    contract = toy.onnx.io_contract()
    fp = toy.onnx.contract_fingerprint()
    requests, expected = [], []
    for seed in range(6):
        obs, enc, actions, noise = _client_inputs(contract, seed, 1)
        state = toy.onnx.encode(WorldModelInput(obs, enc))
        inputs = {"action": actions[0], "noise.latent": noise[0].extras["wf.noise.latent"]}
        requests.append(Request("transition", fp, state=state, inputs=inputs))
        expected.append(toy.onnx.transition(state, actions[0], noise[0]))
    bad = Request("transition", fp, state=requests[0].state, inputs={"action": torch.zeros(5, 2)})
    results = engine.handle([*requests[:3], bad, *requests[3:]])
    assert isinstance(results[3], ContractError)
    got = [r for i, r in enumerate(results) if i != 3]
    assert all(_same(r.state, e) for r, e in zip(got, expected, strict=True))
    assert engine.stats["max_requests"] == 6 and engine.stats["max_rows"] == 12


def test_32_clients_x_50_steps_on_2_replicas_match_single_process_runs(served, toy):
    client, _, _ = served
    contract = toy.onnx.io_contract()
    remote = RemoteWorldModel(client)
    inputs = [_client_inputs(contract, seed, STEPS) for seed in range(CLIENTS)]
    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(lambda x: _trace(remote, x), inputs))
    seconds = time.perf_counter() - start
    for i, (got, x) in enumerate(zip(results, inputs, strict=True)):
        want = _trace(toy.onnx, x)
        assert len(got) == len(want)
        assert all(_same(a, b) for a, b in zip(got, want, strict=True)), f"client {i} differs"
    stats = [client.info(refresh=True)["stats"] for _ in range(6)]
    assert max(s["max_requests"] for s in stats) > 1, "requests were never batched"
    print(f"{CLIENTS} clients x {STEPS} steps ({2 * STEPS + 1} requests each): {seconds:.1f} s")


def test_rollout_and_update_through_the_remote_model_match_local(served, toy):
    client, http, _ = served
    contract = toy.onnx.io_contract()
    g = torch.Generator().manual_seed(7)
    obs = make_observations(contract, (3,), g)
    state = toy.onnx.encode(WorldModelInput(obs, _noise(contract, "encode", (3,), g)))
    actions = make_actions(contract, (6, 3), g)
    noise = _noise(contract, "transition", (6, 3), g)
    for model in (RemoteWorldModel(client), RemoteWorldModel(http)):
        got, want = model.rollout(state, actions, noise), toy.onnx.rollout(state, actions, noise)
        assert all(_same(a, b) for a, b in zip(got.states, want.states, strict=True))
        assert _same(got.predictions, want.predictions)
        cond = _noise(contract, "update", (3,), torch.Generator().manual_seed(1))
        assert _same(
            model.update(state, actions[0], obs, cond),
            toy.onnx.update(state, actions[0], obs, cond),
        )


def test_plain_http_json_request_matches_local(served, toy):
    _, _, port = served
    contract = toy.onnx.io_contract()
    g = torch.Generator().manual_seed(3)
    state = toy.onnx.encode(
        WorldModelInput(make_observations(contract, (2,), g), _noise(contract, "encode", (2,), g))
    )
    action = make_actions(contract, (2,), g)
    noise = make_noise(contract, "transition", (2,), g)["latent"]
    info = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/info"))["info"]

    def tensor(t):
        return {"dtype": "float32", "shape": list(t.shape), "data": t.reshape(-1).tolist()}

    body = {
        "op": "transition",
        "fingerprint": info["fingerprint"],
        "state": base64.b64encode(state.serialize()).decode(),
        "inputs": {"action": tensor(action), "noise.latent": tensor(noise)},
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/transition",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    reply = json.load(urllib.request.urlopen(request))
    got = State.deserialize(base64.b64decode(reply["state"]))
    want = toy.onnx.transition(state, action, ConditionPayload({"wf.noise.latent": noise}))
    assert _same(got, want)
    body["inputs"]["action"] = tensor(action[:, :1])
    request = urllib.request.Request(
        request.full_url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request)
    assert caught.value.code == 422
    assert json.load(caught.value)["error"]["type"] == "ContractError"


def test_bad_payloads_get_typed_4xx_errors_and_the_replicas_keep_serving(served, toy):
    client, http, port = served
    contract = toy.onnx.io_contract()
    g = torch.Generator().manual_seed(5)
    state = toy.onnx.encode(make_observations(contract, (2,), g))
    action = make_actions(contract, (2,), g)
    noise = make_noise(contract, "transition", (2,), g)["latent"]
    fp = client.fingerprint
    good = Request("transition", fp, state=state, inputs={"action": action, "noise.latent": noise})
    for c in (client, http):
        with pytest.raises(ContractError, match="contract 'sha256:0") as e:
            c.call(
                Request("transition", "sha256:" + "0" * 64, state=state, inputs={"action": action})
            )
        assert e.value.status == 409
        with pytest.raises(ContractError, match="shape") as e:
            c.call(Request("transition", fp, state=state, inputs={"action": action[:, :1]}))
        assert e.value.status == 422
        wrong_state = State({k: v[:, :-1] for k, v in state.tensors.items()})
        with pytest.raises(ContractError):
            c.call(Request("transition", fp, state=wrong_state, inputs={"action": action}))
        with pytest.raises(ContractError, match="takes no inputs"):
            c.call(
                Request(
                    "transition", fp, state=state, inputs={"action": action, "noise.latnet": action}
                )
            )
    # truncated State bytes inside a well-formed envelope: the State decoder's error
    truncated = state.serialize()[:-7]
    header = {"kind": "request", "op": "transition", "fingerprint": fp}
    envelope = _pack(header, [("state", truncated)])
    send = client._send
    with pytest.raises(StateFormatError) as e:
        decode_reply(send(envelope, None))
    assert e.value.status == 400
    with pytest.raises(PayloadError):
        decode_reply(send(encode_request(good)[:-3], None))
    with pytest.raises(PayloadError):
        decode_reply(send(b"not an envelope", None))
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/call", data=envelope, headers={"Content-Type": BINARY}
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request)
    assert caught.value.code == 400
    # still serving, exactly
    want = toy.onnx.transition(state, action, ConditionPayload({"wf.noise.latent": noise}))
    assert _same(client.call(good).state, want)


def test_sessions_keep_the_state_on_the_replica(served, toy):
    client, _, _ = served
    contract = toy.onnx.io_contract()
    inputs = [_client_inputs(contract, 100 + i, 10) for i in range(4)]
    for obs, enc, actions, noise in inputs:
        state = toy.onnx.encode(WorldModelInput(obs, enc))
        session = client.open_session(state)
        for action, cond in zip(actions, noise, strict=True):
            session.transition(action, cond)
            state = toy.onnx.transition(state, action, cond)
        assert _same(session.state(), state)
        assert _same(session.decode().predictions, toy.onnx.decode(state).predictions)
        assert _same(session.close(), state)
        with pytest.raises(SessionLostError):
            session.state()


def _replicas() -> set[str]:
    status = serve.status().applications["worldflux"].deployments["WorldModelServer"]
    return status.replica_states.get("RUNNING", 0)


def test_a_killed_replica_is_replaced_and_no_caller_gets_another_callers_state(served, toy):
    client, _, _ = served
    contract = toy.onnx.io_contract()
    steps = 20
    inputs = [_client_inputs(contract, 200 + i, steps) for i in range(8)]
    sessions = []
    for obs, enc, _, _ in inputs[:4]:
        sessions.append(client.open_session(toy.onnx.encode(WorldModelInput(obs, enc))))
    owners = {s.id.rpartition("|")[0] for s in sessions}
    victim_name = sorted(owners)[0]
    victim = ray.get_actor(victim_name, namespace="serve")
    remote = RemoteWorldModel(client)
    outcomes: list = [None] * len(inputs)
    started = threading.Event()

    def run(i):
        try:
            started.set()
            outcomes[i] = _trace(remote, inputs[i])
        except ReplicaUnavailableError as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    started.wait()
    time.sleep(0.3)
    running = sum(t.is_alive() for t in threads)
    retried = client.retried
    ray.kill(victim, no_restart=True)
    for t in threads:
        t.join(120)
    answered = 0
    for i, got in enumerate(outcomes):
        assert got is not None
        if isinstance(got, ReplicaUnavailableError):
            continue
        answered += 1
        assert all(_same(a, b) for a, b in zip(got, _trace(toy.onnx, inputs[i]), strict=True))
    assert running > 0, "the replica was killed after the load, not during it"
    assert answered >= 1
    print(
        f"killed with {running} callers running; retries after the kill: "
        f"{client.retried - retried}; {answered}/{len(inputs)} callers answered exactly"
    )
    for session in sessions:
        if session.id.startswith(victim_name + "|"):
            with pytest.raises(SessionLostError):
                session.transition(inputs[0][2][0][:1])
        else:
            session.state()
    deadline = time.monotonic() + 90
    while _replicas() < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _replicas() == 2, "Serve did not replace the killed replica"
    g = torch.Generator().manual_seed(9)
    state = toy.onnx.encode(make_observations(contract, (2,), g))
    action = make_actions(contract, (2,), g)
    cond = _noise(contract, "transition", (2,), g)
    assert _same(client.transition(state, action, cond), toy.onnx.transition(state, action, cond))
