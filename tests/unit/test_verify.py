"""The verifier: rendered stacks prove equal to their policy; each kind of bug gives a concrete packet; what the
parser does not model is refused naming its line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from config.stackfile import load_stack, load_stack_file
from enclave.plan import Plan, build_plan
from enclave.verify.engine import VerifyError
from enclave.verify.parse import Cond, ParseError, parse_ipsets, parse_tables
from enclave.verify.prove import HostProof, HostText, Prover


@pytest.fixture(scope="module")
def prod() -> Plan:
    return build_plan(load_stack("prod"))


def prove(plan: Plan, host: str, **changes: str) -> HostProof:
    text = dataclasses.replace(HostText.of(plan.files[host]), **changes)
    return Prover(plan.policy, plan.addresses).prove(text)


@pytest.mark.parametrize("stack", ["prod", "dev"])
def test_every_rendered_host_is_proved_equal_to_the_policy(stack: str) -> None:
    plan = build_plan(load_stack(stack))
    prover = Prover(plan.policy, plan.addresses)
    proofs = [prover.prove(HostText.of(files)) for files in plan.files.values()]
    assert [p.host for p in proofs if not p.proved] == []
    assert all(p.atoms > 1000 for p in proofs)


def _forwarded(conds: tuple[Cond, ...]) -> tuple[Cond, ...]:
    """A forward rule's conditions as its INPUT accept has them (the original destination port as the port)."""
    as_input = [dataclasses.replace(c, kind="dport") if c.kind == "origdport" else c for c in conds if c.kind != "nat"]
    return tuple(sorted(as_input, key=repr))


@pytest.mark.parametrize("stack", ["prod", "dev"])
def test_published_ports_admit_exactly_what_input_admits(stack: str) -> None:
    """ENCLAVE-FORWARD, outside the proofs (INPUT, OUTPUT), against ENCLAVE-INPUT, which the proofs cover: replies
    return, then for each TCP/UDP accept of INPUT, in order, one DNAT-only RETURN with the same interface, source,
    protocol and (original destination) port, then a drop of everything else on each interface."""
    plan = build_plan(load_stack(stack))
    for files in plan.files.values():
        for family, text in ((4, files.ipv4), (6, files.ipv6)):
            table = parse_tables(text, family, files.host)
            accepts = [r for r in table.rules["ENCLAVE-INPUT"] if r.target == "ACCEPT"
                       and any(c.kind == "dport" for c in r.conds)]
            forward = table.rules["ENCLAVE-FORWARD"]
            assert [c.kind for c in forward[0].conds] == ["state"] and forward[0].target == "RETURN"
            assert forward[0].conds[0].arg == frozenset({"ESTABLISHED", "RELATED"})
            carried = forward[1:1 + len(accepts)]
            assert [_forwarded(r.conds) for r in carried] == [tuple(sorted(r.conds, key=repr)) for r in accepts]
            assert all(r.target == "RETURN" and any(c.kind == "nat" and c.arg == frozenset({"DNAT"}) for c in r.conds)
                       for r in carried)
            rest = forward[1 + len(accepts):]
            assert [(r.conds[0].kind, r.conds[0].arg, r.target) for r in rest] == [
                ("iface_in", "eth0", "DROP"), ("iface_in", "eth1", "DROP")], files.host


def test_a_forwarding_match_where_input_reaches_is_refused(prod: Plan) -> None:
    v4 = prod.files["mysql-1"].ipv4.replace("-A ENCLAVE-INPUT -i lo -j ACCEPT",
                                            "-A ENCLAVE-INPUT -p tcp -m conntrack --ctstate DNAT --ctorigdstport 80 -j ACCEPT")
    with pytest.raises(VerifyError, match=r"rules.v4:11: a forwarding match .* in a chain INPUT reaches \(ENCLAVE-INPUT\)"):
        prove(prod, "mysql-1", rules_v4=v4)


def test_hosts_with_the_same_files_are_proved_once(prod: Plan) -> None:
    prover = Prover(prod.policy, prod.addresses)
    first = prover.prove(HostText.of(prod.files["wordpress-1"]))
    second = prover.prove(HostText.of(prod.files["wordpress-2"]))
    assert (first.cached, second.cached) == (False, True)


def landed(plan: Plan, host: str, base: str) -> str:
    """The name `base`'s set lands under on `host` (with its generation suffix)."""
    (name,) = [n for n in plan.files[host].set_names if n.rsplit(".", 1)[0] == base]
    return name


def only(proof: HostProof) -> list[str]:
    assert not proof.proved
    return [d.describe() for d in proof.differences]


