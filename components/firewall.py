"""Per host: its rendered rules and the ONE `pulumi-command` `local.Command` that pushes and confirms them.

A host's whole push is one run of `enclave.pushrun` on the operator's machine (the module explains the run;
the lab runs exactly the same command line). This module only wires it into Pulumi, and what it relies on
from pulumi-command 1.2.1 (provider/pkg/provider/local/*.go, common/inputs.go) and the Pulumi engine is:

- **cwd.** `create` is the relative `COMMAND` (`.venv/bin/python -m enclave.pushrun`), no `dir`. A local
  command without `dir` runs in the provider's working directory (`cmd.Dir, err = os.Getwd()` in
  commandOutputs.go `run`), and the engine starts every provider plugin in the project directory: `newPlugin(ctx,
  ctx.Pwd, …)` sets `cmd.Dir = pwd` (sdk/go/common/resource/plugin/plugin.go, provider_plugin.go), with
  `Pwd` from `GetPwdMain()`, the directory of Pulumi.yaml since it sets no `main`. The program itself runs in
  that same directory, so `stack_config.read_stack_settings` checks there that `.venv/bin/python` exists and
  stops with the fix (`make setup`) if not. No absolute path of this machine is ever an input: two operators
  in two checkouts do not re-push each other's hosts.
- **re-runs.** No `update` and no `triggers`: a change of `stdin` or `environment` is an *update*, and an
  update without `update` runs `create` again (`Update` in commandController.go: `cmd := news.Create`). An
  update starts from the previous outputs (`BaseOutputs: olds.BaseOutputs`), and `run` puts their stdout in
  the environment as PULUMI_COMMAND_STDOUT (`addPreviousOutputInEnv`, default true, set here explicitly): the
  previous run's JSON line, which names the bastion the host was last confirmed through. `triggers` are
  `replaceOnChanges`: a replacement would `Create` from empty outputs and lose that line.
- **failures.** A run that exits non-zero fails the step: `Create` returns the error with no partial state (the
  resource is not recorded, so the next `up` creates it again) and a failed `Update` leaves the old inputs in
  state (so the next `up` sees the same change and runs again). Nothing marks a failed push as done.
- **secrets.** `environment` (the private key, and the previous one while rotating) is one secret Output, so
  the engine stores the input encrypted; pulumi-command echoes inputs as outputs (`CommandOutputs` embeds
  `CommandInputs`), and pulumi-go-provider's default secret flow (infer/resource.go `ensureDefaultSecrets`:
  an output named like an input takes its secretness) keeps that copy encrypted too. `stdin` holds no secret.
- **delete.** No `delete`: when a droplet goes away there is nothing to undo on it.

Why a push re-runs exactly when its host's rules change: `stdin` is the host's `PushRequest`, rendered only
from the addresses that host's rules contain (`RuleFiles.peers`, which the renderer reports itself, so this can
never disagree with the rule logic in enclave.render), plus its own address and the bastions'. Adding a
WordPress server therefore changes the requests of the hosts that accept from WordPress or send to it, and no
other, even in `pulumi preview`, where a new droplet's addresses are still unknown.

For users: docs/operations.md#a-push-from-pulumis-side and docs/how-a-push-works.md.
"""

from __future__ import annotations

import types
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import pulumi
from pulumi_command import local

from enclave.compiler import Addresses, Host, Policy
from enclave.pushrun import COMMAND, PushRequest
from enclave.resource_names import push_resource_name
from enclave.render import Renderer, RuleFiles

T = TypeVar("T")

def without_dependencies(output: pulumi.Output[T]) -> pulumi.Output[T]:
    """The same value, known-ness and secretness, but no resources to depend on.

    Used for peers' addresses: a push needs their *values* (the Output still waits for them, and in a preview
    stays unknown while a new droplet's address is), not engine edges to every peer droplet. The SDK turns every
    resource an input carries into a dependency one by one, copying the resource's dependency set each time
    (pulumi/runtime/resource_cycle_breaker.py `_add_dep`), so a push carrying P peers cost O(P^2) and the fleet
    O(hosts x peers^2) (docs/benchmarks.md has the figure). Dropping the edges is safe for a push: it has no `delete`, so the
    deletion order is moot, and its run can only start once its request (peers included) is known.
    """
    future = cast(Awaitable[T], output.future())
    return pulumi.Output(set(), future, output.is_known(), output.is_secret())


# ------------------------------------------------------------------------------------------- rules


