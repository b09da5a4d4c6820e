"""Bad stack files: each is rejected before anything is created, with a message naming the key to edit."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from config.schema import StackError
from config.stackfile import Stack, load_stack_file
from enclave.compiler import compile_policy
from enclave.limits import check_limits
from enclave.cli import main
from enclave.ipsets import base_name

from ..conftest import STACKS, stack_document

Doc = dict[str, Any]
ROOT_PROD = STACKS / "Pulumi.prod.yaml"


def roles(doc: Doc) -> Doc:
    result: Doc = doc["config"]["enclave:roles"]
    return result


def set_key(key: str, value: Any) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        doc["config"][key] = value

    return mutate


def drop_key(key: str) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        del doc["config"][key]

    return mutate


def role_key(role: str, key: str, value: Any) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        roles(doc)[role][key] = value

    return mutate


def ingress(role: str, rule: Any) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        roles(doc)[role]["ingress"] = [rule]

    return mutate


def add_role(name: str, spec: Any) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        roles(doc)[name] = spec

    return mutate


def policy_test(entry: Any) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        doc["config"]["enclave:tests"] = [entry]

    return mutate


def small_vpc_many_hosts(doc: Doc) -> None:
    doc["config"]["enclave:vpcIpRange"] = "10.110.16.0/28"
    roles(doc)["wordpress"]["count"] = 12


def mysql_gone_but_tested(doc: Doc) -> None:
    roles(doc)["mysql"]["count"] = 0
    doc["config"]["enclave:tests"] = [{"from": "neighbor", "to": "mysql-1", "port": 3306, "expect": "deny"}]


def no_bastion_no_operators(doc: Doc) -> None:
    roles(doc)["tunnel"]["bastion"] = False
    del doc["config"]["enclave:operators"]


def dense_fleet(doc: Doc) -> None:
    """30 000 mysql hosts admitting one another: 900 million members, a plan no machine could hold."""
    doc["config"]["enclave:vpcIpRange"] = "10.110.0.0/16"
    roles(doc)["mysql"]["count"] = 30_000


def fleet_over_a_16(doc: Doc) -> None:
    doc["config"]["enclave:vpcIpRange"] = "10.110.0.0/16"
    roles(doc)["wordpress"]["count"] = roles(doc)["mysql"]["count"] = 40_000


# (id, mutation, key path the message must name, words the message must contain)
BAD_STACKS: list[tuple[str, Callable[[Doc], None], str, str]] = [
    ("unknown-role-in-from", ingress("mysql", {"from": "wordpres", "ports": ["tcp/3306"]}),
     "enclave:roles.mysql.ingress[0].from", "'wordpres' is not a role"),
    ("unknown-role-in-list", ingress("mysql", {"from": ["wordpress", "redis"], "ports": [3306]}),
     "enclave:roles.mysql.ingress[0].from", "'redis'"),
    ("host-beyond-count", ingress("mysql", {"from": "wordpress-3", "ports": [3306]}),
     "enclave:roles.mysql.ingress[0].from", "only 2 host"),
    ("port-out-of-range", ingress("mysql", {"from": "wordpress", "ports": ["tcp/70000"]}),
     "enclave:roles.mysql.ingress[0].ports", "outside 1-65535"),
    ("port-zero", ingress("mysql", {"from": "wordpress", "ports": [0]}),
     "enclave:roles.mysql.ingress[0].ports", "outside 1-65535"),
    ("reversed-range", ingress("mysql", {"from": "wordpress", "ports": ["tcp/9000-8000"]}),
     "enclave:roles.mysql.ingress[0].ports", "above its end"),
    ("bad-protocol", ingress("mysql", {"from": "wordpress", "ports": ["sctp/3306"]}),
     "enclave:roles.mysql.ingress[0].ports", "tcp, udp or icmp"),
    ("port-not-a-number", ingress("mysql", {"from": "wordpress", "ports": ["tcp/mysql"]}),
     "enclave:roles.mysql.ingress[0].ports", "not a port"),
    ("no-ports", ingress("mysql", {"from": "wordpress", "ports": []}),
     "enclave:roles.mysql.ingress[0].ports", "at least 1"),
    ("missing-from", ingress("mysql", {"ports": [3306]}),
     "enclave:roles.mysql.ingress[0].from", "required"),
    ("bad-cidr", ingress("haproxy-www", {"from": "203.0.113.0/33", "ports": [80]}),
     "enclave:roles.haproxy-www.ingress[0].from", "not a valid CIDR"),
    ("cidr-host-bits", ingress("haproxy-www", {"from": "203.0.113.5/24", "ports": [80]}),
     "enclave:roles.haproxy-www.ingress[0].from", "not a valid CIDR"),
    ("cidr-inside-vpc", ingress("mysql", {"from": "10.110.16.0/28", "ports": [3306]}),
     "enclave:roles.mysql.ingress[0].from", "name the role or host instead"),
    ("role-name-not-hostname", add_role("Web_Server", {"count": 1, "size": "s-1vcpu-1gb"}),
     "enclave:roles", "must be a hostname"),
    ("role-name-reserved", add_role("internet", {"count": 1, "size": "s-1vcpu-1gb"}),
     "enclave:roles", "reserved"),
    ("role-name-like-host", add_role("web-2", {"count": 1, "size": "s-1vcpu-1gb"}),
     "enclave:roles", "clash with host names"),
    ("negative-count", role_key("wordpress", "count", -1),
     "enclave:roles.wordpress.count", "the lowest allowed is 0"),
    ("count-not-a-number", role_key("wordpress", "count", "two"),
     "enclave:roles.wordpress.count", "should be a whole number, not 'two'"),
    ("vpc-too-small", small_vpc_many_hosts,
     "enclave:vpcIpRange", "holds 11 droplets but the roles ask for 16; use a larger range, e.g. /27"),
    ("vpc-public-range", set_key("enclave:vpcIpRange", "8.8.8.0/24"),
     "enclave:vpcIpRange", "private IPv4 range"),
    ("vpc-not-a-network", set_key("enclave:vpcIpRange", "10.110.16.1/24"),
     "enclave:vpcIpRange", "not a network address"),
    ("vpc-benchmark-range", set_key("enclave:vpcIpRange", "198.18.0.0/24"),
     "enclave:vpcIpRange", "RFC 1918"),
    ("vpc-a-number", set_key("enclave:vpcIpRange", 167772160),
     "enclave:vpcIpRange", "write it as a range"),
    ("unknown-top-key", set_key("enclave:regoin", "ams3"),
     "enclave:regoin", "unknown key 'regoin'"),
    ("unknown-role-key", role_key("mysql", "ingres", []),
     "enclave:roles.mysql.ingres", "unknown key 'ingres'"),
    ("unknown-ingress-key", ingress("mysql", {"from": "wordpress", "ports": [3306], "proto": "tcp"}),
     "enclave:roles.mysql.ingress[0].proto", "unknown key"),
    ("operators-missing-with-bastion", drop_key("enclave:operators"),
     "enclave:operators", "accept SSH only from `operators`"),
    ("operators-bad-address", set_key("enclave:operators", ["198.51.100.300/32"]),
     "enclave:operators", "not an address range"),
    ("operators-everyone", set_key("enclave:operators", ["0.0.0.0/0"]),
     "enclave:operators", "to let anyone try SSH, add {from: internet, ports: [tcp/22]}"),
    ("operators-ipv6-only", set_key("enclave:operators", ["2001:db8:42::/48"]),
     "enclave:operators", "has no IPv4 range"),
    ("no-bastion-no-operators", no_bastion_no_operators,
     "enclave:operators", "nobody could SSH"),
    ("bastion-count-zero", role_key("tunnel", "count", 0),
     "enclave:roles.tunnel.count", "no host could be reached"),
    ("bad-egress", role_key("haproxy-www", "egress", "closed"),
     "enclave:roles.haproxy-www.egress", "'closed' is not one of open, restricted"),
    ("missing-size", role_key("mysql", "size", ""),
     "enclave:roles.mysql.size", "is empty"),
    ("bad-public-key", set_key("enclave:sshPublicKey", "not a key"),
     "enclave:sshPublicKey", "OpenSSH public key"),
    ("missing-region", drop_key("enclave:region"),
     "enclave:region", "required key is missing"),
    ("same-interfaces", set_key("enclave:interfaces", {"public": "eth0", "private": "eth0"}),
     "enclave:interfaces", "different interfaces"),
    ("bad-interface-name", set_key("enclave:interfaces", {"public": "eth0 extra", "private": "eth1"}),
     "enclave:interfaces.public", "interface name"),
    ("test-unknown-target", policy_test({"from": "internet", "to": "mysq", "port": 3306, "expect": "deny"}),
     "enclave:tests[0].to", "'mysq' is not a role"),
    ("test-to-outsider", policy_test({"from": "mysql", "to": "operators", "port": 80, "expect": "deny"}),
     "enclave:tests[0].to", "cannot be a destination"),
    ("test-bad-expect", policy_test({"from": "internet", "to": "mysql", "port": 3306, "expect": "maybe"}),
     "enclave:tests[0].expect", "'maybe' is not one of allow, deny"),
    ("test-port-word", policy_test({"from": "internet", "to": "mysql", "port": "all", "expect": "deny"}),
     "enclave:tests[0].port", "is not a port"),
    ("bad-tag", role_key("mysql", "tags", ["has space"]),
     "enclave:roles.mysql.tags", "may hold only"),
    ("reserved-tag", role_key("mysql", "tags", ["enclave-prod"]),
     "enclave:roles.mysql.tags[0]", "enclave's own"),
    ("no-roles", set_key("enclave:roles", {}),
     "enclave:roles", "at least 1"),
    ("key-without-namespace", set_key("region", "ams3"),
     "region", "enclave:region"),
    ("from-everywhere-cidr", ingress("haproxy-www", {"from": "0.0.0.0/0", "ports": [80]}),
     "enclave:roles.haproxy-www.ingress[0].from", "write `internet` for anyone on the Internet"),
    ("ipv6-range-to-ipv4-only-role", ingress("wordpress", {"from": "2001:db8:1::/48", "ports": [80]}),
     "enclave:roles.wordpress.ingress[0].from", "set ipv6: true on the role"),
    ("sources-in-one-string", ingress("mysql", {"from": "wordpress, mysql", "ports": [3306]}),
     "enclave:roles.mysql.ingress[0].from", "several sources are a list, e.g. from: [wordpress, mysql]"),
    ("ports-in-one-string", ingress("haproxy-www", {"from": "internet", "ports": "80,443"}),
     "enclave:roles.haproxy-www.ingress[0].ports", "several ports are a list; write ports: [tcp/80, tcp/443]"),
    ("from-neighbor", ingress("mysql", {"from": "neighbor", "ports": [3306]}),
     "enclave:roles.mysql.ingress[0].from", "'neighbor' is only for tests"),
    ("from-host-leading-zero", ingress("mysql", {"from": "wordpress-01", "ports": [3306]}),
     "enclave:roles.mysql.ingress[0].from", "no leading zeros; write wordpress-1"),
    ("test-host-of-role-with-count-0", mysql_gone_but_tested,
     "enclave:tests[0].to", "role mysql has count 0, so it has no hosts"),
    ("test-to-outside-range", policy_test({"from": "internet", "to": "203.0.113.0/24", "port": 80, "expect": "deny"}),
     "enclave:tests[0].from", "checks a stack host's egress: start it from a role or a host"),
    ("test-from-cidr", policy_test({"from": "203.0.113.0/24", "to": "mysql", "port": 3306, "expect": "deny"}),
     "enclave:tests[0].from", "not an address range"),
    ("test-from-unknown", policy_test({"from": "wordpres", "to": "mysql", "port": 3306, "expect": "allow"}),
     "enclave:tests[0].from", "internet, operators or neighbor; did you mean 'wordpress'?; known roles"),
    ("ingress-not-a-list", role_key("mysql", "ingress", {"from": "wordpress", "ports": [3306]}),
     "enclave:roles.mysql.ingress", "should be a list ([a, b], or one `- item` per line), not a mapping"),
    ("role-left-empty", add_role("redis", None),
     "enclave:roles.redis", "should be a mapping"),
    ("second-port-read-as-key", ingress("mysql", {"from": "wordpress", "ports": "tcp/3306", "tcp/33060": None}),
     "enclave:roles.mysql.ingress[0].tcp/33060", "several ports are one list"),
    ("ssh-user-not-a-user-name", set_key("enclave:sshUser", "Deploy User"),
     "enclave:sshUser", "is not a Linux user name"),
    ("test-host-to-itself", policy_test({"from": "tunnel", "to": "tunnel-1", "port": 22, "expect": "allow"}),
     "enclave:tests[0]", "same single host (tunnel-1)"),
    # issue 12: sources and operators that can never match, or cannot work
    ("from-ipv4-mapped-ipv6", ingress("mysql", {"from": "::ffff:203.0.113.0/120", "ports": [3306]}),
     "enclave:roles.mysql.ingress[0].from", "IPv4-mapped IPv6"),
    ("from-loopback", ingress("haproxy-www", {"from": "127.0.0.0/8", "ports": [80]}),
     "enclave:roles.haproxy-www.ingress[0].from", "can never match: it is loopback"),
    ("from-loopback-v6", ingress("mysql", {"from": "::1/128", "ports": [3306]}),
     "enclave:roles.mysql.ingress[0].from", "loopback"),
    ("from-multicast", ingress("haproxy-www", {"from": "224.0.0.0/4", "ports": [80]}),
     "enclave:roles.haproxy-www.ingress[0].from", "multicast"),
    ("from-multicast-v6", ingress("mysql", {"from": "ff02::/16", "ports": [3306]}),
     "enclave:roles.mysql.ingress[0].from", "multicast"),
    ("from-link-local", ingress("haproxy-www", {"from": "169.254.0.0/16", "ports": [80]}),
     "enclave:roles.haproxy-www.ingress[0].from", "link-local"),
    ("from-link-local-v6", ingress("mysql", {"from": "fe80::/64", "ports": [3306]}),
     "enclave:roles.mysql.ingress[0].from", "link-local"),
    ("operators-ipv4-mapped", set_key("enclave:operators", ["198.51.100.7/32", "::ffff:198.51.100.7/128"]),
     "enclave:operators", "IPv4-mapped IPv6"),
    ("operators-loopback", set_key("enclave:operators", ["127.0.0.1/32"]),
     "enclave:operators", "loopback"),
    ("operators-inside-vpc", set_key("enclave:operators", ["10.110.16.0/28"]),
     "enclave:operators", "overlaps vpcIpRange 10.110.16.0/24"),
    ("interface-lo", set_key("enclave:interfaces", {"public": "lo", "private": "eth1"}),
     "enclave:interfaces.public", "'lo' is the loopback interface"),
    ("interface-dot", set_key("enclave:interfaces", {"public": "eth0", "private": ".."}),
     "enclave:interfaces.private", "not a Linux interface name"),
    ("interface-all", set_key("enclave:interfaces", {"public": "eth0", "private": "all"}),
     "enclave:interfaces.private", "reserved by the kernel"),
    ("interface-option-like", set_key("enclave:interfaces", {"public": "-eth0", "private": "eth1"}),
     "enclave:interfaces.public", "read as an option"),
    ("count-true", role_key("wordpress", "count", True),
     "enclave:roles.wordpress.count", "true is true/false, not a number"),
    ("too-many-roles", lambda doc: roles(doc).update({f"r{i}x": {"count": 0, "size": "s"} for i in range(100)}),
     "enclave:roles", "104 items, over the limit of 100 (docs/stack-file.md: Limits)"),
    ("too-many-ingress-entries", role_key("mysql", "ingress", [{"from": "wordpress", "ports": [3306]}] * 101),
     "enclave:roles.mysql.ingress", "101 items, over the limit of 100"),
    ("too-many-ports", ingress("mysql", {"from": "wordpress", "ports": [f"tcp/{1000 + i}" for i in range(101)]}),
     "enclave:roles.mysql.ingress[0].ports", "101 items, over the limit of 100"),
    ("too-many-rules-per-host", role_key("haproxy-www", "ingress", [
        {"from": [f"203.0.{i}.0/24" for i in range(30)], "ports": [f"tcp/{1000 + 2 * p}" for p in range(70)]}]),
     "enclave:roles.haproxy-www.ingress", "2111 rules, over the limit of 2000 per host"),  # 2 100 declared + ssh and frame rules
    ("fleet-pushing-too-many-members", dense_fleet,
     "enclave:roles", "over the limit of 25000000 (docs/stack-file.md: Limits)"),
    ("fleet-over-a-16", fleet_over_a_16,
     "enclave:vpcIpRange", "a VPC is at most a /16 (65531 droplets): lower the counts or split the fleet"),
]


def load_checked(path: Path) -> Stack:
    """The stack file as `enclave plan` and `pulumi up` check it: the schema, then the limits on the compiled policy."""
    stack = load_stack_file(path)
    check_limits(stack, compile_policy(stack.config))
    return stack


def write_stack(tmp_path: Path, doc: Doc) -> Path:
    path = tmp_path / "Pulumi.bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("mutate,key,words", [case[1:] for case in BAD_STACKS], ids=[case[0] for case in BAD_STACKS])
def test_bad_stack_is_rejected_naming_the_key(tmp_path: Path, mutate: Callable[[Doc], None], key: str, words: str) -> None:
    doc = stack_document("prod")
    mutate(doc)
    with pytest.raises(StackError) as caught:
        load_checked(write_stack(tmp_path, doc))
    issues = caught.value.issues
    matching = [i for i in issues if i.path == key]
    assert matching, f"no issue names {key}; got {[str(i) for i in issues]}"
    assert any(words in i.message for i in matching), [str(i) for i in matching]


def test_there_are_at_least_25_bad_stack_cases() -> None:
    assert len({case[0] for case in BAD_STACKS}) >= 25


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    doc = stack_document("prod")
    roles(doc)["wordpress"]["count"] = -3
    roles(doc)["mysql"]["ingres"] = []
    doc["config"]["enclave:vpcIpRange"] = "10.110.16.1/24"
    with pytest.raises(StackError) as caught:
        load_stack_file(write_stack(tmp_path, doc))
    assert {i.path for i in caught.value.issues} >= {
        "enclave:roles.wordpress.count",
        "enclave:roles.mysql.ingres",
        "enclave:vpcIpRange",
    }


def test_cli_exits_2_and_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = stack_document("prod")
    ingress("mysql", {"from": "wordpres", "ports": ["tcp/3306"]})(doc)
    code = main(["plan", "--stack-file", str(write_stack(tmp_path, doc))])
    err = capsys.readouterr().err
    assert code == 2
    assert "enclave:roles.mysql.ingress[0].from" in err
    assert "nothing was created or changed" in err


def test_not_yaml_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "Pulumi.x.yaml"
    path.write_text("config: [unclosed\n")
    with pytest.raises(StackError, match="not valid YAML"):
        load_stack_file(path)


@pytest.mark.parametrize(
    "text,expected",
    [("80", "tcp/80"), (443, "tcp/443"), ("udp/53", "udp/53"), ("TCP/24007-24008", "tcp/24007-24008"), ("icmp", "icmp")],
)
def test_port_forms(text: Any, expected: str) -> None:
    doc = stack_document("prod")
    ingress("mysql", {"from": "wordpress", "ports": [text]})(doc)
    from config.schema import load_config, enclave_keys

    stack = load_config(enclave_keys(doc["config"]))
    assert str(stack.roles["mysql"].ingress[0].ports[0]) == expected


def test_zero_count_and_bastionless_stacks_are_valid(tmp_path: Path) -> None:
    doc = stack_document("prod")
    roles(doc)["wordpress"]["count"] = 0
    doc["config"]["enclave:tests"] = []
    stack = load_stack_file(write_stack(tmp_path, doc))
    assert stack.config.roles["wordpress"].count == 0
    roles(doc)["tunnel"]["bastion"] = False
    assert load_stack_file(write_stack(tmp_path, doc)).config.bastion_roles() == []


def test_cli_prints_bracketed_text_in_messages_verbatim(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A quoted flow list (`ports: "[tcp/80]"`) is quoted back as written, not eaten as a rich markup tag."""
    doc = stack_document("prod")
    ingress("haproxy-www", {"from": "internet", "ports": "[tcp/80]"})(doc)
    assert main(["plan", "--stack-file", str(write_stack(tmp_path, doc))]) == 2
    assert "'[tcp/80]'" in capsys.readouterr().err