def test_a_wrong_port_admits_it_and_drops_the_declared_one(prod: Plan) -> None:
    v4 = prod.files["mysql-1"].ipv4.replace("--dport 3306 -m set --match-set enclave-wordpress",
                                           "--dport 3307 -m set --match-set enclave-wordpress")
    found = only(prove(prod, "mysql-1", rules_v4=v4))
    assert any("in eth1 10.110.16.4 (wordpress-1) -> " in d and "tcp/3306 NEW" in d and "rules DROP" in d
               and "policy says allow (roles.mysql.ingress[0])" in d for d in found)
    assert any("tcp/3307 NEW" in d and "rules ACCEPT by line" in d and "--dport 3307" in d for d in found)


def test_a_missing_interface_admits_the_role_on_the_public_side(prod: Plan) -> None:
    v4 = prod.files["mysql-1"].ipv4.replace("-i eth1 -p tcp -m tcp --dport 3306 -m set --match-set enclave-wordpress",
                                           "-p tcp -m tcp --dport 3306 -m set --match-set enclave-wordpress")
    found = only(prove(prod, "mysql-1", rules_v4=v4))
    assert any(d.startswith("IPv4 in eth0 10.110.16.4 (wordpress-1)") and "tcp/3306 NEW" in d and "rules ACCEPT" in d
               and "policy says deny (default drop" in d for d in found)


def test_swapped_sets_admit_the_wrong_role(prod: Plan) -> None:
    haproxy, wordpress = landed(prod, "wordpress-1", "enclave-haproxy-www"), landed(prod, "wordpress-1", "enclave-wordpress")
    v4 = (prod.files["wordpress-1"].ipv4.replace(f"{haproxy} src", "SWAP")
          .replace(f"{wordpress} src", f"{haproxy} src").replace("SWAP", f"{wordpress} src"))
    found = only(prove(prod, "wordpress-1", rules_v4=v4))
    # haproxy-www-1 (10.110.16.3) reaching wordpress on tcp/80 is now dropped, and wordpress-2 admitted
    assert any("10.110.16.3" in d and "tcp/80 NEW" in d and "rules DROP" in d and "roles.wordpress.ingress[0]" in d
               for d in found)


def test_an_extra_set_member_is_a_stranger_admitted(prod: Plan) -> None:
    ipsets = prod.files["mysql-1"].ipsets + f"add {landed(prod, 'mysql-1', 'enclave-wordpress')} 10.110.16.99\n"
    found = only(prove(prod, "mysql-1", ipsets=ipsets))
    assert any("in eth1 10.110.16.99 -> 10.110.16.5 (mysql-1) tcp/3306 NEW" in d and "tcp/3306 NEW" in d and "rules ACCEPT" in d
               and "roles.mysql.ingress[0]: wordpress -> tcp/3306" in d and "policy says deny" in d for d in found)


def test_a_widened_replies_rule_admits_new_connections(prod: Plan) -> None:
    v4 = prod.files["mysql-1"].ipv4.replace("--ctstate RELATED,ESTABLISHED", "--ctstate RELATED,ESTABLISHED,NEW")
    found = only(prove(prod, "mysql-1", rules_v4=v4))
    assert any("in eth0 192.0.2.10 -> 10.110.16.5 (mysql-1) tcp/22 NEW" in d and "rules ACCEPT by line 12" in d and "policy says deny" in d
               for d in found)


def test_a_foreign_accept_before_enclaves_jump_is_reported_with_its_packet(prod: Plan) -> None:
    v4 = prod.files["mysql-1"].ipv4.replace(
        ":ENCLAVE-OUTPUT - [0:0]\n",
        ":ENCLAVE-OUTPUT - [0:0]\n-A INPUT -p tcp -m tcp --dport 8080 -j ACCEPT\n-A INPUT -j ENCLAVE-INPUT\n",
    )
    live = "# Generated by iptables-save v1.8.10 on Thu Dec  3 18:00:00 2026\n" + v4
    found = only(prove(prod, "mysql-1", rules_v4=live))
    assert any("tcp/8080 NEW" in d and "rules ACCEPT by line 10: -A INPUT -p tcp -m tcp --dport 8080 -j ACCEPT" in d
               for d in found)


def test_live_rules_without_the_jump_drop_what_the_policy_allows(prod: Plan) -> None:
    live = "# Generated by iptables-save v1.8.10\n" + prod.files["mysql-1"].ipv4
    found = only(prove(prod, "mysql-1", rules_v4=live))
    assert any("lo" in d and "the INPUT policy" in d for d in found)


