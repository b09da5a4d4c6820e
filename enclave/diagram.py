"""The network as a picture: Graphviz (SVG) for docs, Mermaid for the README (code hosts render it).

Both are drawn from the compiled flows, so the picture cannot drift from the rules: the Internet, the operators
and any CIDR sources outside; the VPC as a box; inside it each role as a box listing its hosts; one arrow per
flow labelled with its ports (hover an arrow for its key and description). An egress allowlist's entries to the
Internet or a CIDR are dashed violet arrows out of the VPC. Flows arriving on the public interface (from the Internet, the operators or a
CIDR) are drawn in orange, and the roles they reach sit in the VPC's "public edge"; everything else is blue
and stays inside the VPC. What is not drawn is dropped.

Pure logic apart from running Graphviz's `dot` (through the `graphviz` package) to lay out the SVG.

For users: docs/cli.md#diagram.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import graphviz

from config.stackfile import Stack

from .compiler import Flow, Policy, Source, compile_policy

PUBLIC_COLOR = "#e8590c"  # orange: crosses the VPC's public edge
PRIVATE_COLOR = "#1c7ed6"  # blue: stays on the private network
PUBLIC_FILL = "#fff4e6"
VPC_FILL = "#f1f3f5"
VPC_LINE = "#868e96"
EGRESS_COLOR = "#7048e8"  # violet: an egress allowlist's way out
FONT = "Arial"  # metric-compatible stand-ins (Liberation Sans) exist wherever Arial does not


class DiagramError(Exception):
    """The diagram could not be drawn (e.g. Graphviz is missing); the message says how to fix it."""


@dataclass(frozen=True)
class Outsider:
    """A source outside the VPC: the Internet, the operators, or a CIDR from a `from:`."""

    node: str  # Graphviz/Mermaid node id: never a role name (roles have no '_' and may not be these words)
    title: str
    detail: str


@dataclass(frozen=True)
class Edge:
    flow: Flow
    tail: str  # node id of the source
    head: str  # node id of the destination role
    label: str  # the ports
    public: bool

    @property
    def tail_host(self) -> str | None:
        """A single-host source (`from: mysql-2`) starts at that host's row in its role's box."""
        return self.flow.source.name if self.flow.source.kind == "host" else None


@dataclass(frozen=True)
class EgressEdge:
    """An egress allowlist entry leaving the VPC: from a role to the Internet or a CIDR."""

    tail: str  # the role
    head: str  # the outsider's node id
    label: str  # the ports
    why: str  # the key and the description


@dataclass(frozen=True)
class NetworkPicture:
    """What both renderings show, derived once from the policy."""

    stack_name: str
    policy: Policy
    outsiders: tuple[Outsider, ...]
    entry_roles: tuple[str, ...]  # roles reached from outside, in stack order
    inner_roles: tuple[str, ...]
    edges: tuple[Edge, ...]
    egress_edges: tuple[EgressEdge, ...] = ()


def _outsider(source: Source, policy: Policy, cidrs: dict[str, str]) -> Outsider:
    if source.kind == "internet":
        return Outsider("internet", "Internet", "0.0.0.0/0, ::/0")
    if source.kind == "operators":
        nets = ", ".join(str(n) for n in policy.stack.operators) or "none set"
        return Outsider("operators", "operators", nets)
    node = cidrs.setdefault(source.name, f"net_{len(cidrs) + 1}")
    return Outsider(node, "CIDR", source.name)


def _role_of_source(policy: Policy, source: Source) -> str:
    return source.name if source.kind == "role" else policy.host_by_name[source.name].role


def network_picture(stack_name: str, policy: Policy) -> NetworkPicture:
    outsiders: dict[str, Outsider] = {}
    cidrs: dict[str, str] = {}
    edges = []
    for flow in policy.flows:
        public = flow.interface == "public"
        if public:
            outsider = _outsider(flow.source, policy, cidrs)
            outsiders.setdefault(outsider.node, outsider)
            tail = outsider.node
        else:
            tail = _role_of_source(policy, flow.source)
        label = ", ".join(str(p) for p in flow.ports)
        edges.append(Edge(flow, tail, flow.role, label, public))
    entry = tuple(r for r in policy.stack.roles if any(e.public and e.head == r for e in edges))
    inner = tuple(r for r in policy.stack.roles if r not in entry)
    egress = []
    for role, allowed in policy.egress.items():
        for e in allowed:
            if e.interface != "public" or e.why.startswith("egress essential"):
                continue  # private entries are drawn as the flows they agree with; essentials are in the role's box
            outsider = _outsider(Source("internet" if e.kind == "internet" else "cidr", e.to), policy, cidrs)
            outsiders.setdefault(outsider.node, outsider)
            why = e.why + (f": {e.description}" if e.description else "")
            egress.append(EgressEdge(role, outsider.node, ", ".join(str(p) for p in e.ports), why))
    return NetworkPicture(stack_name, policy, tuple(outsiders.values()), entry, inner, tuple(edges), tuple(egress))


def _why(flow: Flow) -> str:
    return flow.why + (f": {flow.description}" if flow.description else "")


def _role_facts(policy: Policy, role_name: str) -> str:
    role = policy.stack.roles[role_name]
    facts = [f"{role.count} × {role.size}"]
    if role.bastion:
        facts.append("bastion")
    if not role.public:
        facts.append("private: no public address"
                     + (", Internet via the NAT gateway" if policy.stack.uses_nat_gateway() else ", no Internet"))
    if role.ipv6:
        facts.append("IPv6")
    if role.egress == "restricted":
        facts.append("egress restricted")
    if role.allowlist is not None:
        kept = [k for k in ("dns", "metadata", "ntp") if getattr(policy.stack.egress_essentials, k)]
        facts.append("egress allowlist" + (f" (+ {', '.join(kept)})" if kept else ""))
    return " · ".join(facts)


def _hosts(policy: Policy, role: str) -> list[str]:
    return [h.name for h in policy.hosts if h.role == role]


# ------------------------------------------------------------------------------------------- Graphviz


def _role_label(policy: Policy, role: str, public: bool) -> str:
    esc = html.escape
    header = PUBLIC_COLOR if public else "#dee2e6"
    header_font = "white" if public else "black"
    rows = [
        f'<TR><TD BGCOLOR="{header}"><FONT COLOR="{header_font}"><B>{esc(role)}</B></FONT></TD></TR>',
        f'<TR><TD><FONT POINT-SIZE="9">{esc(_role_facts(policy, role))}</FONT></TD></TR>',
    ]
    if policy.stack.roles[role].description:
        rows.append(f'<TR><TD><FONT POINT-SIZE="9"><I>{esc(str(policy.stack.roles[role].description))}</I></FONT></TD></TR>')
    hosts = _hosts(policy, role)
    rows += [f'<TR><TD PORT="{esc(h)}">{esc(h)}</TD></TR>' for h in hosts]
    if not hosts:
        rows.append('<TR><TD><I>no hosts (count 0)</I></TD></TR>')
    border = PUBLIC_COLOR if public else "#495057"
    return (
        f'<<TABLE BORDER="1" CELLBORDER="0" CELLSPACING="0" CELLPADDING="4" BGCOLOR="white" COLOR="{border}">'
        + "".join(rows)
        + "</TABLE>>"
    )


def _padded(markup: str) -> str:
    # a cluster is only as wide as its label: pad it so the text keeps clear of the border
    return f'<<TABLE BORDER="0" CELLPADDING="6"><TR><TD>{markup}</TD></TR></TABLE>>'


def to_dot(picture: NetworkPicture) -> graphviz.Digraph:
    policy = picture.policy
    stack = policy.stack
    legend = (
        '<<TABLE BORDER="0" CELLSPACING="2"><TR>'
        f'<TD><FONT COLOR="{PUBLIC_COLOR}"><B>━━ public entry</B></FONT></TD>'
        f'<TD><FONT COLOR="{PUBLIC_COLOR}">from outside the VPC</FONT></TD><TD WIDTH="20"></TD>'
        f'<TD><FONT COLOR="{PRIVATE_COLOR}"><B>━━ private flow</B></FONT></TD>'
        f'<TD><FONT COLOR="{PRIVATE_COLOR}">inside the VPC only</FONT></TD><TD WIDTH="20"></TD>'
        "<TD>anything not drawn is dropped</TD>"
        "</TR></TABLE>>"
    )
    dot: graphviz.Digraph = graphviz.Digraph(
        "enclave",
        graph_attr={
            "label": legend, "labelloc": "b", "fontname": FONT, "rankdir": "TB", "newrank": "true",
            "nodesep": "0.5", "ranksep": "0.8", "bgcolor": "white", "pad": "0.3",
        },
        node_attr={"fontname": FONT, "fontsize": "11"},
        edge_attr={"fontname": FONT, "fontsize": "10"},
    )
    with dot.subgraph(name="outside") as outside:
        outside.attr(rank="source")
        for o in picture.outsiders:
            shape = "ellipse" if o.node == "internet" else "box"
            label = f"<<B>{html.escape(o.title)}</B><BR/><FONT POINT-SIZE='9'>{html.escape(o.detail)}</FONT>>"
            outside.node(
                o.node, label, shape=shape, style="rounded,filled", fillcolor="#fff0f0" if shape == "ellipse" else "white",
                color=PUBLIC_COLOR, penwidth="1.5",
            )
    with dot.subgraph(name="cluster_vpc") as vpc:
        vpc_title = f"VPC {picture.stack_name} · {stack.vpc_ip_range} · {stack.region}: private network"
        vpc.attr(
            # at the bottom: the arrows coming in from outside cross the top edge
            label=_padded(f"<B>{html.escape(vpc_title)}</B>"), labelloc="b",
            style="rounded,filled", fillcolor=VPC_FILL, color=VPC_LINE, fontname=FONT,
        )
        if picture.entry_roles:
            with vpc.subgraph(name="cluster_public_edge") as edge:
                edge.attr(
                    label=_padded("public edge: reachable from outside"), labelloc="b", style="rounded,dashed,filled",
                    fillcolor=PUBLIC_FILL, color=PUBLIC_COLOR, fontcolor=PUBLIC_COLOR, penwidth="2", fontname=FONT,
                )
                for role in picture.entry_roles:
                    edge.node(role, _role_label(policy, role, True), shape="plain")
        for role in picture.inner_roles:
            vpc.node(role, _role_label(policy, role, False), shape="plain")
    for e in picture.edges:
        color = PUBLIC_COLOR if e.public else PRIVATE_COLOR
        tail = f"{e.tail}:{e.tail_host}" if e.tail_host else e.tail
        label = f"from {e.tail_host}: {e.label}" if e.tail_host else e.label
        dot.edge(
            tail, e.head, label=f" {label} ", color=color, fontcolor=color,
            penwidth="2.5" if e.public else "1.3", tooltip=_why(e.flow),
        )
    for out in picture.egress_edges:
        dot.edge(out.tail, out.head, label=f" {out.label} ", color=EGRESS_COLOR, fontcolor=EGRESS_COLOR,
                 style="dashed", penwidth="1.8", tooltip=out.why, constraint="false")
    return dot


def render_svg(picture: NetworkPicture) -> bytes:
    try:
        svg: bytes = to_dot(picture).pipe(format="svg")
    except graphviz.ExecutableNotFound:
        raise DiagramError(
            "Graphviz's `dot` is not installed: `apt-get install graphviz` (or `make setup` as root)"
        ) from None
    return svg


# -------------------------------------------------------------------------------------------- Mermaid


def _mm(text: str) -> str:
    """Text inside a quoted Mermaid label: its own entity codes, since it may not hold '"' and reads HTML."""
    return text.replace("&", "#amp;").replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")


def _mm_id(node: str) -> str:
    return "role_" + node.replace("-", "_")


def to_mermaid(picture: NetworkPicture) -> str:
    policy = picture.policy
    stack = policy.stack
    roles = set(stack.roles)

    def node_id(node: str) -> str:
        return _mm_id(node) if node in roles else node

    def role_node(role: str) -> str:
        hosts = " · ".join(_hosts(policy, role)) or "no hosts (count 0)"
        about = policy.stack.roles[role].description
        described = f"<br/><i>{_mm(about)}</i>" if about else ""
        return f'{_mm_id(role)}["<b>{_mm(role)}</b><br/>{_mm(_role_facts(policy, role))}{described}<br/>{_mm(hosts)}"]'

    lines = [
        f"%% enclave stack {picture.stack_name}: generated by `enclave diagram`; edit the stack file, not this.",
        "flowchart TB",
    ]
    for o in picture.outsiders:
        shape = ('((', '))') if o.node == "internet" else ('[', ']')
        lines.append(f'    {o.node}{shape[0]}"<b>{_mm(o.title)}</b><br/>{_mm(o.detail)}"{shape[1]}')
    lines.append(f'    subgraph vpc["VPC {_mm(picture.stack_name)} · {stack.vpc_ip_range} · {_mm(stack.region)}: private network"]')
    if picture.entry_roles:
        lines.append('        subgraph public_edge["public edge: reachable from outside"]')
        lines += [f"            {role_node(r)}" for r in picture.entry_roles]
        lines.append("        end")
    lines += [f"        {role_node(r)}" for r in picture.inner_roles]
    lines.append("    end")
    public_links: list[str] = []
    private_links: list[str] = []
    for i, e in enumerate(picture.edges):
        label = f"from {e.tail_host}: {e.label}" if e.tail_host else e.label
        lines.append(f'    {node_id(e.tail)} -->|"{_mm(label)}"| {node_id(e.head)}')
        (public_links if e.public else private_links).append(str(i))
    egress_links = []
    for i, out in enumerate(picture.egress_edges, len(picture.edges)):
        lines.append(f'    {node_id(out.tail)} -.->|"{_mm(out.label)}"| {node_id(out.head)}')
        egress_links.append(str(i))
    lines += [
        f"    classDef outside fill:#fff0f0,stroke:{PUBLIC_COLOR},stroke-width:2px",
        f"    classDef entry fill:{PUBLIC_FILL},stroke:{PUBLIC_COLOR},stroke-width:3px",
        "    classDef inner fill:#ffffff,stroke:#495057",
        f"    style vpc fill:{VPC_FILL},stroke:{VPC_LINE}",
    ]
    if picture.outsiders:
        lines.append(f"    class {','.join(o.node for o in picture.outsiders)} outside")
    if picture.entry_roles:
        lines.append(f"    style public_edge fill:{PUBLIC_FILL},stroke:{PUBLIC_COLOR},stroke-dasharray:5 5")
        lines.append(f"    class {','.join(_mm_id(r) for r in picture.entry_roles)} entry")
    if picture.inner_roles:
        lines.append(f"    class {','.join(_mm_id(r) for r in picture.inner_roles)} inner")
    if public_links:
        lines.append(f"    linkStyle {','.join(public_links)} stroke:{PUBLIC_COLOR},stroke-width:3px,color:{PUBLIC_COLOR}")
    if private_links:
        lines.append(f"    linkStyle {','.join(private_links)} stroke:{PRIVATE_COLOR},stroke-width:1.5px")
    if egress_links:
        lines.append(f"    linkStyle {','.join(egress_links)} stroke:{EGRESS_COLOR},stroke-width:1.5px,color:{EGRESS_COLOR}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ the files


def write_diagram(stack: Stack, output: Path) -> list[Path]:
    """`<output>.mmd` and `<output>.svg` for the stack; returns the paths written."""
    if output.suffix in (".svg", ".mmd"):
        output = output.with_suffix("")  # `--output docs/prod.svg` means the pair docs/prod.{svg,mmd}
    picture = network_picture(stack.name, compile_policy(stack.config))
    output.parent.mkdir(parents=True, exist_ok=True)
    mmd = output.with_name(output.name + ".mmd")
    mmd.write_text(to_mermaid(picture))
    svg = output.with_name(output.name + ".svg")
    try:
        svg.write_bytes(render_svg(picture))
    except DiagramError as exc:
        raise DiagramError(f"{exc}; {mmd} was written") from None
    return [svg, mmd]
