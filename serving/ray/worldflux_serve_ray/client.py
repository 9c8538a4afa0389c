"""Python callers of a served world model: `Client`, its `Session`s, and `RemoteWorldModel`.

`Client.connect(app)` talks to the application through a Ray `DeploymentHandle` (inside the
Ray cluster, or after ``ray.init(address=...)``); `Client.http(url)` over plain HTTP. Both send
the same binary envelope (`worldflux_serve_ray.wire`) and raise the server's typed errors.

Stateless requests are retried when a replica dies under them (Serve restarts it; the retry
carries the same inputs, so the same noise gives the same answer). Session requests are never
retried onto another replica: the session's State lived on the dead one, so they raise
`SessionLostError`.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from worldflux_registry import (
    ActionPayload,
    Capability,
    CapabilityError,
    ConditionPayload,
    ContractError,
    IOContract,
    LossOutput,
    ModelOutput,
    State,
    Trajectory,
    WorldModel,
    WorldModelInput,
)

from .errors import PayloadError, ReplicaUnavailableError, ServeError, SessionLostError
from .wire import BINARY, Reply, Request, decode_reply, encode_request

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["Client", "RemoteWorldModel", "Session"]

Transport = Callable[[bytes, str | None], bytes]


class _Transient(Exception):
    """A transport failure worth retrying (replica died, proxy answered 5xx, connection)."""


def _handle_transport(handle: Any) -> Transport:
    import ray.exceptions
    import ray.serve.exceptions as serve_exc

    transient = (
        ray.exceptions.RayActorError,
        ray.exceptions.WorkerCrashedError,
        serve_exc.BackPressureError,
        serve_exc.DeploymentUnavailableError,
        serve_exc.ReplicaUnavailableError,
    )

    def send(payload: bytes, routing: str | None) -> bytes:
        target = handle.options(multiplexed_model_id=routing) if routing else handle
        try:
            result = target.call.remote(payload).result()
        except transient as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(result, bytes):
            raise PayloadError(f"the server answered {type(result).__name__}, not bytes")
        return result

    return send


def _http_transport(url: str, timeout_s: float) -> Transport:
    base = url.rstrip("/")

    def send(payload: bytes, routing: str | None) -> bytes:
        headers = {"Content-Type": BINARY}
        if routing:
            headers["serve_multiplexed_model_id"] = routing
        request = urllib.request.Request(base + "/v1/call", data=payload, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as exc:
            body = exc.read()
            if body.startswith(b"WFSV"):
                return bytes(body)  # a typed error from the replica
            raise _Transient(f"HTTP {exc.code}: {body[:200]!r}") from exc
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}") from exc

    return send


def _inputs_from(
    conditions: ConditionPayload | None, takes: set[str], inputs: dict[str, Tensor]
) -> dict[str, Tensor]:
    """Add the ``wf.noise.*`` / ``wf.cond.*`` extras the step takes, as its input names."""
    for key, value in (conditions.extras if conditions is not None else {}).items():
        for prefix, port in (("wf.noise.", "noise."), ("wf.cond.", "cond.")):
            if key.startswith(prefix) and port + key.removeprefix(prefix) in takes:
                inputs[port + key.removeprefix(prefix)] = value
    return inputs


class Client:
    """Calls the protocol steps of a served world model; one instance may be shared by threads.

    Args:
        transport: How envelopes travel (use `connect` or `http`).
        retries: Attempts beyond the first for a stateless request whose replica failed.
        backoff_s: First pause between attempts (doubling, capped at 2 s).
    """

    def __init__(self, transport: Transport, *, retries: int = 20, backoff_s: float = 0.05) -> None:
        self._send = transport
        self.retries = retries
        self.backoff_s = backoff_s
        self._info: dict[str, Any] | None = None
        #: Attempts repeated after a transport failure or a misrouted session request.
        self.retried = 0

    @classmethod
    def connect(cls, app: str = "worldflux", *, address: str | None = None, **kw: Any) -> Client:
        """A client over the Serve application ``app``'s `DeploymentHandle`.

        Connects this process to Ray first when it is not (``address``: ``"auto"`` by default,
        or ``"ray://host:10001"``).
        """
        import ray
        from ray import serve

        if not ray.is_initialized():
            ray.init(address=address or "auto", log_to_driver=False)
        return cls(_handle_transport(serve.get_app_handle(app)), **kw)

    @classmethod
    def http(
        cls, url: str = "http://127.0.0.1:8000", *, timeout_s: float = 60.0, **kw: Any
    ) -> Client:
        """A client over plain HTTP (``POST <url>/v1/call`` with binary envelopes)."""
        return cls(_http_transport(url, timeout_s), **kw)

    # -- plumbing ----------------------------------------------------------------------------
    def call(self, request: Request, routing: str | None = None) -> Reply:
        """Send one request; return its `Reply` or raise its typed error."""
        payload = encode_request(request)
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return decode_reply(self._send(payload, routing))
            except _Transient as exc:
                if request.session is not None:
                    raise SessionLostError(
                        f"session {request.session!r}: its replica failed during "
                        f"{request.op} ({exc})",
                        hint="its State stayed on that replica; open a new session from a "
                        "State you hold",
                    ) from exc
                failure: Exception = exc
            except ServeError as exc:
                if getattr(exc, "status", None) != 421:  # only 'misrouted' is retried
                    raise
                failure = exc
            if attempt < self.retries:
                self.retried += 1
                time.sleep(delay)
                delay = min(2 * delay, 2.0)
        raise ReplicaUnavailableError(
            f"{request.op}: no replica answered after {self.retries + 1} attempts ({failure})",
            hint="check `serve status`; the deployment may be restarting or overloaded",
        )

    def info(self, refresh: bool = False) -> dict[str, Any]:
        """What the server runs: fingerprint, family, preset, contract, ops and their inputs
        (cached; ``refresh`` asks again, e.g. for the answering replica's ``stats``)."""
        if self._info is None or refresh:
            reply = self.call(Request(op="info", fingerprint=""))
            if reply.info is None:
                raise PayloadError("the server's info reply holds no info")
            self._info = reply.info
        return self._info

    @property
    def fingerprint(self) -> str:
        """The served contract's fingerprint."""
        return str(self.info()["fingerprint"])

    def io_contract(self) -> IOContract:
        """The served contract."""
        return IOContract.from_dict(self.info()["contract"])

    def _takes(self, op: str) -> set[str]:
        ops = self.info()["ops"]
        if op not in ops:
            raise CapabilityError(f"the server has no {op!r} step", hint=f"served: {list(ops)}")
        return {str(s["name"]) for s in ops[op]}

    def _step(
        self,
        op: str,
        state: State | None,
        inputs: dict[str, Tensor],
        conditions: ConditionPayload | None,
        deterministic: bool,
    ) -> Reply:
        inputs = _inputs_from(conditions, self._takes(op), inputs)
        request = Request(
            op=op,
            fingerprint=self.fingerprint,
            state=state,
            inputs=inputs,
            deterministic=deterministic,
        )
        return self.call(request)

    # -- the protocol's steps ----------------------------------------------------------------
    def encode(
        self, obs: Tensor | Mapping[str, Tensor] | WorldModelInput, deterministic: bool = False
    ) -> State:
        """Encode observations (``{name: [batch, ...]}``) to a State."""
        conditions = obs.conditions if isinstance(obs, WorldModelInput) else None
        if isinstance(obs, WorldModelInput):
            obs = obs.observations
        if not isinstance(obs, Mapping):
            names = [s.name for s in self.io_contract().observations]
            if len(names) != 1:
                raise ContractError(f"a bare tensor was given; the contract observes {names}")
            obs = {names[0]: obs}
        inputs = {f"obs.{k}": v for k, v in obs.items()}
        return _state(self._step("encode", None, inputs, conditions, deterministic))

    def transition(
        self,
        state: State,
        action: Tensor | None,
        conditions: ConditionPayload | None = None,
        deterministic: bool = False,
    ) -> State:
        """The next State given ``action`` ``[batch, ...]`` (prior step)."""
        inputs = {"action": action} if action is not None else {}
        return _state(self._step("transition", state, inputs, conditions, deterministic))

    def update(
        self,
        state: State,
        action: Tensor | None,
        obs: Mapping[str, Tensor],
        conditions: ConditionPayload | None = None,
        deterministic: bool = False,
    ) -> State:
        """The posterior State given ``action`` and observations ``obs``."""
        inputs = {f"obs.{k}": v for k, v in obs.items()}
        if action is not None:
            inputs["action"] = action
        return _state(self._step("update", state, inputs, conditions, deterministic))

    def decode(self, state: State, conditions: ConditionPayload | None = None) -> ModelOutput:
        """The predictions of ``state``."""
        return ModelOutput(self._step("decode", state, {}, conditions, False).predictions)

    def rollout(
        self,
        state: State,
        actions: Tensor,
        conditions: ConditionPayload | None = None,
        deterministic: bool = False,
    ) -> Trajectory:
        """Roll out ``actions`` ``[T, batch, ...]``; noise extras are ``[T, batch, ...]``."""
        reply = self._step("rollout", state, {"actions": actions}, conditions, deterministic)
        return _trajectory(state, actions, reply)

    def open_session(self, state: State) -> Session:
        """Keep ``state`` on a replica and step it there (see `Session`)."""
        import uuid

        key = uuid.uuid4().hex
        request = Request(op="open_session", fingerprint=self.fingerprint, state=state)
        reply = self.call(request, routing=key)
        if reply.session is None:
            raise PayloadError("open_session reply names no session")
        return Session(self, reply.session, key)


def _state(reply: Reply) -> State:
    if reply.state is None:
        raise PayloadError("the reply holds no State")
    return reply.state


def _trajectory(state: State, actions: Tensor, reply: Reply) -> Trajectory:
    stacked = reply.states.tensors if reply.states is not None else {}
    steps = int(actions.shape[0])
    states = [state, *(State({k: v[t] for k, v in stacked.items()}) for t in range(steps))]
    preds = reply.predictions
    return Trajectory(
        states=states,
        actions=actions,
        rewards=preds.get("reward"),
        continues=preds.get("continue"),
        predictions=preds,
    )


class Session:
    """A State kept on one replica: each step sends only actions and observations.

    Requests are routed to the session's replica. When that replica dies or restarts, every
    later call raises `SessionLostError` (the State is never rebuilt elsewhere, nor mixed with
    another session's); `state()` fetches the current State so callers can checkpoint it.
    """

    def __init__(self, client: Client, session_id: str, routing: str) -> None:
        self.client = client
        self.id = session_id
        self._routing = routing

    def _call(
        self,
        op: str,
        inputs: dict[str, Tensor] | None = None,
        conditions: ConditionPayload | None = None,
        deterministic: bool = False,
        return_state: bool = False,
    ) -> Reply:
        takes = self.client._takes(op) if op in self.client.info()["ops"] else set()
        request = Request(
            op=op,
            fingerprint=self.client.fingerprint,
            session=self.id,
            inputs=_inputs_from(conditions, takes, dict(inputs or {})),
            deterministic=deterministic,
            return_state=return_state,
        )
        return self.client.call(request, routing=self._routing)

    def transition(
        self,
        action: Tensor,
        conditions: ConditionPayload | None = None,
        deterministic: bool = False,
        return_state: bool = False,
    ) -> State | None:
        """Advance the session's State by ``action``; returns it when ``return_state``."""
        return self._call(
            "transition", {"action": action}, conditions, deterministic, return_state
        ).state

    def update(
        self,
        action: Tensor,
        obs: Mapping[str, Tensor],
        conditions: ConditionPayload | None = None,
        deterministic: bool = False,
        return_state: bool = False,
    ) -> State | None:
        """Advance the session's State with the posterior step."""
        inputs = {"action": action, **{f"obs.{k}": v for k, v in obs.items()}}
        return self._call("update", inputs, conditions, deterministic, return_state).state

    def decode(self, conditions: ConditionPayload | None = None) -> ModelOutput:
        """Predictions of the session's current State."""
        return ModelOutput(self._call("decode", None, conditions).predictions)

    def rollout(
        self,
        actions: Tensor,
        conditions: ConditionPayload | None = None,
        deterministic: bool = False,
    ) -> Trajectory:
        """Imagine ``actions`` from the session's State (the session does not advance)."""
        reply = self._call("rollout", {"actions": actions}, conditions, deterministic)
        return _trajectory(self.state(), actions, reply)

    def state(self) -> State:
        """The session's current State."""
        return _state(self._call("get_state"))

    def close(self) -> State:
        """Close the session; returns its last State."""
        return _state(self._call("close_session", return_state=True))


class RemoteWorldModel(WorldModel):
    """A `WorldModel` whose steps run on the server: code written for a local model runs
    unchanged. It holds no parameters (``loss`` raises `CapabilityError`)."""

    def __init__(self, client: Client) -> None:
        super().__init__()
        self.client = client
        info = client.info()
        self.family = info.get("family")  # type: ignore[misc]
        self.preset = info.get("preset")
        served = {c.value: c for c in Capability}
        self.capabilities = frozenset(  # type: ignore[misc]
            served[op] for op in info.get("ops", {}) if op in served
        )
        self._contract = client.io_contract()

    def io_contract(self) -> IOContract:
        """The served contract."""
        return self._contract

    def encode(self, obs: Any, deterministic: bool = False) -> State:
        """Encode on the server."""
        return self.client.encode(obs, deterministic)

    def transition(
        self,
        state: State,
        action: Any,
        conditions: ConditionPayload | None = None,
        deterministic: bool = False,
    ) -> State:
        """Transition on the server."""
        return self.client.transition(
            state,
            self.action_tensor(action),
            conditions,
            deterministic,
        )

    def update(
        self,
        state: State,
        action: Any,
        obs: Any,
        conditions: ConditionPayload | None = None,
        deterministic: bool = False,
    ) -> State:
        """Update on the server."""
        observations, obs_conditions = self.observations(obs)
        return self.client.update(
            state,
            self.action_tensor(action),
            observations,
            conditions if conditions is not None else obs_conditions,
            deterministic,
        )

    def decode(self, state: State, conditions: ConditionPayload | None = None) -> ModelOutput:
        """Decode on the server."""
        return self.client.decode(state, conditions)

    def rollout(
        self,
        initial_state: State,
        action_sequence: Tensor | ActionPayload,
        conditions: ConditionPayload | None = None,
        deterministic: bool = False,
        mode: str = "autoregressive",
    ) -> Trajectory:
        """Roll out on the server (one request)."""
        if mode != "autoregressive":
            raise CapabilityError(f"rollout mode {mode!r} is not served")
        actions = self.action_tensor(action_sequence)
        if actions is None:
            raise ContractError("rollout needs an action sequence [T, batch, ...]")
        return self.client.rollout(initial_state, actions, conditions, deterministic)

    def loss(self, batch: Mapping[str, Tensor]) -> LossOutput:
        """Not available on a served model."""
        raise CapabilityError(
            "a served model computes no training loss",
            hint="train the torch model, then export and serve it",
        )