def test_a_harmless_foreign_rule_is_proved_equal(prod: Plan) -> None:
    v4 = prod.files["mysql-1"].ipv4.replace(
        ":ENCLAVE-OUTPUT - [0:0]\n",
        ":ENCLAVE-OUTPUT - [0:0]\n:f2b-sshd - [0:0]\n-A INPUT -p tcp -m tcp --dport 22 -j f2b-sshd\n"
        "-A f2b-sshd -j RETURN\n",
    )
    assert prove(prod, "mysql-1", rules_v4=v4).proved


REFUSED_RULES = [
    ("-A ENCLAVE-INPUT -p tcp -m tcp --tcp-flags SYN SYN -j ACCEPT", "'--tcp-flags' is not modelled"),
    ("-A ENCLAVE-INPUT -m recent --rcheck -j DROP", "match module 'recent' is not modelled"),
    ("-A ENCLAVE-INPUT -m limit --limit 5/min -j ACCEPT", "-m limit on a rule that jumps to ACCEPT"),
    ("-A ENCLAVE-INPUT -p gre -j ACCEPT", "protocol 'gre' is not modelled"),
    ("-A ENCLAVE-INPUT -j NFQUEUE", "target 'NFQUEUE'"),
    ("-A ENCLAVE-INPUT -p tcp -j ACCEPT -m conntrack --ctstate DNAT,NEW", "mixing DNAT/SNAT with real states"),
    ("-A ENCLAVE-INPUT -p tcp -j ACCEPT -m conntrack --ctstate CONFIRMED", "state CONFIRMED is not modelled"),
    ("-A ENCLAVE-INPUT -p tcp -m tcp --dport 22", "a rule without -j"),
    ("-A ENCLAVE-INPUT -m set --match-set enclave-mysql src,dst -j ACCEPT", "only one direction"),
    ("-A ENCLAVE-INPUT -p icmp -m icmp --icmp-type 3/4 -j ACCEPT", "ICMP type '3/4' is not modelled"),
    ("-A ENCLAVE-INPUT ! -p tcp -m tcp --dport 22 -j ACCEPT", "-m tcp needs -p tcp or -p udp before it"),
]


@pytest.mark.parametrize(("rule", "why"), REFUSED_RULES)
def test_an_unmodelled_rule_is_refused_naming_its_line(prod: Plan, rule: str, why: str) -> None:
    text = prod.files["mysql-1"].ipv4.replace("-A ENCLAVE-INPUT -i lo -j ACCEPT\n", rule + "\n")
    with pytest.raises(ParseError) as err:
        parse_tables(text, 4, "mysql-1/rules.v4")
    assert err.value.line == 11 and why in str(err.value) and rule[:40] in str(err.value)
    assert str(err.value).startswith("mysql-1/rules.v4:11: ")


def test_a_rule_in_another_table_is_refused_and_an_empty_one_accepted(prod: Plan) -> None:
    text = prod.files["mysql-1"].ipv4
    parse_tables("*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n" + text, 4, "v4")
    with pytest.raises(ParseError, match=r"v4:2: a rule in table raw"):
        parse_tables("*raw\n-A PREROUTING -j NOTRACK\nCOMMIT\n" + text, 4, "v4")


@pytest.mark.parametrize(("line", "why"), [
    ("create s hash:ip,port family inet", "set type 'hash:ip,port' is not modelled"),
    ("add nowhere 10.0.0.1", "used before it is created"),
    ("create s hash:ip family inet timeout 60", "set option 'timeout'"),
])
def test_an_unmodelled_set_line_is_refused_naming_its_line(line: str, why: str) -> None:
    with pytest.raises(ParseError) as err:
        parse_ipsets("# about\n" + line + "\n", "ipsets")
    assert err.value.line == 2 and why in str(err.value)


def test_a_rule_naming_a_set_the_file_lacks_is_bad_input(prod: Plan) -> None:
    with pytest.raises(VerifyError, match=r"rules.v4: the rules match set 'enclave-tunnel\.\w+', which the ipsets file does not create"):
        prove(prod, "mysql-1", ipsets="")


def test_live_ipset_save_output_is_read() -> None:
    text = ("create enclave-mysql.k3x hash:ip family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x1\n"
            "add enclave-mysql.k3x 10.110.16.5\nadd enclave-mysql.k3x 10.110.16.9\n")
    sets = parse_ipsets(text, "ipsets")
    assert len(sets["enclave-mysql.k3x"].members) == 2


