"""enclave: a private network of DigitalOcean droplets whose host firewalls come from role declarations.

`pulumi up` reads the stack's `enclave:` config (checked exactly as `enclave plan` checks it), builds one
EnclaveNetwork (components/network.py: VPC, droplets, one firewall push per droplet) and exports what an
operator needs next: the hosts' addresses, the bastion, an OpenSSH config and the flow table.
"""

import pulumi

from components.network import EnclaveNetwork
from components.stack_config import read_stack_settings

settings = read_stack_settings()
network = EnclaveNetwork(settings)

pulumi.export("hosts", network.hosts)
pulumi.export("bastion", network.bastion)
pulumi.export("sshConfig", network.ssh_config)
pulumi.export("flows", network.flows)
