"""`Engine`: validates requests, batches them along the contract's batch axis, runs the model.

Ray-free: a Serve replica wraps one `Engine`, and so can a test or a benchmark in one process.
Each request is checked on its own before it joins a batch (fingerprint, op, State keys,
shapes and dtypes, one batch size across all its tensors), so a bad request gets its own typed
error and never fails, shifts or reorders anyone else's rows. Requests that agree on op,
deterministic flag and every non-batch dim are concatenated, run once, and split back by row
ranges. Missing noise is drawn per request before concatenation, so a request that sends its
noise gets exactly the result it would get alone.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from worldflux_registry import (
    CapabilityError,
    ConditionPayload,
    ContractError,
    State,
    WorldFluxRegistryError,
    WorldModelInput,
)

from .errors import PayloadError, ServeError, SessionLostError
from .wire import Reply, Request

if TYPE_CHECKING:
    from torch import Tensor

    from worldflux_registry import WorldModel

__all__ = ["OPS", "SESSION_OPS", "Engine", "InputSpec"]

#: Protocol steps served, with the graph each one needs. ``plan`` / ``act`` join when exports
#: carry those graphs: add them here with a runner in `Engine._RUNNERS`.
OPS: dict[str, tuple[str, ...]] = {
    "encode": ("encode",),
    "transition": ("transition",),
    "update": ("update",),
    "decode": ("decode",),
    "rollout": ("transition", "decode"),
}
#: Ops on server-side sessions (no tensors to batch).
SESSION_OPS = ("open_session", "close_session", "get_state")


@dataclass(frozen=True)
class InputSpec:
    """One tensor a step takes besides the State: ``timed`` ones have a leading ``[T]`` axis
    (the batch axis is then 1); ``optional`` ones (noise) are drawn when not sent."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    timed: bool = False
    optional: bool = False


@dataclass
class _Job:
    index: int
    op: str
    request: Request
    state: State | None
    inputs: dict[str, Tensor]
    batch: int
    key: tuple[Any, ...] = ()
    session: str | None = None


@dataclass
class _Sessions:
    states: dict[str, State] = field(default_factory=dict)


