"""The Pulumi program under the SDK's mocks: what `pulumi up` would create, push and export for a stack.

Each test runs the real `__main__.py` (tests/pulumi_harness.py) and checks the registrations the engine would
receive, against the core (compile_policy, Renderer, PushRequest, ssh_config, build_plan) for the mocked
addresses.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from enclave import audit
from enclave.resource_names import push_resource_name
from config.schema import StackError
from config.stackfile import Stack
from enclave.cloudfirewall import cloud_firewalls, role_tag
from enclave.compiler import compile_policy
from enclave.plan import build_plan, droplet_name
from enclave.push import BASTION_MAX_STARTUPS, cloud_config, push_script
from enclave.pushrun import COMMAND, ENV_PREVIOUS_PRIVATE_KEY, ENV_PRIVATE_KEY, PushRequest
from enclave.render import Renderer, RuleFiles, baseline_files
from enclave.sshconfig import jump_host, ssh_config

from ..conftest import stack_document
from ..pulumi_harness import (
    ROOT,
    TEST_PRIVATE_KEY,
    ProgramRun,
    _keypair,
    Registration,
    droplet_public,
    enclave_config,
    is_secret,
    is_unknown,
    mocked_addresses,
    plain_strings,
    pulumi_config,
    run_program,
    stack_config_map,
)

NETWORK = "enclave:index:EnclaveNetwork"
VPC = "digitalocean:index/vpc:Vpc"
SSH_KEY = "digitalocean:index/sshKey:SshKey"
DROPLET = "digitalocean:index/droplet:Droplet"
PUSH = "command:local:Command"
REMOTE_COMMAND = "command:remote:Command"
FIREWALL = "digitalocean:index/firewall:Firewall"
RESERVED_IP = "digitalocean:index/reservedIp:ReservedIp"
# Not a usable key either; what the previous key of a rotation looks like.
OLD_PRIVATE_KEY = TEST_PRIVATE_KEY.replace("b3BlbnNzaC1rZXkt", "b2xkLWtleS1vbGQt")


def run_ok(stack_name: str, config: dict[str, str], **kwargs: Any) -> ProgramRun:
    run = run_program(stack_name, config, **kwargs)
    assert run.error is None, run.error
    return run


def request(push: Registration) -> PushRequest:
    """What the push's run reads on stdin (stored in plain text: it must hold no secret)."""
    stdin = push.inputs["stdin"]
    assert isinstance(stdin, str), f"{push.name}: stdin is {stdin!r}"
    return PushRequest.from_stdin(stdin)


def environment(push: Registration) -> dict[str, str]:
    value = push.inputs["environment"]
    assert is_secret(value), f"{push.name}: the environment holds the private key and must be a secret"
    inner: dict[str, str] = value["value"]
    return inner


def host_of(push_name: str, stack_name: str = "prod") -> str:
    """`prod-mysql-1-push` -> `mysql-1`."""
    return push_name.removeprefix(f"{stack_name}-").removesuffix("-push")


def config_with(name: str, edit: Any) -> dict[str, str]:
    document = stack_document(name)
    edit(document["config"])
    return pulumi_config(document)


def droplet_dependencies(run: ProgramRun, push: Registration) -> set[str]:
    droplets = {r.urn: r.name for r in run.of_type(DROPLET)}
    return {droplets[d] for d in push.dependencies if d in droplets}


# ------------------------------------------------------------------------------------------ resources


