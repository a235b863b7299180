"""The CNI plugin `garrison-cni` (spec 1.0.0), chained after `ptp` or `bridge` + `host-local`:
it hands the container's host-side veth to the local agent and passes `prevResult` on."""
