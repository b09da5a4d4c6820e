"""The lab: a stack's network in Linux network namespaces, pushed over SSH and probed with real packets.

Keep this file free of imports: every probe agent (enclave.lab.agent, stdlib only) imports this package when it
starts, and the lab starts one per namespace. The lab itself is enclave.lab.lab.Lab.
"""