@pytest.mark.parametrize("stack_name", ["dev", "prod"])
def test_resources_for_each_stack(stack_name: str) -> None:
    """One VPC, one key, a droplet and ONE push (a local command) per host, a reserved IP per bastion, all inside
    the stack's EnclaveNetwork; no NAT gateway (no role has `public: false`)."""
    config = stack_config_map(stack_name)
    stack = enclave_config(config)
    policy = compile_policy(stack)
    run = run_ok(stack_name, config)

    counts: dict[str, int] = {}
    for r in run.registrations:
        counts[r.type] = counts.get(r.type, 0) + 1
    n = len(policy.hosts)
    assert n == sum(role.count for role in stack.roles.values())
    bastions = len(policy.bastion_hosts())
    assert counts == {NETWORK: 1, VPC: 1, SSH_KEY: 1, DROPLET: n, PUSH: n, RESERVED_IP: bastions}
    assert REMOTE_COMMAND not in counts

    network = run.of_type(NETWORK)[0]
    for r in run.registrations:
        if r.type != NETWORK:
            assert r.parent == network.urn, r.name
    # the URN `enclave audit` prints in its `pulumi up --target '<urn>'` fix is the one the engine registers
    pushes = run.by_name(PUSH)
    assert set(pushes) == {push_resource_name(droplet_name(stack_name, h)) for h in policy.hosts}
    for h in policy.hosts:
        push = pushes[push_resource_name(droplet_name(stack_name, h))]
        fix = audit.repush_command(Stack(stack_name, enclave_config(config)), h.name, droplet_name(stack_name, h))
        assert fix.endswith(f" && pulumi up --stack {stack_name} --target '{push.urn}'")

    vpc = run.of_type(VPC)[0].inputs
    assert vpc["ipRange"] == str(stack.vpc_ip_range) and vpc["region"] == stack.region
    key = run.of_type(SSH_KEY)[0].inputs
    assert key["publicKey"] == stack.ssh_public_key

    droplets = run.by_name(DROPLET)
    assert set(droplets) == {droplet_name(stack_name, h) for h in policy.hosts}
    for host in policy.hosts:
        role = stack.roles[host.role]
        d = droplets[droplet_name(stack_name, host)]
        assert d.inputs["name"] == f"{stack_name}-{host.role}-{host.index}"
        assert d.inputs["size"] == role.size and d.inputs["image"] == (role.image or stack.image)
        assert d.inputs["region"] == stack.region
        assert d.inputs["vpcUuid"] == f"enclave-{stack_name}-id"  # the mocked id of this stack's Vpc
        assert d.inputs["ipv6"] is role.ipv6
        assert len(d.inputs["sshKeys"]) == 1 and ":" in d.inputs["sshKeys"][0]  # the SshKey's fingerprint
        assert d.inputs["tags"][:3] == ["enclave", f"enclave-{stack_name}", f"enclave-{stack_name}-{host.role}"]
        assert d.inputs["tags"][3:] == role.tags
        # droplets boot closed: cloud-init applies the role's baseline, which names no peer; bastions raise
        # sshd's MaxStartups for the pushes that all arrive at once
        assert d.inputs["userData"] == cloud_config(
            baseline_files(stack, host.role), ssh_user=stack.ssh_user, ssh_public_key=stack.ssh_public_key,
            bastion=role.bastion,
        )
        # (apply.sh, in every user data, has the drop-in's code; only a bastion's boot passes it a value)
        assert (f"MAX_STARTUPS={BASTION_MAX_STARTUPS}" in d.inputs["userData"]) is role.bastion
        # a new cloud-init baseline (or key) applies to new droplets, never rebuilds running ones
        assert "userData" in d.ignore_changes