class HostRuleFiles:
    """The rule files of every host of one stack, each rendered once the addresses of its rule peers (and
    only those) are known.

    Peers usually come as whole roles (an ipset per source role), so the addresses of a role are joined once,
    stripped of their droplet dependencies, and shared: a large fleet costs one join per role, and each push
    carries one value per peer role rather than one dependency per peer droplet. Hosts that name the same peer
    roles (every host of a role, usually) share one Renderer, so a role's set contents are built once, not once
    per host.
    """

    def __init__(
        self,
        policy: Policy,
        addresses: dict[str, pulumi.Output[Addresses]],
        stack_name: str,
        stand_ins: Mapping[str, RuleFiles],
    ) -> None:
        """`stand_ins`: every host's files rendered with any addresses (the plan's example ones): which hosts'
        addresses a host's rules contain does not depend on the addresses themselves, so they answer it for
        every host before any droplet exists."""
        self.policy = policy
        self.addresses = addresses
        self.stack_name = stack_name
        self._peers = {name: files.peers for name, files in stand_ins.items()}
        self._role_addresses: dict[str, pulumi.Output[Mapping[str, Any]]] = {}
        # keyed by the identities of the joined address maps a host's rules need; the maps are kept with their
        # Renderer so an id is never reused while its entry lives
        self._renderers: dict[tuple[int, ...], tuple[list[Mapping[str, Addresses]], Renderer]] = {}
        self._shared_parts: dict[int, list[pulumi.Output[Mapping[str, Any]]]] = {}  # by id of a peers tuple in _peers

    def _joined(self, names: Sequence[str]) -> pulumi.Output[Mapping[str, Any]]:
        joined = pulumi.Output.all(**{name: self.addresses[name] for name in names})
        # A read-only view, not a dict: the SDK walks every dict inside an Output.all looking for nested
        # Outputs, which made each push re-walk its peers' whole address map (docs/benchmarks.md: the saving).
        return without_dependencies(joined.apply(types.MappingProxyType))

    def _role(self, role: str) -> pulumi.Output[Mapping[str, Any]]:
        if role not in self._role_addresses:
            self._role_addresses[role] = self._joined([h.name for h in self.policy.hosts if h.role == role])
        return self._role_addresses[role]

    def _renderer(self, parts: list[Mapping[str, Addresses]]) -> Renderer:
        key = tuple(id(part) for part in parts)
        if key not in self._renderers:
            known = {name: address for part in parts for name, address in part.items()}
            self._renderers[key] = (parts, Renderer(self.policy, known, self.stack_name))
        return self._renderers[key][1]

    def _parts(self, peers: tuple[str, ...]) -> tuple[list[pulumi.Output[Mapping[str, Any]]], bool]:
        """The joined address maps that `peers` (a host's rule peers) come from, whole roles then singles, and
        whether they are whole roles only (then any host with these peers may share them)."""
        by_role: dict[str, list[str]] = {}
        for name in peers:
            by_role.setdefault(self.policy.host_by_name[name].role, []).append(name)
        parts: list[pulumi.Output[Mapping[str, Any]]] = []
        single: list[str] = []
        for role, names in sorted(by_role.items()):  # one order for every host: one Renderer per peer roles
            if len(names) == self.policy.stack.roles[role].count:
                parts.append(self._role(role))
            else:
                single += names
        if single:
            parts.append(self._joined(single))
        return parts, not single

    def files(self, host: Host) -> pulumi.Output[RuleFiles]:
        def render(parts: list[Mapping[str, Addresses]]) -> RuleFiles:
            return self._renderer(parts).render(host)

        peers = self._peers[host.name]
        # The plan's renderer hands every host with the same peers the same tuple: group them once per tuple
        # (grouping 1 500 peers for each of 3 000 hosts took seconds). Only whole roles are shared; a host naming
        # single peers gets its own join.
        key = id(peers)
        if key not in self._shared_parts:
            parts, shareable = self._parts(peers)
            if not shareable:
                return self._render_when_known(parts, render)
            self._shared_parts[key] = parts
        return self._render_when_known(self._shared_parts[key], render)

    @staticmethod
    def _render_when_known(
        parts: list[pulumi.Output[Mapping[str, Any]]], render: Callable[[list[Mapping[str, Addresses]]], RuleFiles]
    ) -> pulumi.Output[RuleFiles]:
        if not parts:
            return pulumi.Output.from_input(render([]))
        return pulumi.Output.all(*parts).apply(render)


# -------------------------------------------------------------------------------------------- push


def push_request(
    request: Callable[[RuleFiles, str, tuple[str, ...]], PushRequest],
    files: pulumi.Output[RuleFiles],
    address: pulumi.Output[str],
    bastions: Sequence[pulumi.Output[str]],
) -> pulumi.Output[str]:
    """The command's stdin: `request(rules, address, bastions)` once the droplets know them. Its resources are
    the host's own droplet and the bastions' (the addresses it dials); the peers in `files` carry none."""

    def complete(values: list[Any]) -> str:
        rules, dial, *jumps = values
        return request(rules, dial, tuple(jumps)).to_stdin()

    return pulumi.Output.all(files, address, *bastions).apply(complete)


def push_command(
    droplet: str,
    *,
    request: pulumi.Output[str],
    environment: pulumi.Output[Mapping[str, str]],
    after: Sequence[pulumi.Resource],
    parent: pulumi.Resource,
) -> local.Command:
    """One host's push: `<droplet>-push`, running COMMAND with the request on stdin (see the module docstring
    for what each argument relies on). `after`: the pushes that must be confirmed first (the bastions')."""
    return local.Command(
        push_resource_name(droplet),
        create=COMMAND,
        stdin=request,
        environment=environment,
        add_previous_output_in_env=True,
        opts=pulumi.ResourceOptions(parent=parent, depends_on=list(after)),
    )