def test_a_role_written_twice_is_refused_not_silently_dropped(tmp_path: Path) -> None:
    text = (ROOT_PROD.read_text()).replace("    mysql:\n", "    wordpress:\n", 1)
    path = tmp_path / "Pulumi.dup.yaml"
    path.write_text(text)
    with pytest.raises(StackError) as caught:
        load_stack_file(path)
    assert "'wordpress' appears twice in one mapping" in str(caught.value)


def test_yaml_merge_keys_may_override(tmp_path: Path) -> None:
    path = tmp_path / "Pulumi.merge.yaml"
    mysql = "    mysql:\n      count: 2\n      size: s-2vcpu-4gb\n"
    merged = "    mysql:\n      <<: {count: 1, size: s-2vcpu-4gb}\n      count: 2\n"
    assert mysql in ROOT_PROD.read_text()
    path.write_text(ROOT_PROD.read_text().replace(mysql, merged, 1))
    assert load_stack_file(path).config.roles["mysql"].count == 2


@pytest.mark.parametrize(
    "before,after,words",
    [
        ("{from: internet, ports: [tcp/80]}", "{from: ::/0, ports: [tcp/80]}", "quote a value"),
        ("  enclave:region: ams3", "\tenclave:region: ams3", "indent with spaces, not tabs"),
    ],
)
def test_yaml_mistakes_name_the_line_and_the_fix(tmp_path: Path, before: str, after: str, words: str) -> None:
    path = tmp_path / "Pulumi.bad.yaml"
    path.write_text(ROOT_PROD.read_text().replace(before, after, 1))
    with pytest.raises(StackError) as caught:
        load_stack_file(path)
    message = caught.value.issues[0].message
    assert message.startswith("not valid YAML at line ") and words in message