@pytest.mark.parametrize("stack_name", ["dev", "prod"])
def test_each_push_runs_pushrun_with_the_compilers_rules_bastions_first(stack_name: str) -> None:
    config = stack_config_map(stack_name)
    stack = enclave_config(config)
    policy = compile_policy(stack)
    addresses = mocked_addresses(stack_name, stack)
    known = {h.name: addresses[droplet_name(stack_name, h)] for h in policy.hosts}
    renderer = Renderer(policy, known, stack_name)
    run = run_ok(stack_name, config)

    jump = jump_host(policy)
    assert jump is not None and jump.role == "tunnel"
    bastions = policy.bastion_hosts()
    pushes = run.by_name(PUSH)
    bastion_pushes = {pushes[push_resource_name(droplet_name(stack_name, b))].urn for b in bastions}
    for host in policy.hosts:
        push = pushes[push_resource_name(droplet_name(stack_name, host))]
        # one run of the shared module, relative to the project directory; re-run on change, nothing on delete
        assert push.inputs["create"] == COMMAND and "update" not in push.inputs and "delete" not in push.inputs
        assert "triggers" not in push.inputs and "dir" not in push.inputs  # a replace would lose the last stdout
        assert push.inputs["addPreviousOutputInEnv"] is True
        assert environment(push) == {ENV_PRIVATE_KEY: TEST_PRIVATE_KEY}
        got = request(push)
        assert got.stack == stack_name and got.host == host.name and got.user == stack.ssh_user
        assert got.files == renderer.render(host)  # exactly what the compiler renders for these addresses
        assert got.baseline == baseline_files(stack, host.role)  # the push refreshes the host's baseline
        assert got.public_key == stack.ssh_public_key and got.deadline_s == stack.push_timeout == 600
        # a bastion is pushed on its droplet's own public address, not its reserved IP (components/network.py:
        # the fallback to the previous run's bastion must reach the replaced droplet)
        if stack.roles[host.role].bastion:
            assert got.address == droplet_public(known[host.name]) != known[host.name].public and got.bastions == ()
            assert not bastion_pushes & set(push.dependencies)
        else:
            assert got.address == known[host.name].private
            # every bastion's own public address, the one ssh_config jumps through first (bastion replacement)
            assert got.bastions == tuple(droplet_public(known[b.name]) for b in bastions)
            assert got.bastions[0] == droplet_public(known[jump.name])
            # the bastions' pushes (which confirm before they exit) come first
            assert bastion_pushes <= set(push.dependencies), f"{host.name} is pushed before its bastion"


def test_without_a_bastion_every_host_is_pushed_on_its_public_address() -> None:
    def no_bastion(config: dict[str, Any]) -> None:
        config["enclave:roles"]["tunnel"]["bastion"] = False
        config["enclave:tests"] = []

    config = config_with("dev", no_bastion)
    policy = compile_policy(enclave_config(config))
    addresses = mocked_addresses("dev", enclave_config(config))
    renderer = Renderer(policy, {h.name: addresses[f"dev-{h.name}"] for h in policy.hosts}, "dev")
    run = run_ok("dev", config)
    pushes = run.by_name(PUSH)
    assert len(pushes) == len(policy.hosts)
    for host in policy.hosts:
        push = pushes[f"dev-{host.name}-push"]
        got = request(push)
        assert got.address == addresses[f"dev-{host.name}"].public and got.bastions == ()
        # tunnel-1 now names no peer in its rules: its request is rendered without waiting for any address
        assert got.files == renderer.render(host)
        assert not set(push.dependencies) & {p.urn for p in pushes.values()}  # no push waits for another
    assert run.outputs["bastion"] is None


def test_scalar_settings_and_a_non_root_login() -> None:
    """Top-level scalars arrive as strings (logDrops "true", pushTimeout "900"); a non-root sshUser is the
    login every push request names (the host side uses sudo)."""

    def admin(config: dict[str, Any]) -> None:
        config["enclave:sshUser"] = "admin"
        config["enclave:logDrops"] = True
        config["enclave:pushTimeout"] = 900

    config = config_with("dev", admin)
    assert config["enclave:logDrops"] == "true" and config["enclave:pushTimeout"] == "900"
    run = run_ok("dev", config)
    for push in run.of_type(PUSH):
        got = request(push)
        assert got.user == "admin" and got.deadline_s == 900
        assert 'LOG --log-prefix "enclave-drop: "' in got.files.ipv4
    assert "User admin" in run.outputs["sshConfig"]
    # DigitalOcean installs the key for root only: cloud-init creates the login with the key and sudo
    public_key = enclave_config(config).ssh_public_key
    for droplet in run.of_type(DROPLET):
        users = yaml.safe_load(droplet.inputs["userData"])["users"]
        assert [(u["name"], u["ssh_authorized_keys"], u["sudo"]) for u in users if isinstance(u, dict)] == [
            ("admin", [public_key], "ALL=(ALL) NOPASSWD:ALL")
        ]


