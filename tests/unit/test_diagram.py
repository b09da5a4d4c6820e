"""`enclave diagram`: the picture of the network shows the seed's goal, and what is drawn is the compiled policy."""

from __future__ import annotations

import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from config.schema import enclave_keys, load_config
from config.stackfile import Stack, load_stack
from enclave.cli import main
from enclave.compiler import compile_policy
from enclave.diagram import PRIVATE_COLOR, PUBLIC_COLOR, network_picture, to_dot, to_mermaid, write_diagram

from ..conftest import ROOT, stack_document

SVG_NS = {"svg": "http://www.w3.org/2000/svg"}
REGENERATE = "regenerate with `.venv/bin/enclave diagram --stack prod --output docs/prod`"


def rgb(color: str) -> tuple[int, int, int]:
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


def pixels_near(image: Image.Image, color: str, tolerance: int = 40) -> int:
    target = rgb(color)
    return sum(
        count
        for count, pixel in image.getcolors(maxcolors=1 << 24) or []
        if isinstance(pixel, tuple) and sum(abs(a - b) for a, b in zip(pixel[:3], target)) <= tolerance
    )


def svg_to_png(svg: Path, png: Path) -> Image.Image:
    converter = shutil.which("rsvg-convert")
    assert converter, "rsvg-convert is missing: `apt-get install librsvg2-bin` (make setup as root installs it)"
    subprocess.run([converter, "--background-color", "white", "-o", str(png), str(svg)], check=True)
    return Image.open(png).convert("RGB")


def test_prod_svg_renders_to_a_picture_with_public_entries_set_apart(tmp_path: Path) -> None:
    svg, mmd = write_diagram(load_stack("prod"), tmp_path / "prod")
    image = svg_to_png(svg, tmp_path / "prod.png")
    width, height = image.size
    assert width >= 500 and height >= 500, image.size
    colors = image.getcolors(maxcolors=1 << 24) or []
    white = sum(count for count, pixel in colors if pixel == (255, 255, 255))
    ink = 1 - white / (width * height)
    assert 0.05 < ink < 0.9, f"{ink:.0%} of the picture is not white"
    assert len(colors) > 50  # text, boxes, two arrow colours, fills: not a blank or one-colour image
    # both arrow colours are visible, and public entries are a visible share of the drawing
    assert pixels_near(image, PUBLIC_COLOR) > 2000
    assert pixels_near(image, PRIVATE_COLOR) > 2000


def edges_by_color(svg_text: str) -> dict[str, set[str]]:
    """`tail->head` of each drawn arrow, grouped by its stroke colour."""
    root = ET.fromstring(svg_text)
    out: dict[str, set[str]] = {}
    for group in root.iter("{http://www.w3.org/2000/svg}g"):
        if group.get("class") != "edge":
            continue
        title = group.find("svg:title", SVG_NS)
        path = group.find(".//svg:path", SVG_NS)
        assert title is not None and title.text and path is not None
        tail, head = title.text.split("->")
        out.setdefault(path.get("stroke", ""), set()).add(f"{tail.split(':')[0]}->{head}")
    return out


