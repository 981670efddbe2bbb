"""Hypervisor layer: QEMU processes, QMP control, dirty-bitmap cycles and the NBD client."""
