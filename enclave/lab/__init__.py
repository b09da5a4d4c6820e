"""The lab: a stack's network in Linux network namespaces, pushed over SSH and probed with real packets.

Keep this file free of imports: the probe agent (enclave.lab.agent, stdlib only) imports this package when it
starts, before the lab can probe anything. The lab itself is enclave.lab.lab.Lab.
"""