def _dtype_name(tensor: Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


class Engine:
    """Serve ``model`` (an export loaded by `registry.load`) to many callers at once.

    Args:
        model: The `WorldModel` to run (an `OnnxWorldModel` in a replica).
        manifest: The export's manifest (graph inputs tell which conditions a step reads).
        tag: This engine's name, the prefix of its session ids (a replica's actor name).
        owner_alive: ``owner_alive(tag)`` says whether another engine's tag still runs; a
            session of a dead owner is reported lost, a live one misrouted.
    """

    def __init__(
        self,
        model: WorldModel,
        manifest: Mapping[str, Any],
        *,
        tag: str = "local",
        owner_alive: Callable[[str], bool] | None = None,
        max_sessions: int = 4096,
    ) -> None:
        self.model = model
        self.manifest = dict(manifest)
        self.contract = model.io_contract()
        self.fingerprint = model.contract_fingerprint()
        self.tag = tag
        self.max_sessions = max_sessions
        self._owner_alive = owner_alive or (lambda _tag: False)
        self._sessions = _Sessions()
        #: Requests answered, batches run, and the most requests / rows one batch held.
        self.stats = {"requests": 0, "batches": 0, "max_requests": 0, "max_rows": 0}
        graphs = self.manifest.get("graphs") or {}
        self.ops = {
            op: self._input_specs(op, graphs)
            for op, needs in OPS.items()
            if all(g in graphs for g in needs)
        }

    # -- what is served ----------------------------------------------------------------------
    def _input_specs(self, op: str, graphs: Mapping[str, Any]) -> tuple[InputSpec, ...]:
        names: dict[str, InputSpec] = {}
        for graph in OPS[op]:
            for entry in graphs[graph].get("inputs", ()):
                name = str(entry["name"])
                if name.startswith("state."):
                    continue
                timed = op == "rollout" and (name == "action" or name.startswith("noise."))
                if op == "rollout" and name == "action":
                    name = "actions"
                spec = InputSpec(
                    name,
                    str(entry["dtype"]),
                    tuple(entry["shape"]),
                    timed=timed,
                    optional=name.startswith("noise."),
                )
                names.setdefault(name, spec)
        return tuple(names.values())

    def info(self) -> dict[str, Any]:
        """What this engine serves: fingerprint, family, preset, contract, ops and inputs."""
        return {
            "fingerprint": self.fingerprint,
            "family": self.manifest.get("family"),
            "preset": self.manifest.get("preset"),
            "contract": self.contract.to_dict(),
            "ops": {
                op: [
                    {
                        "name": s.name,
                        "dtype": s.dtype,
                        "shape": list(s.shape),
                        "timed": s.timed,
                        "optional": s.optional,
                    }
                    for s in specs
                ]
                for op, specs in self.ops.items()
            },
            "session_ops": list(SESSION_OPS),
            "sessions": len(self._sessions.states),
            "stats": dict(self.stats),
            "tag": self.tag,
        }

    # -- sessions ----------------------------------------------------------------------------
    def session_owner(self, session: str) -> str:
        """The engine tag a session id names (``<tag>|<key>``)."""
        tag, sep, key = session.rpartition("|")
        if not sep or not tag or not key:
            raise PayloadError(f"session id {session!r} is not '<replica>|<key>'")
        return tag

    def check_owner(self, session: str) -> None:
        """Raise unless this engine holds ``session``: `SessionLostError` when its owner is
        gone (or it was closed), `ServeError` status 421 when another live engine holds it."""
        owner = self.session_owner(session)
        if owner == self.tag:
            if session not in self._sessions.states:
                raise SessionLostError(
                    f"session {session!r} is not open on replica {self.tag!r} (closed, or "
                    "dropped when the session limit was reached)",
                    hint="open a new session from a State you hold",
                )
            return
        if self._owner_alive(owner):
            raise ServeError(
                f"session {session!r} lives on replica {owner!r}, this is {self.tag!r}",
                hint="retry: requests of a session are routed to its replica",
                status=421,
            )
        raise SessionLostError(
            f"session {session!r} was lost with its replica {owner!r}",
            hint="its State stayed on that replica; open a new session from a State you hold",
        )

    def session_key(self, session: str) -> str:
        """The routing key of a session id (the part after the replica tag)."""
        return session.rpartition("|")[2]

    def new_session_key(self) -> str:
        """A fresh, unguessable routing key for `open_session`."""
        return uuid.uuid4().hex

    # -- one request -------------------------------------------------------------------------
    def _prepare(self, index: int, request: Request) -> _Job | Reply:
        if request.fingerprint != self.fingerprint:
            raise ContractError(
                f"request built for contract {request.fingerprint!r}, this server runs "
                f"{self.fingerprint}",
                hint="fetch Client.info() and build inputs for the served contract",
                status=409,
            )
        op = request.op
        if op in SESSION_OPS:
            return self._session_op(request)
        specs = self.ops.get(op)
        if specs is None:
            raise CapabilityError(
                f"this server has no {op!r} step",
                hint="served: " + ", ".join([*self.ops, *SESSION_OPS]),
                status=404,
            )
        state = request.state
        session = request.session
        if session is not None:
            if op == "encode":
                raise PayloadError("encode starts a State; it takes no session")
            if state is not None:
                raise PayloadError("a session step takes no State: the session holds it")
            self.check_owner(session)
            state = self._sessions.states[session]
        if op != "encode":
            if state is None:
                raise PayloadError(f"{op} needs a State (part 'state') or a session")
            self.model.validate_state_contract(state)
        inputs = dict(request.inputs)
        batch = self._batch_size(op, state, inputs, specs)
        self._check_inputs(op, inputs, specs, batch)
        if not request.deterministic:
            self._draw_noise(op, inputs, specs, batch)
        timed = next((v.shape[0] for k, v in inputs.items() if k == "actions"), None)
        key = (
            op,
            request.deterministic,
            timed,
            tuple(
                (k, v.dtype, tuple(v.shape[1:]))
                for k, v in (state.tensors.items() if state else ())
            ),
            tuple(sorted((k, v.dtype, self._rest(k, v, specs)) for k, v in inputs.items())),
        )
        return _Job(index, op, request, state, inputs, batch, key, session)

    @staticmethod
    def _rest(name: str, tensor: Tensor, specs: Sequence[InputSpec]) -> tuple[int, ...]:
        timed = any(s.name == name and s.timed for s in specs)
        shape = tuple(tensor.shape)
        return (shape[0], *shape[2:]) if timed else shape[1:]

    def _batch_size(
        self, op: str, state: State | None, inputs: Mapping[str, Tensor], specs: Sequence[InputSpec]
    ) -> int:
        if state is not None:
            first = next(iter(state.tensors.values()), None)
            if first is None or first.dim() == 0:
                raise ContractError("the State has no batch axis")
            batch = int(first.shape[0])
        else:
            obs = [k for k in inputs if k.startswith("obs.")]
            if not obs or inputs[obs[0]].dim() == 0:
                raise ContractError(f"{op} needs observations 'obs.<name>' with a batch axis")
            batch = int(inputs[obs[0]].shape[0])
        if batch < 1:
            raise ContractError(f"{op} got an empty batch", hint="send at least one row")
        return batch

    def _check_inputs(
        self, op: str, inputs: Mapping[str, Tensor], specs: Sequence[InputSpec], batch: int
    ) -> None:
        import torch

        known = {s.name: s for s in specs}
        unknown = sorted(set(inputs) - set(known))
        if unknown:
            raise ContractError(
                f"{op} takes no inputs {unknown}",
                hint="it takes " + (", ".join(known) or "nothing but the State"),
            )
        missing = [s.name for s in specs if not s.optional and s.name not in inputs]
        if missing:
            raise ContractError(f"{op} needs inputs {missing}", hint="see Client.info()['ops']")
        steps: int | None = None
        problems = []
        for name, tensor in inputs.items():
            spec = known[name]
            if not isinstance(tensor, torch.Tensor):
                problems.append(f"input {name!r} is not a tensor")
                continue
            if _dtype_name(tensor) != spec.dtype:
                problems.append(
                    f"input {name!r} has dtype {_dtype_name(tensor)}, expected {spec.dtype}"
                )
            shape = tuple(tensor.shape)
            want: list[int | str] = []
            if spec.timed:
                lead = shape[0] if shape else -1
                steps = lead if steps is None else steps
                want.append(steps)
            for dim in spec.shape:
                want.append(batch if dim == "batch" else dim)
            ok = len(shape) == len(want) and all(
                isinstance(w, str) or w == s for w, s in zip(want, shape, strict=False)
            )
            if not ok or (spec.timed and steps is not None and steps < 1):
                shown = tuple(want)
                problems.append(
                    f"input {name!r} has shape {shape}, expected {shown} (batch {batch})"
                )
        if problems:
            raise ContractError("; ".join(problems), hint="see Client.info()['ops']")

    def _draw_noise(
        self, op: str, inputs: dict[str, Tensor], specs: Sequence[InputSpec], batch: int
    ) -> None:
        steps = int(inputs["actions"].shape[0]) if "actions" in inputs else None
        for spec in specs:
            if not spec.optional or spec.name in inputs:
                continue
            name = spec.name.removeprefix("noise.")
            rows = batch * (steps or 1)
            flat = self.model.noise(name, None, rows)
            inputs[spec.name] = flat.reshape(steps, batch, *flat.shape[1:]) if steps else flat

    # -- session ops -------------------------------------------------------------------------
    def _session_op(self, request: Request) -> Reply:
        if request.op == "open_session":
            if request.state is None:
                raise PayloadError("open_session needs a State (part 'state')")
            self.model.validate_state_contract(request.state)
            if len(self._sessions.states) >= self.max_sessions:
                raise ServeError(
                    f"replica {self.tag!r} holds {self.max_sessions} sessions already",
                    hint="close sessions you no longer step, or add replicas",
                    status=429,
                )
            key = request.session or self.new_session_key()
            if "|" in key:
                raise PayloadError(f"session key {key!r} may not contain '|'")
            sid = f"{self.tag}|{key}"
            self._sessions.states[sid] = request.state
            return Reply(session=sid)
        session = request.session
        if session is None:
            raise PayloadError(f"{request.op} needs a session id")
        self.check_owner(session)
        if request.op == "close_session":
            state = self._sessions.states.pop(session)
            return Reply(session=session, state=state if request.return_state else None)
        return Reply(session=session, state=self._sessions.states[session])

    # -- batches -----------------------------------------------------------------------------
    def handle(self, requests: Sequence[Request]) -> list[Reply | WorldFluxRegistryError]:
        """Answer each request in order: its `Reply`, or the typed error it alone caused."""
        results: list[Reply | WorldFluxRegistryError | None] = [None] * len(requests)
        jobs: list[_Job] = []
        for index, request in enumerate(requests):
            try:
                prepared = self._prepare(index, request)
            except WorldFluxRegistryError as exc:
                results[index] = exc
                continue
            if isinstance(prepared, Reply):
                results[index] = prepared
            else:
                jobs.append(prepared)
        # Requests of one session run in arrival order: one per round.
        while jobs:
            seen: set[str] = set()
            this_round, later = [], []
            for job in jobs:
                if job.session is not None and job.session in seen:
                    later.append(job)
                    continue
                if job.session is not None:
                    seen.add(job.session)
                this_round.append(job)
            groups: dict[tuple[Any, ...], list[_Job]] = {}
            for job in this_round:
                groups.setdefault(job.key, []).append(job)
            for group in groups.values():
                for job, result in zip(group, self._run_group(group), strict=True):
                    results[job.index] = result
            jobs = later
        return [r if r is not None else ServeError("request was not answered") for r in results]

    def _run_group(self, group: list[_Job]) -> list[Reply | WorldFluxRegistryError]:
        try:
            return self._run(group)
        except WorldFluxRegistryError as exc:
            if len(group) == 1:
                return [exc]
        except Exception as exc:  # a runtime failure: report it, keep serving
            if len(group) == 1:
                return [ServeError(f"{group[0].op} failed: {type(exc).__name__}: {exc}")]
        # One request broke a joint run: run each alone so only it gets the error.
        return [self._run_group([job])[0] for job in group]

    def _run(self, group: list[_Job]) -> list[Reply | WorldFluxRegistryError]:
        import torch

        stats = self.stats
        stats["requests"] += len(group)
        stats["batches"] += 1
        stats["max_requests"] = max(stats["max_requests"], len(group))
        stats["max_rows"] = max(stats["max_rows"], sum(j.batch for j in group))

        op = group[0].op
        timed = {s.name for s in self.ops[op] if s.timed}

        def cat(parts: list[Tensor], name: str) -> Tensor:
            if len(parts) == 1:
                return parts[0]
            return torch.cat(parts, dim=1 if name in timed else 0)

        names = list(group[0].inputs)
        inputs = {n: cat([j.inputs[n] for j in group], n) for n in names}
        state = None
        if group[0].state is not None:
            keys = list(group[0].state.tensors)
            state = State({k: cat([j.state.tensors[k] for j in group if j.state], k) for k in keys})
        extras: dict[str, Any] = {}
        obs: dict[str, Tensor] = {}
        for name, value in inputs.items():
            if name.startswith("noise."):
                extras["wf.noise." + name.removeprefix("noise.")] = value
            elif name.startswith("cond."):
                extras["wf.cond." + name.removeprefix("cond.")] = value
            elif name.startswith("obs."):
                obs[name.removeprefix("obs.")] = value
        conditions = ConditionPayload(extras=extras) if extras else None
        det = group[0].request.deterministic
        model = self.model
        new_state: State | None = None
        states: State | None = None
        preds: dict[str, Tensor] = {}
        st = state if state is not None else State({})  # encode takes none
        with torch.inference_mode():
            if op == "encode":
                new_state = model.encode(WorldModelInput(obs, conditions=conditions), det)
            elif op == "transition":
                new_state = model.transition(st, inputs["action"], conditions, det)
            elif op == "update":
                new_state = model.update(st, inputs["action"], obs, conditions, det)
            elif op == "decode":
                preds = dict(model.decode(st, conditions).predictions)
            elif op == "rollout":
                traj = model.rollout(st, inputs["actions"], conditions, det)
                keys = list(traj.states[-1].tensors)
                states = State(
                    {k: torch.stack([s.tensors[k] for s in traj.states[1:]]) for k in keys}
                )
                preds = dict(traj.predictions or {})
            else:  # pragma: no cover - OPS and this dispatch are kept together
                raise CapabilityError(f"no runner for {op!r}")
        replies: list[Reply | WorldFluxRegistryError] = []
        start = 0
        for job in group:
            rows = slice(start, start + job.batch)
            start += job.batch
            axis1 = op == "rollout"

            def take(t: Tensor, axis1: bool = axis1, rows: slice = rows) -> Tensor:
                return (t[:, rows] if axis1 else t[rows]).clone()

            reply = Reply(session=job.session)
            if new_state is not None:
                mine = State({k: v[rows].clone() for k, v in new_state.tensors.items()})
                if job.session is not None:
                    self._sessions.states[job.session] = mine
                if job.request.return_state or job.session is None:
                    reply.state = mine
            if states is not None:
                reply.states = State({k: take(v) for k, v in states.tensors.items()})
            reply.predictions = {k: take(v) for k, v in preds.items()}
            replies.append(reply)
        return replies