def test_cloud_firewalls_when_enabled() -> None:
    """One DigitalOcean firewall per role, as enclave.cloudfirewall specifies, created after the droplets."""

    def enable(config: dict[str, Any], wordpress: int = 2) -> None:
        config["enclave:cloudFirewall"] = True
        config["enclave:roles"]["wordpress"]["count"] = wordpress
        config["enclave:roles"]["mysql"]["ingress"].append({"from": "mysql-2", "ports": ["tcp/4567"]})

    config = config_with("prod", enable)
    stack = enclave_config(config)
    specs = {fw.name: fw for fw in cloud_firewalls("prod", compile_policy(stack))}
    run = run_ok("prod", config)
    firewalls = run.by_name(FIREWALL)
    assert set(firewalls) == set(specs) == {f"enclave-prod-{role}" for role in stack.roles}

    droplets = run.by_name(DROPLET)
    for name, firewall in firewalls.items():
        spec = specs[name]
        assert firewall.parent == run.of_type(NETWORK)[0].urn
        assert firewall.inputs["tags"] == list(spec.tags) == [role_tag("prod", spec.role)]
        rules = firewall.inputs["inboundRules"]
        assert len(rules) == len(spec.inbound_rules)
        for got, want in zip(rules, spec.inbound_rules):
            assert got["protocol"] == want.protocol and got.get("portRange") == want.port_range
            assert got.get("sourceAddresses", []) == list(want.source_addresses)
            assert got.get("sourceTags", []) == list(want.source_tags)
            assert got.get("sourceDropletIds", []) == [int(droplets[f"prod-{h}"].id) for h in want.source_hosts]
        assert len(firewall.inputs["outboundRules"]) == len(spec.outbound_rules)
        assert {d.urn for d in droplets.values()} <= set(firewall.dependencies)  # tags exist once droplets do
    assert any(r.get("sourceDropletIds") for r in firewalls["enclave-prod-mysql"].inputs["inboundRules"])
    for droplet in droplets.values():
        role = droplet.name.removeprefix("prod-").rpartition("-")[0]
        assert role_tag("prod", role) in droplet.inputs["tags"]

    scaled = run_ok("prod", config_with("prod", lambda c: enable(c, wordpress=3))).by_name(FIREWALL)
    assert {n: f.inputs for n, f in scaled.items()} == {n: f.inputs for n, f in firewalls.items()}


# -------------------------------------------------------------------------------------------- outputs


def test_outputs_hosts_bastion_ssh_config_and_flows() -> None:
    config = stack_config_map("prod")
    stack = enclave_config(config)
    policy = compile_policy(stack)
    addresses = mocked_addresses("prod", stack)
    known = {h.name: addresses[droplet_name("prod", h)] for h in policy.hosts}
    run = run_ok("prod", config)

    assert run.outputs["hosts"] == {
        h.name: {
            "role": h.role,
            "droplet": f"prod-{h.name}",
            "public": known[h.name].public,
            "private": known[h.name].private,
            "public6": known[h.name].public6,
        }
        for h in policy.hosts
    }
    assert run.outputs["hosts"]["mysql-1"]["public6"] and run.outputs["hosts"]["wordpress-1"]["public6"] is None
    assert run.outputs["bastion"] == known["tunnel-1"].public
    ssh = run.outputs["sshConfig"]
    assert ssh == ssh_config("prod", policy, known, "root", identity_file="~/.ssh/enclave-prod")
    assert f"Host prod-mysql-1\n  HostName {known['mysql-1'].private}" in ssh and "ProxyJump prod-tunnel-1" in ssh
    plan = build_plan(Stack("prod", stack), known)
    assert run.outputs["flows"] == plan.to_json()["flows"]
    assert any(f["from"] == "wordpress" and f["to"] == "mysql" and f["ports"] == ["tcp/3306"] for f in run.outputs["flows"])


def _rotating(config: dict[str, Any]) -> None:
    config["enclave:sshPreviousPrivateKey"] = OLD_PRIVATE_KEY