RICH_STACK = """
config:
  enclave:region: ams3
  enclave:vpcIpRange: 10.120.0.0/24
  enclave:image: ubuntu-24-04-x64
  enclave:sshUser: root
  enclave:sshPublicKey: ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGVuY2xhdmUtZXhhbXBsZS1rZXktbm90LXJlYWwtMDAy ops@example
  enclave:operators: [198.51.100.7/32, "2001:db8:aa::/48"]
  enclave:logDrops: true
  enclave:roles:
    web:
      count: 2
      size: s-1vcpu-1gb
      ipv6: true
      egress: restricted
      ingress:
        - {from: internet, ports: [tcp/80, tcp/443, icmp]}
        - {from: "203.0.113.0/24", ports: [udp/500-600]}
        - {from: "2001:db8:bb::/48", ports: [tcp/8443]}
        - {from: operators, ports: [tcp/9100]}
    app:
      count: 3
      size: s-1vcpu-1gb
      egress: restricted
      ingress:
        - {from: web, ports: [tcp/8080, icmp]}
        - {from: web-1, ports: [udp/9999]}
        - {from: app, ports: [tcp/7000-7010]}
    db:
      count: 1
      size: s-1vcpu-1gb
      ingress:
        - {from: app-2, ports: [tcp/5432]}
        - {from: [app, web], ports: [tcp/5432, udp/53]}
"""


def test_every_source_kind_egress_ipv6_and_logged_drops_prove(tmp_path: Path) -> None:
    path = tmp_path / "Pulumi.rich.yaml"
    path.write_text(RICH_STACK)
    plan = build_plan(load_stack_file(path))
    prover = Prover(plan.policy, plan.addresses)
    assert [h for h, f in plan.files.items() if not prover.prove(HostText.of(f)).proved] == []
    # web-1's own egress to app on udp/9999 (a single-host source) is what app admits from web-1 only
    web2 = plan.files["web-2"].ipv4.replace("-A ENCLAVE-OUTPUT -o eth1 -p tcp -m tcp --dport 8080",
                                            "-A ENCLAVE-OUTPUT -o eth1 -p udp -m udp --dport 9999 -m set --match-set "
                                            f"{landed(plan, 'web-2', 'enclave-app')} dst -j ACCEPT\n-A ENCLAVE-OUTPUT -o eth1 -p tcp -m tcp --dport 8080")
    found = only(Prover(plan.policy, plan.addresses).prove(dataclasses.replace(HostText.of(plan.files["web-2"]),
                                                                                 rules_v4=web2)))
    assert any("out eth1" in d and "udp/9999" in d and "rules ACCEPT" in d and "egress restricted: default drop" in d
               for d in found)


def test_a_chain_input_reaches_with_an_output_interface_is_refused(prod: Plan) -> None:
    v4 = prod.files["mysql-1"].ipv4.replace("-A ENCLAVE-INPUT -i lo -j ACCEPT", "-A ENCLAVE-INPUT -o lo -j ACCEPT")
    with pytest.raises(VerifyError, match=r"rules.v4:11: -o in a chain INPUT reaches \(ENCLAVE-INPUT\)"):
        prove(prod, "mysql-1", rules_v4=v4)


def test_the_proof_cost_benchmark_runs_on_a_small_fleet() -> None:
    from benchmarks.prove_cost import measure

    result = measure(100, rounds=1)
    assert result["distinct"] == 4 and result["atoms"] > 1000 and result["prove"] > 0


def test_a_docker_host_s_nat_rules_are_refused_saying_how_to_prove_the_filter_table_alone() -> None:
    text = ("*nat\n:PREROUTING ACCEPT [0:0]\n:DOCKER - [0:0]\n-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n"
            "COMMIT\n*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n")
    with pytest.raises(ParseError, match=r"v4:4: a rule in table nat: .* save it alone \(iptables-save -t filter\)"):
        parse_tables(text, 4, "v4")


DOCKER_FILTER = """-A FORWARD -j DOCKER-USER
-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o docker0 -j DOCKER
-A DOCKER -d 172.17.0.2/32 ! -i docker0 -o docker0 -p tcp -m tcp --dport 80 -j ACCEPT
-A DOCKER-USER -m physdev --physdev-is-bridged -j RETURN
-A DOCKER-USER -j RETURN
"""


def test_a_docker_host_s_forward_chains_do_not_stop_the_proof_of_input_and_output(prod: Plan) -> None:
    text = prod.files["mysql-1"].ipv4.replace(
        ":ENCLAVE-INPUT - [0:0]\n", ":ENCLAVE-INPUT - [0:0]\n:DOCKER - [0:0]\n:DOCKER-USER - [0:0]\n"
    ).replace("COMMIT\n", DOCKER_FILTER + "COMMIT\n")
    assert "physdev" in text
    assert prove(prod, "mysql-1", rules_v4=text).proved  # physdev is unmodelled, but only FORWARD reaches it
    reached = text.replace("COMMIT\n", "-A INPUT -j DOCKER-USER\nCOMMIT\n")
    with pytest.raises(ParseError, match=r"match module 'physdev' is not modelled"):
        prove(prod, "mysql-1", rules_v4=reached)