def test_plan_refuses_droplet_names_pulumi_up_would_refuse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`<stack>-<role>-<n>` longer than 63 characters fails `pulumi up`; `enclave plan` says so for the same stack."""
    doc = stack_document("prod")
    add_role("reporting-database-replicas-eu-westa", {"count": 10, "size": "s-1vcpu-1gb"})(doc)
    path = tmp_path / "Pulumi.customer-acme-production.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["plan", "--stack-file", str(path)]) == 2
    err = capsys.readouterr().err
    assert "enclave:roles.reporting-database-replicas-eu-westa" in err and "longer than 63" in err


# ------------------------------------------------------------------------------------- issue 12: names


def plan_of(tmp_path: Path, doc: Doc, name: str = "Pulumi.x.yaml") -> Any:
    from enclave.plan import build_plan

    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return build_plan(load_stack_file(path))


def test_a_hashed_set_name_cannot_be_another_roles_verbatim_name(tmp_path: Path) -> None:
    """`abcdefghijklmnopqrst` (over 19 characters: hashed) and `abcdefghijkl-<its hash>` shared one ipset, so
    access moved from one role to the other; a hashed name holds '_', which no role name can."""
    from config.names import set_name

    long_role = "abcdefghijklmnopqrst"
    hashed = set_name(long_role)
    twin = hashed.removeprefix("enclave-").replace("_", "-")
    assert len(set_name(twin)) <= 27 and set_name(twin) == f"enclave-{twin}"
    doc = stack_document("prod")
    add_role(long_role, {"count": 1, "size": "s-1vcpu-1gb"})(doc)
    add_role(twin, {"count": 1, "size": "s-1vcpu-1gb"})(doc)
    ingress("mysql", {"from": long_role, "ports": [3306]})(doc)
    files = plan_of(tmp_path, doc).files
    assert set_name(long_role) != set_name(twin)
    landed = {base_name(n) for n in files["mysql-1"].set_names}  # the names without their generation
    assert set_name(long_role) in landed and set_name(twin) not in landed
    twin_ip = plan_of(tmp_path, doc).addresses[f"{twin}-1"].private
    assert twin_ip not in files["mysql-1"].ipsets.split()


def test_two_roles_whose_hashed_set_names_collide_are_refused_naming_both(tmp_path: Path) -> None:
    """24 bits of hash collide after ~4 000 names; the schema finds the clash and names both roles."""
    from config.names import set_name

    seen: dict[str, str] = {}
    pair = None
    for i in range(200_000):
        role = f"reporting-db-{i:06d}-replica"
        name = set_name(role)
        if name in seen:
            pair = (seen[name], role)
            break
        seen[name] = role
    assert pair is not None
    doc = stack_document("prod")
    for role in pair:
        add_role(role, {"count": 1, "size": "s-1vcpu-1gb"})(doc)
    with pytest.raises(StackError) as caught:
        load_stack_file(write_stack(tmp_path, doc))
    (issue,) = [i for i in caught.value.issues if "ipset" in i.message]
    assert issue.path == f"enclave:roles.{pair[1]}" and f"roles.{pair[0]}" in issue.message


def test_a_role_named_operators6_keeps_its_own_set(tmp_path: Path) -> None:
    """`operators6` was the IPv6 operators set's name too: the bastion's push failed."""
    from config.names import OPERATORS_SET, set_name

    doc = stack_document("prod")
    doc["config"]["enclave:operators"] = ["198.51.100.7/32", "2001:db8:42::/48"]
    roles(doc)["tunnel"]["ipv6"] = True
    add_role("operators6", {"count": 1, "size": "s-1vcpu-1gb"})(doc)
    ingress("tunnel", {"from": "operators6", "ports": [8080]})(doc)
    tunnel = plan_of(tmp_path, doc).files["tunnel-1"]
    landed = {base_name(n) for n in tunnel.set_names}
    assert OPERATORS_SET[6] in landed and set_name("operators6") in landed
    assert OPERATORS_SET[6] != set_name("operators6")
    creates = [line.split()[1] for line in tunnel.ipsets.splitlines() if line.startswith("create ")]
    assert len(creates) == len(set(creates))  # each set created once, with one type


@pytest.mark.parametrize("argv_stack", ["", "My_Stack", "my stack", "prod\nHost *", "-prod", "x" * 100_000])
def test_cli_refuses_stack_names_pulumi_refuses(argv_stack: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Exactly the program's check (config.schema.stack_name_issues); `--stack ''` used to mean dev."""
    from config.schema import stack_name_issues

    assert stack_name_issues(argv_stack, None)
    assert main(["plan", f"--stack={argv_stack}"]) == 2
    err = capsys.readouterr().err
    assert "--stack" in err and ("lower-case letters, digits and '-'" in err or "a stack name has at most 59" in err)