def test_the_private_keys_stay_secret_and_no_input_names_this_machine() -> None:
    """What `pulumi stack export` would show in clear: no key, no path of the operator's checkout."""
    run = run_ok("prod", config_with("prod", _rotating))
    pushes = run.of_type(PUSH)
    assert pushes
    home = str(Path.home())
    for push in pushes:
        # both keys reach the push, only inside the one secret input
        assert environment(push) == {ENV_PRIVATE_KEY: TEST_PRIVATE_KEY, ENV_PREVIOUS_PRIVATE_KEY: OLD_PRIVATE_KEY}
        # relative to the project directory: another checkout (or colleague) runs the very same inputs
        assert not push.inputs["create"].startswith(("/", "~"))
        decoded = repr(request(push))  # the rule files, unpacked
        assert str(ROOT) not in decoded and home not in decoded
    for r in run.registrations:
        for text in plain_strings(r.inputs):
            for secret in (TEST_PRIVATE_KEY.strip(), OLD_PRIVATE_KEY.strip()):
                assert secret not in text, r.name
            assert str(ROOT) not in text and home not in text, r.name
    assert TEST_PRIVATE_KEY.strip() not in json.dumps(run.outputs)
    assert not any("PRIVATE KEY" in line for line in run.log)


def test_push_inputs_are_small() -> None:
    """The stored request carries the rule files compressed, not the push script, once."""
    stack = enclave_config(stack_config_map("prod"))
    run = run_ok("prod", stack_config_map("prod"))
    for push in run.of_type(PUSH):
        got = request(push)
        script = push_script(got.files, "prod")
        assert len(push.inputs["stdin"]) < len(script) / 2, push.name
        assert got.baseline == baseline_files(stack, host_of(push.name).rpartition("-")[0])


def test_key_rotation_gives_every_push_both_keys_and_re_runs_them() -> None:
    """Rotating: the previous key joins the environment (each push logs in with whichever works and installs
    the new public key, which is in its request), so every push runs again."""
    before = run_ok("prod", stack_config_map("prod")).by_name(PUSH)
    new_private, new_public = _keypair("new@enclave")  # the new pair; the one pushed so far becomes the previous

    def rotate(config: dict[str, Any]) -> None:
        config["enclave:sshPreviousPrivateKey"] = TEST_PRIVATE_KEY
        config["enclave:sshPrivateKey"] = new_private
        config["enclave:sshPublicKey"] = new_public

    after = run_ok("prod", config_with("prod", rotate)).by_name(PUSH)
    assert set(after) == set(before)
    for name, push in after.items():
        assert request(push).public_key == new_public
        assert ENV_PREVIOUS_PRIVATE_KEY in environment(push) and ENV_PREVIOUS_PRIVATE_KEY not in environment(before[name])
        assert push.inputs["stdin"] != before[name].inputs["stdin"]


def test_the_re_push_audit_prints_is_an_update_of_that_host_alone() -> None:
    """What `enclave audit` prints for a drifted host (raise its repush counter, `pulumi up --target` its push)
    changes that push's stdin and nothing else: pulumi-command runs it as an update (no triggers, no
    replaceOnChanges), which hands the run PULUMI_COMMAND_STDOUT, so the bastion fallback is kept; a replace
    would Create from empty outputs. Applying it twice raises the counter again."""
    config = stack_config_map("prod")
    before = run_ok("prod", config).by_name(PUSH)
    fixes = []
    for round_ in (1, 2):
        stack = Stack("prod", enclave_config(config))
        fix = audit.repush_command(stack, "mysql-1", "prod-mysql-1")
        fixes.append(fix)
        setting = fix.split(" && ")[0]
        assert setting == f"pulumi config set --stack prod --path 'repush[\"mysql-1\"]' {round_}"
        config = {**config, "enclave:repush": json.dumps({"mysql-1": round_})}  # what that `config set` stores
        after = run_ok("prod", config).by_name(PUSH)
        for name, push in after.items():
            changed = {k for k in push.inputs if push.inputs[k] != before[name].inputs[k]}
            assert changed == ({"stdin"} if name == "prod-mysql-1-push" else set()), (name, changed)
            assert "triggers" not in push.inputs and push.inputs["addPreviousOutputInEnv"] is True
        assert request(after["prod-mysql-1-push"]).repush == round_
        assert dataclasses.replace(request(after["prod-mysql-1-push"]), repush=round_ - 1) == request(before["prod-mysql-1-push"])
        before = after
    assert fixes[0] != fixes[1]


