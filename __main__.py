"""enclave: a private network of DigitalOcean droplets whose host firewalls come from role declarations.

`pulumi up` reads the stack's `enclave:` config (checked exactly as `enclave plan` checks it), builds one
EnclaveNetwork (components/network.py: VPC, droplets, one firewall push per droplet) and exports what an
operator needs next: the hosts' addresses, the bastion, an OpenSSH config and the flow table.
"""

import gc

import pulumi

from components.network import EnclaveNetwork
from components.stack_config import read_stack_settings

# The program holds a few hundred objects per host (Outputs, futures, tasks) until it ends; with the default
# thresholds the cyclic GC rescans them all so often that a 3 000-host stack spent a third of its CPU time there
# (docs/benchmarks.md). Collect less often: the garbage it lets wait is bounded by the first threshold.
gc.set_threshold(100_000, 50, 1000)

settings = read_stack_settings()
network = EnclaveNetwork(settings)

pulumi.export("hosts", network.hosts)
pulumi.export("bastion", network.bastion)
pulumi.export("sshConfig", network.ssh_config)
pulumi.export("flows", network.flows)
