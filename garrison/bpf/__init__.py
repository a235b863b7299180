"""The eBPF datapath: C programs (`bpf_lxc.c` over `lib/*.h`, ABI in `abi.h`), the bcc
loader, the ctypes mirror of the ABI, typed map accessors and the pure policy-map builder.

Importing this package loads nothing: `garrison.bpf.loader.Datapath.load()` does.
"""