def test_a_re_push_counter_of_no_such_host_is_refused() -> None:
    config = {**stack_config_map("prod"), "enclave:repush": json.dumps({"mysql-9": 1})}
    run = run_program("prod", config)
    assert run.registrations == []
    assert "enclave:repush.mysql-9: no host 'mysql-9'" in str(run.error), run.error


def test_the_push_command_needs_the_project_venv() -> None:
    """pulumi-command runs `.venv/bin/python` from the project directory: elsewhere, the program stops first."""
    run = run_program("prod", stack_config_map("prod"), cwd=ROOT / "docs")
    assert run.registrations == []
    assert run.error is not None and "(project directory)" in str(run.error) and "make setup" in str(run.error)


# -------------------------------------------------------------------------------------------- scaling


def _wordpress(count: int) -> dict[str, str]:
    return config_with("prod", lambda c: c["enclave:roles"]["wordpress"].update(count=count))


def _mysql(count: int) -> dict[str, str]:
    return config_with("prod", lambda c: c["enclave:roles"]["mysql"].update(count=count))


@pytest.mark.parametrize(
    ("scale", "changed"),
    [
        # accept from wordpress (mysql, wordpress's own gluster ports) or send to it (restricted haproxy)
        (_wordpress, {"haproxy-www-1", "wordpress-1", "wordpress-2", "mysql-1", "mysql-2"}),
        (_mysql, {"mysql-1", "mysql-2"}),  # only mysql accepts from mysql; nobody restricted sends to it
    ],
    ids=["wordpress", "mysql"],
)
def test_scaling_2_to_3_is_additive_and_re_pushes_only_hosts_whose_peers_changed(
    scale: Any, changed: set[str]
) -> None:
    before, after = run_ok("prod", scale(2)), run_ok("prod", scale(3))
    role = "wordpress" if scale is _wordpress else "mysql"

    old, new = before.by_name(DROPLET), after.by_name(DROPLET)
    assert set(new) - set(old) == {f"prod-{role}-3"} and set(old) <= set(new)  # 3 -> 2 removes the highest
    for name in old:
        assert new[name].inputs == old[name].inputs, f"{name} would be updated or replaced"
    for typ in (VPC, SSH_KEY):
        assert after.of_type(typ)[0].inputs == before.of_type(typ)[0].inputs

    # a push re-runs when its inputs change (pulumi-command's update runs `create` again)
    old_push, new_push = before.by_name(PUSH), after.by_name(PUSH)
    assert set(new_push) - set(old_push) == {f"prod-{role}-3-push"}
    re_pushed = {host_of(n) for n in old_push if new_push[n].inputs != old_push[n].inputs}
    assert re_pushed == changed
    for n in old_push:  # and only ever because the rules changed: same address, bastions, baseline, key
        got, was = request(new_push[n]), request(old_push[n])
        assert dataclasses.replace(got, files=was.files) == was
        assert (got.files != was.files) == (host_of(n) in changed)

    # the same answer from the core: the hosts whose rendered rules differ between the two stacks
    def rules(config: dict[str, str]) -> dict[str, RuleFiles]:
        stack = enclave_config(config)
        policy = compile_policy(stack)
        addresses = mocked_addresses("prod", stack)
        renderer = Renderer(policy, {h.name: addresses[f"prod-{h.name}"] for h in policy.hosts}, "prod")
        return {h.name: renderer.render(h) for h in policy.hosts}

    rules_before, rules_after = rules(scale(2)), rules(scale(3))
    assert {h for h in rules_before if rules_before[h] != rules_after[h]} == changed

    # Pushes depend on their peers per role, not per droplet: no push but its own depends on the new droplet
    # (which is what made 3 000 hosts cost the SDK's dependency bookkeeping quadratic time).
    for name, push in new_push.items():
        host = host_of(name)
        assert ("prod-" + f"{role}-3" in droplet_dependencies(after, push)) == (host == f"{role}-3"), name