def test_a_stack_file_named_for_a_bad_stack_name_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "Pulumi.My_Stack.yaml"
    path.write_text(ROOT_PROD.read_text())
    assert main(["plan", "--stack-file", str(path)]) == 2
    assert "'My_Stack' becomes part of droplet host names" in capsys.readouterr().err


# ------------------------------------------------------------------------------ issue 12: one YAML reading


def stack_with(tmp_path: Path, before: str, after: str) -> Path:
    text = ROOT_PROD.read_text()
    assert before in text
    path = tmp_path / "Pulumi.yaml12.yaml"
    path.write_text(text.replace(before, after, 1))
    return path


@pytest.mark.parametrize(
    "before,after,key,words",
    [
        # YAML 1.1 read 20:21 as 1221 (a port!), Pulumi reads the text '20:21'
        ("{from: internet, ports: [tcp/80]}", "{from: internet, ports: [20:21]}",
         "enclave:roles.haproxy-www.ingress[0].ports[0]", "write a port range as tcp/20-21"),
        ("      count: 2\n      size: s-1vcpu-2gb", "      count: 1:00\n      size: s-1vcpu-2gb",
         "enclave:roles.wordpress.count", "the number 60"),
        # 0443 is 291 for YAML 1.1 and yaml.v3, 443 for YAML 1.2
        ("{from: internet, ports: [tcp/80]}", "{from: internet, ports: [0443]}",
         "enclave:roles.haproxy-www.ingress[0].ports[0]", "write 443 (no leading zero)"),
        ("      ipv6: true", "      ipv6: yes", "enclave:roles.mysql.ipv6", "write true or false"),
        ("      egress: restricted", "      egress: off", "enclave:roles.haproxy-www.egress", "quote it ('off')"),
        ("      count: 2\n      size: s-1vcpu-2gb", "      count: 1_0\n      size: s-1vcpu-2gb",
         "enclave:roles.wordpress.count", "plain decimal digits"),
        ("      count: 2\n      size: s-1vcpu-2gb", "      count: 0b10\n      size: s-1vcpu-2gb",
         "enclave:roles.wordpress.count", "plain decimal digits"),
        ("  enclave:image: ubuntu-24-04-x64", "  enclave:image: 2024-04-01", "enclave:image", "a date in YAML 1.1"),
        ("  enclave:image: ubuntu-24-04-x64", "  enclave:image: !!binary aGVsbG8=", "enclave:image", "no !!tags"),
    ],
)
def test_scalars_yaml_versions_read_differently_are_refused_by_key(
    tmp_path: Path, before: str, after: str, key: str, words: str
) -> None:
    with pytest.raises(StackError) as caught:
        load_stack_file(stack_with(tmp_path, before, after))
    assert [i for i in caught.value.issues if i.path == key and words in i.message], [str(i) for i in caught.value.issues]