def svg_texts(svg_text: str) -> list[str]:
    root = ET.fromstring(svg_text)
    return [t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text")]


def test_prod_picture_is_the_seed_goal(tmp_path: Path) -> None:
    """Only haproxy-www open to the Internet on 80, the bastion to operators on 22; every other arrow is private."""
    svg, _ = write_diagram(load_stack("prod"), tmp_path / "prod")
    text = svg.read_text()
    edges = edges_by_color(text)
    assert edges[PUBLIC_COLOR] == {"internet->haproxy-www", "operators->tunnel"}
    assert all(not e.startswith(("internet", "operators")) for e in edges[PRIVATE_COLOR])
    policy = compile_policy(load_stack("prod").config)
    assert sum(len(v) for v in edges.values()) == len({(str(f.source), f.role) for f in policy.flows})
    words = svg_texts(text)
    for host in policy.hosts:
        assert host.name in words
    for label in ("Internet", "operators", "tcp/80", "tcp/22", "tcp/3306", "tcp/24007-24008, tcp/49152-49251"):
        assert any(label in w for w in words), label
    assert any(w.startswith("public edge") for w in words)


def mermaid_edges(text: str) -> list[tuple[str, str, str]]:
    return re.findall(r'^\s+(\w+) -->\|"([^"]*)"\| (\w+)$', text, re.M)


def test_mermaid_has_a_node_per_role_and_an_edge_per_flow() -> None:
    stack = load_stack("prod")
    policy = compile_policy(stack.config)
    text = to_mermaid(network_picture("prod", policy))
    assert text.splitlines()[1] == "flowchart TB"
    for role in policy.stack.roles:
        node = "role_" + role.replace("-", "_")
        assert re.search(rf'^\s+{node}\["<b>{role}</b>', text, re.M), role
    edges = mermaid_edges(text)
    assert len(edges) == len(policy.flows)
    assert [(tail, head) for tail, _, head in edges].count(("internet", "role_haproxy_www")) == 1
    # the public links are styled apart: exactly the links from outside the VPC
    public = re.search(rf"linkStyle ([\d,]+) stroke:{PUBLIC_COLOR}", text)
    assert public is not None
    assert {edges[int(i)][0] for i in public.group(1).split(",")} == {"internet", "operators"}
    assert text.count("subgraph") == 2 and text.count("\n    end") == 1  # the VPC and its public edge


def stack_from(doc: dict[str, Any]) -> Stack:
    return Stack("prod", load_config(enclave_keys(doc["config"])))


def test_cidr_and_single_host_sources() -> None:
    doc = stack_document("prod")
    doc["config"]["enclave:roles"]["mysql"]["ingress"] = [
        {"from": "mysql-2", "ports": "tcp/3306"},
        {"from": ["203.0.113.0/24"], "ports": "tcp/9104"},
    ]
    doc["config"]["enclave:tests"] = []
    picture = network_picture("prod", compile_policy(stack_from(doc).config))
    text = to_mermaid(picture)
    assert ("role_mysql", "from mysql-2: tcp/3306", "role_mysql") in mermaid_edges(text)
    assert ("net_1", "tcp/9104", "role_mysql") in mermaid_edges(text)
    assert 'net_1["<b>CIDR</b><br/>203.0.113.0/24"]' in text
    assert "role_mysql" in text.split("subgraph public_edge")[1].split("end")[0]  # reached from outside now
    dot = to_dot(picture).source
    assert re.search(r'mysql:"mysql-2" -> mysql', dot), "a host source starts at that host's row"


def test_committed_diagrams_are_current() -> None:
    expected = to_mermaid(network_picture("prod", compile_policy(load_stack("prod").config)))
    assert (ROOT / "docs" / "prod.mmd").read_text() == expected, REGENERATE
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```mermaid\n(.*?)```", readme, re.S)
    assert block is not None and block.group(1) == expected, "README's diagram: paste docs/prod.mmd in; " + REGENERATE
    svg_text = (ROOT / "docs" / "prod.svg").read_text()
    assert edges_by_color(svg_text)[PUBLIC_COLOR] == {"internet->haproxy-www", "operators->tunnel"}, REGENERATE


def test_cli_writes_both_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagram", "--stack", "dev", "--output", str(tmp_path / "out" / "dev.svg")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dev.mmd", "dev.svg"]
    assert "wrote" in capsys.readouterr().out


def test_cli_without_graphviz_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no `dot` on it
    assert main(["diagram", "--stack", "dev", "--output", str(tmp_path / "dev")]) == 1
    err = capsys.readouterr().err
    assert "apt-get install graphviz" in err and "dev.mmd was written" in err
    assert (tmp_path / "dev.mmd").is_file() and not (tmp_path / "dev.svg").exists()


def test_cli_unwritable_output_names_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["diagram", "--stack", "dev", "--output", str(blocker / "dev")]) == 2
    assert "--output" in capsys.readouterr().err