def test_preview_of_scaling_shows_only_the_pushes_that_will_change() -> None:
    """In `pulumi preview` the new droplet's addresses are unknown: only pushes that need them are unknown."""
    applied = run_ok("prod", _wordpress(2)).by_name(PUSH)
    preview = run_program("prod", _wordpress(3), preview_creating={"prod-wordpress-3"})
    assert preview.error is None, preview.error
    pushes = preview.by_name(PUSH)
    unknown = {host_of(n) for n, c in pushes.items() if is_unknown(c.inputs["stdin"])}
    assert unknown == {"haproxy-www-1", "wordpress-1", "wordpress-2", "mysql-1", "mysql-2", "wordpress-3"}
    for name in ("prod-tunnel-1-push",):  # shown unchanged, secret environment included
        assert pushes[name].inputs == applied[name].inputs


# ------------------------------------------------------------------------------------------ bad stacks


def _bad_stack(config: dict[str, Any]) -> None:
    config["enclave:regoin"] = config.pop("enclave:region")  # misspelt: unknown key, and region missing
    config["enclave:roles"]["mysql"]["count"] = -1
    config["enclave:roles"]["wordpress"]["ingress"][0]["from"] = "haproxy"


def test_a_bad_stack_fails_before_any_resource_naming_every_key() -> None:
    document = stack_document("prod")
    _bad_stack(document["config"])
    config = pulumi_config(document, private_key=None)
    with pytest.raises(StackError) as schema_error:  # what the CLI reports for the same stack
        enclave_config(config)
    expected = [issue.path for issue in schema_error.value.issues] + ["enclave:sshPrivateKey"]
    assert {"enclave:regoin", "enclave:region", "enclave:roles.mysql.count"} <= set(expected)

    run = run_program("prod", config)
    assert run.registrations == []
    assert run.error is not None and type(run.error).__name__ == "InvalidStack"
    message = str(run.error)
    for path in expected:
        assert path in message
    assert "nothing was created" in message


def _public_key_as_private(config: dict[str, Any]) -> None:
    config["enclave:sshPrivateKey"] = "ssh-ed25519 AAAA ops@example"


def _failing_test(config: dict[str, Any]) -> None:
    config["enclave:tests"].append({"from": "internet", "to": "mysql", "port": "tcp/3306", "expect": "allow"})


def _broken_fleet_invariant(config: dict[str, Any]) -> None:
    # the policy's stand-in outsider is outside 203.0.113.0/24, so only the proof for every packet fails it
    config["enclave:roles"]["mysql"]["ingress"].append({"from": "203.0.113.0/24", "ports": ["tcp/9104"]})
    config["enclave:tests"].append({"from": "outside", "to": "mysql", "port": "any", "expect": "deny"})


def _too_many_cloud_firewall_rules(config: dict[str, Any]) -> None:
    config["enclave:cloudFirewall"] = True
    config["enclave:roles"]["mysql"]["ingress"].append({"from": "wordpress", "ports": [f"tcp/{p}" for p in range(5000, 5060)]})


def _too_many_rules_per_host(config: dict[str, Any]) -> None:
    config["enclave:roles"]["haproxy-www"]["ingress"] = [
        {"from": [f"203.0.{i}.0/24" for i in range(21)], "ports": [f"tcp/{p}" for p in range(5000, 5100)]}
    ]


def _unchanged(config: dict[str, Any]) -> None:
    pass


def _previous_key_as_public(config: dict[str, Any]) -> None:
    config["enclave:sshPreviousPrivateKey"] = "ssh-ed25519 AAAA old@example"


def _short_push_timeout(config: dict[str, Any]) -> None:
    config["enclave:pushTimeout"] = 5