def test_count_true_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StackError, match="true is true/false, not a number"):
        load_stack_file(stack_with(tmp_path, "      count: 2\n      size: s-1vcpu-2gb", "      count: true\n      size: s-1vcpu-2gb"))


@pytest.mark.parametrize(
    "written,value",
    # what yaml.v3 (Pulumi) makes of each plain scalar, and so must enclave
    [("0x1F", 31), ("'0443'", "0443"), ('"20:21"', "20:21"), ("1e3", 1000.0), (".inf", float("inf")), ("~", None),
     ("True", True), ("-7", -7), ("0", 0), ("tcp/80", "tcp/80"), ("'yes'", "yes")],
)
def test_plain_scalars_read_as_yaml_1_2(written: str, value: Any) -> None:
    from config.stackfile import parse_stack_yaml

    assert parse_stack_yaml(f"config:\n  enclave:x: {written}\n", "t")["x"] == value


# ------------------------------------------------------------------------ issue 12: bounds, files, no traceback


def test_deep_nesting_is_refused_before_it_recurses(tmp_path: Path) -> None:
    path = tmp_path / "Pulumi.deep.yaml"
    path.write_text("config:\n  enclave:roles: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(StackError, match="nested deeper than 32 levels"):
        load_stack_file(path)


def test_an_alias_bomb_is_refused_without_expanding_it(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]  # 10^10 values
    path = tmp_path / "Pulumi.bomb.yaml"
    path.write_text("\n".join(lines) + "\nconfig:\n  enclave:tests: *a9\n")
    with pytest.raises(StackError, match="aliases .* expand to more than 100000 values"):
        load_stack_file(path)


def test_a_recursive_alias_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "Pulumi.loop.yaml"
    path.write_text("config: &c\n  enclave:roles: *c\n")
    with pytest.raises(StackError, match="refers to the mapping it is in"):
        load_stack_file(path)


def test_a_huge_stack_file_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "Pulumi.huge.yaml"
    path.write_text("# " + "x" * (1 << 20) + "\n")
    with pytest.raises(StackError, match="over 1048576 bytes"):
        load_stack_file(path)


@pytest.mark.parametrize("kind", ["directory", "device", "not-utf8"])
def test_a_stack_file_that_is_not_one_says_what_it_is(tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = {"directory": tmp_path, "device": Path("/dev/null"), "not-utf8": tmp_path / "Pulumi.latin1.yaml"}[kind]
    if kind == "not-utf8":
        path.write_bytes(ROOT_PROD.read_text().replace("ops@example", "op\u00e9rateur").encode("latin-1"))
    assert main(["plan", "--stack-file", str(path)]) == 2
    err = capsys.readouterr().err
    words = {"directory": "is a directory, not a stack file", "device": "is not a regular file",
             "not-utf8": "is not UTF-8 text (byte 0xe9"}[kind]
    assert words in err and "does not exist" not in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["app-\u0661", "db-\u00b2", "mysql-\u0661"])
def test_host_names_with_non_ascii_digits_are_not_hosts(tmp_path: Path, name: str) -> None:
    """str.isdigit() is true for '١' and '²': `mysql-١` passed for mysql-1, then crashed the renderer."""
    doc = stack_document("prod")
    ingress("mysql", {"from": name, "ports": [3306]})(doc)
    with pytest.raises(StackError) as caught:
        load_stack_file(write_stack(tmp_path, doc))
    (issue,) = caught.value.issues
    assert issue.path == "enclave:roles.mysql.ingress[0].from" and "is not a role, a host" in issue.message


def test_identical_ingress_entries_render_one_rule(tmp_path: Path) -> None:
    """2 000 identical entries gave 2 017 rules; identical rules are rendered once, under the first entry."""
    doc = stack_document("prod")
    one = plan_of(tmp_path, doc).files["mysql-1"]
    roles(doc)["mysql"]["ingress"] = [{"from": ["wordpress", "mysql"], "ports": ["tcp/3306"]}] * 99
    roles(doc)["mysql"]["ingress"].append({"from": ["wordpress", "wordpress"], "ports": [3306, "tcp/3306"]})
    many = plan_of(tmp_path, doc).files["mysql-1"]
    assert many.ipv4 == one.ipv4 and many.rule_count == one.rule_count
    doc = stack_document("prod")
    roles(doc)["haproxy-www"]["ingress"] *= 3  # a restricted-egress host sends to wordpress once per port too
    roles(doc)["wordpress"]["ingress"] *= 2
    files = plan_of(tmp_path, doc).files
    assert files["haproxy-www-1"].ipv4 == plan_of(tmp_path, stack_document("prod")).files["haproxy-www-1"].ipv4


def test_lab_refuses_bad_input_like_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 2 with plan's messages, before any namespace exists (no root needed to be told)."""
    doc = stack_document("prod")
    set_key("enclave:interfaces", {"public": "lo", "private": "eth1"})(doc)
    path = write_stack(tmp_path, doc)
    assert main(["plan", "--stack-file", str(path)]) == 2
    plan_err = capsys.readouterr().err
    for command in ("check", "up"):
        assert main(["lab", command, "--stack-file", str(path)]) == 2
        assert capsys.readouterr().err == plan_err
    assert main(["lab", "check", "--stack", "My_Stack"]) == 2
    assert "'My_Stack' becomes part of droplet host names" in capsys.readouterr().err


def test_aliases_cannot_expand_a_host_past_the_rule_limit(tmp_path: Path) -> None:
    """8 KB of YAML aliases gave 10 000 rules per host: 100 sources x 100 ports in one entry, written once."""
    cidrs = ", ".join(f"203.0.{i}.0/24" for i in range(100))
    ports = ", ".join(f"tcp/{2000 + 2 * i}" for i in range(100))
    text = ROOT_PROD.read_text().replace(
        "        - {from: internet, ports: [tcp/80]}",
        f"        - {{from: &cidrs [{cidrs}], ports: &ports [{ports}]}}\n        - {{from: *cidrs, ports: *ports}}",
        1,
    )
    path = tmp_path / "Pulumi.aliased.yaml"
    path.write_text(text)
    assert len(text.encode()) < 8_000
    with pytest.raises(StackError) as caught:
        load_checked(path)
    (issue,) = caught.value.issues
    assert issue.path == "enclave:roles.haproxy-www.ingress" and "10011 rules, over the limit of 2000" in issue.message


def test_the_rule_limit_counts_the_rules_the_host_would_receive(tmp_path: Path) -> None:
    """The number a refusal gives is the number of rules in the host's largest table as rendered (SSH and the
    fixed frame rules included, identical declarations once), and a stack just under the limit is accepted."""
    from enclave.limits import limit_issues
    from enclave.plan import build_plan

    doc = stack_document("prod")
    role_key("haproxy-www", "ingress", [{"from": [f"203.0.{i}.0/24" for i in range(20)] * 2,
                                         "ports": [f"tcp/{1000 + p}" for p in range(100)]}])(doc)
    stack = load_stack_file(write_stack(tmp_path, doc))
    files = build_plan(stack).files["haproxy-www-1"]  # the plan itself does not refuse: only its callers do
    # INPUT's side: ENCLAVE-FORWARD (published container ports) repeats its accepts, and a packet walks one of them
    rendered = sum(line.startswith("-A ") and not line.startswith("-A ENCLAVE-FORWARD ") for line in files.ipv4.splitlines())
    (issue,) = limit_issues(compile_policy(stack.config))
    assert rendered > 2000 and f"would get {rendered} rules" in issue.message

    role_key("haproxy-www", "ingress", [{"from": [f"203.0.{i}.0/24" for i in range(19)],
                                         "ports": [f"tcp/{1000 + p}" for p in range(100)]}])(doc)
    stack = load_stack_file(write_stack(tmp_path, doc))
    assert sum(line.startswith("-A ") and not line.startswith("-A ENCLAVE-FORWARD ")
               for line in build_plan(stack).files["haproxy-www-1"].ipv4.splitlines()) <= 2000
    assert limit_issues(compile_policy(stack.config)) == []


def test_a_role_declaring_far_more_pairs_than_the_limit_is_refused_without_rendering(tmp_path: Path) -> None:
    """100 entries of 100 sources x 100 ports: a million pairs. Counting them as rendered would cost more than
    the check is worth, so the declared count is the refusal (enclave.limits.RENDER_BOUND)."""
    from enclave.limits import RENDER_BOUND, limit_issues

    doc = stack_document("prod")
    cidrs = [f"203.0.{i}.0/24" for i in range(100)]
    role_key("haproxy-www", "ingress", [{"from": cidrs, "ports": [f"tcp/{1000 + 100 * e + p}" for p in range(100)]}
                                        for e in range(100)])(doc)
    stack = load_stack_file(write_stack(tmp_path, doc))
    (issue,) = limit_issues(compile_policy(stack.config))
    assert issue.path == "enclave:roles.haproxy-www.ingress"
    declared = int(issue.message.split("up to ")[1].split()[0])
    assert declared > RENDER_BOUND and "over the limit of 2000 per host" in issue.message


def test_the_program_refuses_the_stack_file_plan_refuses(tmp_path: Path) -> None:
    """Pulumi hands the program `0443` as 291, so the program reads the stack file as written too, with the
    same reader as `enclave plan` (components/stack_config.py adds these issues to its own)."""
    from config.stackfile import stack_file_issues

    (tmp_path / "Pulumi.yaml").write_text("name: enclave\n")
    (tmp_path / "stacks").mkdir()
    (tmp_path / "stacks" / "Pulumi.x.yaml").write_text(
        ROOT_PROD.read_text().replace("{from: internet, ports: [tcp/80]}", "{from: internet, ports: [0443]}", 1)
    )
    (issue,) = stack_file_issues("x", tmp_path)
    assert issue.path == "enclave:roles.haproxy-www.ingress[0].ports[0]" and "write 443" in issue.message
    assert stack_file_issues("prod") == [] and stack_file_issues("absent", tmp_path) == []


def test_the_largest_user_data_the_limits_allow_fits_digitaloceans_64_kib(tmp_path: Path) -> None:
    """A bastion's user data carries the baseline, one SSH rule per operator: with the most operators the limits
    allow, each a long IPv6 network, a non-root user and an RSA-4096-sized key, it still fits DigitalOcean's
    64 KiB (beyond it the API refuses the droplet, after `pulumi up` began)."""
    import ipaddress

    from config.schema import MAX_OPERATORS
    from enclave.push import cloud_config
    from enclave.render import baseline_files

    doc = stack_document("prod")
    doc["config"]["enclave:operators"] = ["198.51.100.7/32"] + [
        str(ipaddress.ip_network(f"2001:db8:ffff:ffff:ffff:ffff:{i:04x}:ff00/120")) for i in range(MAX_OPERATORS - 1)
    ]
    doc["config"]["enclave:aptProxy"] = "http://apt-proxy.internal.example:3142"
    path = tmp_path / "Pulumi.big.yaml"
    path.write_text(yaml.safe_dump(doc))
    config = load_stack_file(path).config
    key = "ssh-rsa " + "A" * 716 + " a-long-comment@operators-workstation.example"
    for role, spec in config.roles.items():
        data = cloud_config(baseline_files(config, role), ssh_user="deploy", ssh_public_key=key, bastion=spec.bastion,
                            apt_proxy=config.apt_proxy)
        assert len(data.encode()) <= 64 * 1024, f"{role}: {len(data.encode())} bytes of user data"
    doc["config"]["enclave:operators"].append("2001:db8::/64")
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(StackError, match="operators"):
        load_stack_file(path)
