"""Kernel plumbing for the datapath: endpoint namespaces and veths, tc attachment, the proxy
steering rule and route, bpffs pin directories, proxy socket options. Idempotent; every
`create`/`install`/`attach` has a teardown that removes what it made."""

from garrison.redirect.bpffs import ensure_bpffs, prepare_pin_dir, remove_pin_dir, unmount_bpffs
from garrison.redirect.endpoint import (
    DEFAULT_GATEWAY,
    ENDPOINT_RANGE,
    EndpointLink,
    EndpointNetworkError,
    EndpointSpec,
    create_endpoint,
    delete_endpoint,
    endpoint_exists,
    host_ifname_for,
)
from garrison.redirect.sockets import set_transparent, set_upstream_mark
from garrison.redirect.steering import (
    SteeringParts,
    SteeringRecord,
    install_proxy_steering,
    proxy_steering_installed,
    proxy_steering_present,
    remove_proxy_steering,
)
from garrison.redirect.tc import (
    attach_endpoint_programs,
    attached_filters,
    detach_endpoint_programs,
    has_clsact,
)

__all__ = [
    "DEFAULT_GATEWAY",
    "ENDPOINT_RANGE",
    "EndpointLink",
    "EndpointNetworkError",
    "EndpointSpec",
    "SteeringParts",
    "SteeringRecord",
    "attach_endpoint_programs",
    "attached_filters",
    "create_endpoint",
    "delete_endpoint",
    "detach_endpoint_programs",
    "endpoint_exists",
    "ensure_bpffs",
    "has_clsact",
    "host_ifname_for",
    "install_proxy_steering",
    "prepare_pin_dir",
    "proxy_steering_installed",
    "proxy_steering_present",
    "remove_pin_dir",
    "remove_proxy_steering",
    "set_transparent",
    "set_upstream_mark",
    "unmount_bpffs",
]