@pytest.mark.parametrize(
    ("stack_name", "edit", "secret_keys", "expected"),
    [
        ("prod", _public_key_as_private, None, "enclave:sshPrivateKey: is not a private key"),
        ("prod", _unchanged, ["digitalocean:token"], "enclave:sshPrivateKey: is stored in plain text"),
        ("prod", _failing_test, None, "enclave:tests[10]: tests[10]: internet -> mysql tcp/3306 expect allow"),
        ("prod", _broken_fleet_invariant, None, "enclave:tests[10]: tests[10]: outside -> mysql any expect deny, but "
         "the rules make it mixed for some packets, e.g. IPv4 in eth0 203.0.113.0 -> "),
        ("Prod_1", _unchanged, None, "(stack name): 'Prod_1'"),
        ("prod", _too_many_cloud_firewall_rules, None, "enclave:roles.mysql.ingress: with enclave:cloudFirewall"),
        ("prod", _previous_key_as_public, None, "enclave:sshPreviousPrivateKey: is not a private key"),
        ("prod", _rotating, ["enclave:sshPrivateKey"], "enclave:sshPreviousPrivateKey: is stored in plain text"),
        ("prod", _short_push_timeout, None, "enclave:pushTimeout: '5' is too small; the lowest allowed is 60"),
        ("prod", _too_many_rules_per_host, None, "enclave:roles.haproxy-www.ingress: its hosts would get 2111 rules"),
    ],
    ids=[
        "public-key-as-private",
        "key-not-secret",
        "failing-stack-test",
        "fleet-invariant-proved-false",
        "stack-name",
        "cloud-firewall-limit",
        "previous-key-as-public",
        "previous-key-not-secret",
        "push-timeout-too-short",
        "rules-per-host-limit",
    ],
)
def test_the_program_refuses(stack_name: str, edit: Any, secret_keys: list[str] | None, expected: str) -> None:
    config = config_with("prod", edit)
    run = run_program(stack_name, config, secret_keys=secret_keys, addresses={})
    assert run.registrations == []
    assert run.error is not None and expected in str(run.error), run.error
    for secret in (TEST_PRIVATE_KEY.strip(), OLD_PRIVATE_KEY.strip(), "AAAA"):
        assert secret not in str(run.error)


def test_the_shipped_stacks_are_refused_before_any_resource() -> None:
    """Skipping the README's key and operators steps stops the program, naming both, before any droplet exists
    (it used to create them, then wait 600 s per push for a key nobody holds)."""
    for name in ("prod", "dev"):
        run = run_program(name, pulumi_config(stack_document(name), as_shipped=True))
        assert run.registrations == []
        message = str(run.error)
        assert "enclave:sshPublicKey: is the shipped example key" in message, message
        assert "enclave:operators: 198.51.100.7/32 is a documentation address" in message, message
        assert "ssh-keygen -t ed25519" in message and "pulumi config set --path 'enclave:operators[0]'" in message


def test_a_public_key_that_is_not_the_private_keys_is_refused() -> None:
    _, other_public = _keypair("someone-else@enclave")

    def other(config: dict[str, Any]) -> None:
        config["enclave:sshPublicKey"] = other_public

    run = run_program("prod", config_with("prod", other))
    assert run.registrations == []
    assert "enclave:sshPublicKey: is not the public key of enclave:sshPrivateKey" in str(run.error), run.error
    assert TEST_PRIVATE_KEY.strip() not in str(run.error)


def test_a_plaintext_token_is_refused() -> None:
    run = run_program("prod", stack_config_map("prod"), secret_keys=["enclave:sshPrivateKey"])
    assert run.registrations == []
    message = str(run.error)
    assert "digitalocean:token: is stored in plain text" in message and "dop_v1_test" not in message, message
    assert "`pulumi config set --secret digitalocean:token` (no value: it reads the token from stdin)" in message
    assert "export DIGITALOCEAN_TOKEN" in message


def test_a_push_depends_on_the_droplets_it_dials_not_on_its_peers() -> None:
    """Peers' addresses are values in the request, not dependencies on every peer droplet: a push's engine
    dependencies are its own droplet, the bastions' (which it dials through) and the bastions' pushes."""
    run = run_ok("prod", stack_config_map("prod"))
    policy = compile_policy(enclave_config(stack_config_map("prod")))
    bastions = {droplet_name("prod", b) for b in policy.bastion_hosts()}
    for push in run.of_type(PUSH):
        own = push.name.removesuffix("-push")
        assert droplet_dependencies(run, push) == ({own} | bastions if own not in bastions else {own}), push.name
    assert request(run.by_name(PUSH)["prod-mysql-1-push"]).files.peers  # though its rules name peers
