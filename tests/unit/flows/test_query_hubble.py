"""The filters select what `hubble observe` selects for the same flags.

Each test states a rule of Hubble's filter code (the CLI's `filterTracker` in
hubble/cmd/observe/flows_filter.go, the server's pkg/hubble/filters) and checks it on flows
written as Hubble's JSON, so a user's saved `hubble observe` command gives the same flows.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from garrison.flows.codec import parse_time
from garrison.flows.query import (
    FilterError,
    FlowQuery,
    parse_selector,
    parse_time_bound,
    request_uri_path,
)


def flow(
    src: str = "",
    dst: str = "",
    *,
    sport: int | None = 40000,
    dport: int | None = 80,
    verdict: str = "FORWARDED",
    l4: str = "TCP",
    **extra: Any,
) -> dict[str, Any]:
    """A flow from `ns/pod` to `ns/pod` (an empty side is a world address)."""

    def side(text: str, ip: str) -> dict[str, Any]:
        if not text:
            return {"identity": 2, "labels": ["reserved:world"]}
        ns, pod = text.split("/")
        return {"identity": 1000, "namespace": ns, "pod_name": pod,
                "labels": [f"k8s:app={pod.split('-')[0]}",
                           f"k8s:io.kubernetes.pod.namespace={ns}"]}

    d: dict[str, Any] = {
        "time": "2026-12-05T11:59:00.000000000Z",
        "verdict": verdict,
        "IP": {"source": "10.0.0.1", "destination": "10.0.0.2"},
        "source": side(src, "10.0.0.1"),
        "destination": side(dst, "10.0.0.2"),
        "event_type": {"type": 4},
    }
    if l4 == "ICMPv4":
        d["l4"] = {"ICMPv4": {"type": 8}}
    else:
        d["l4"] = {l4: {"source_port": sport, "destination_port": dport}}
    d.update(extra)
    return d


def q(*argv: str) -> FlowQuery:
    """The query of `argv` as the command line gives it: `--not` before a flag negates it."""
    flags: list[tuple[str, str, bool]] = []
    negate = False
    i = 0
    while i < len(argv):
        name = {"-t": "type", "-4": "ipv4", "-6": "ipv6"}.get(argv[i], argv[i].lstrip("-"))
        if name == "not":
            negate = True
            i += 1
            continue
        if name.endswith("all-namespaces") or name in ("ipv4", "ipv6"):
            flags.append((name, "true", negate))
            i += 1
        else:
            flags.append((name, argv[i + 1], negate))
            i += 2
        negate = False
    return FlowQuery.of(flags)


def selects(query: FlowQuery, *flows: dict[str, Any]) -> list[bool]:
    compiled = query.compile()
    return [compiled.matches(f) for f in flows]


# --- pods and namespaces --------------------------------------------------------------------


def test_a_bare_pod_name_is_in_the_default_namespace() -> None:
    in_default = flow("default/web-1", "default/db-0")
    elsewhere = flow("shop/web-1", "shop/db-0")
    assert selects(q("--pod", "web"), in_default, elsewhere) == [True, False]
    assert selects(q("--pod", "shop/web"), in_default, elsewhere) == [False, True]
    # NS/ is every pod of the namespace
    assert selects(q("--to-pod", "shop/"), in_default, elsewhere) == [False, True]
    # --all-namespaces puts no namespace in front of a bare name: any namespace
    assert selects(q("--pod", "web", "--all-namespaces"), in_default, elsewhere) == [True, True]


def test_namespace_is_put_in_front_of_bare_pod_names() -> None:
    # Hubble: `--pod web --namespace shop` is shop/web on either side, not default/web
    assert selects(q("--pod", "web", "--namespace", "shop"),
                   flow("default/web-1", "default/db-0"), flow("shop/web-1", "x/y"),
                   flow("shop/db-0", "default/web-1")) == [False, True, False]
    # namespaces OR; each side on its own
    assert selects(q("--namespace", "a", "--namespace", "b"), flow("a/p", ""),
                   flow("", "b/p"), flow("c/p", "c/q")) == [True, True, False]
    assert selects(q("--from-namespace", "a", "--to-namespace", "b"), flow("a/p", "b/q"),
                   flow("b/q", "a/p")) == [True, False]


def test_direction_less_flags_stay_on_one_endpoint() -> None:
    # the example: a cilium pod calling out to 443 elsewhere is not selected
    out_to_443 = flow("cilium/agent-1", "default/api-0", sport=40000, dport=443)
    into_cilium_443 = flow("default/client-0", "cilium/hubble-0", sport=50000, dport=443)
    from_cilium_443 = flow("cilium/hubble-0", "default/client-0", sport=443, dport=50000)
    assert selects(q("--namespace", "cilium", "--port", "443"), out_to_443, into_cilium_443,
                   from_cilium_443) == [False, True, True]
    # --label and --identity likewise: the source's labels with the source's identity
    labelled = flow("default/web-1", "default/db-0")
    labelled["destination"]["identity"] = 7
    assert selects(q("--label", "app=web", "--identity", "7"), labelled) == [False]
    assert selects(q("--label", "app=db", "--identity", "7"), labelled) == [True]
    # a flag with a direction joins both filters
    assert selects(q("--pod", "web", "--to-port", "80"), flow("default/web-1", "x/y"),
                   flow("x/y", "default/web-1", dport=8080)) == [True, False]


def test_a_pod_outside_the_namespace_given_is_an_error() -> None:
    with pytest.raises(FilterError, match="pod 'kube-system/dns' is not in --namespace "
                                          "default: the filters contradict"):
        q("--pod", "kube-system/dns", "--namespace", "default").compile()
    with pytest.raises(FilterError, match="is not in --namespace shop"):
        q("--to-pod", "db/x", "--to-namespace", "shop").compile()
    # a pod in the namespace given is no contradiction
    q("--pod", "shop/web", "--namespace", "shop").compile()


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("--ip", "10.0.0.1"), ("--pod", "web")),
        (("--ip", "10.0.0.1"), ("--namespace", "shop")),
        (("--from-ip", "10.0.0.1"), ("--from-pod", "web")),
        (("--to-ip", "10.0.0.1"), ("--to-namespace", "shop")),
        (("--pod", "web"), ("--from-pod", "db")),
        (("--namespace", "shop"), ("--from-namespace", "db")),
        (("--to-pod", "web"), ("--namespace", "shop")),
        (("--from-pod", "web"), ("--namespace", "shop")),
        (("--label", "app=a"), ("--from-label", "app=b")),
        (("--label", "app=a"), ("--to-label", "app=b")),
        (("--port", "80"), ("--to-port", "81")),
        (("--port", "80"), ("--from-port", "81")),
        (("--identity", "2"), ("--to-identity", "3")),
        (("--identity", "2"), ("--from-identity", "3")),
    ],
)
def test_flag_pairs_hubble_refuses_to_combine(first: tuple[str, str],
                                              second: tuple[str, str]) -> None:
    with pytest.raises(FilterError, match=f"filters {first[0]} and {second[0]} cannot be "
                                          "combined"):
        q(*first, *second).compile()
    # each list is checked on its own: one of them after --not is fine
    q(*first, "--not", *second).compile()


def test_combinations_hubble_takes() -> None:
    for argv in (("--pod", "web", "--namespace", "default"), ("--from-pod", "a", "--to-pod", "b"),
                 ("--from-label", "a", "--to-label", "b"), ("--from-port", "1", "--to-port", "2"),
                 ("--from-pod", "a", "--from-namespace", "default")):
        q(*argv).compile()


# --- --not ----------------------------------------------------------------------------------


def test_several_not_flags_are_one_exclusion_filter() -> None:
    drop_in_ks = flow("kube-system/dns-0", "default/x", verdict="DROPPED")
    drop_elsewhere = flow("default/web-0", "default/x", verdict="DROPPED")
    forward_in_ks = flow("kube-system/dns-0", "default/x")
    query = q("--not", "--verdict", "DROPPED", "--not", "--namespace", "kube-system")
    # hidden only when it matches all of them
    assert selects(query, drop_in_ks, drop_elsewhere, forward_in_ks) == [False, True, True]
    # one flag's values OR inside the filter: either verdict is hidden
    assert selects(q("--not", "--verdict", "DROPPED", "--not", "--verdict", "FORWARDED"),
                   drop_elsewhere, forward_in_ks, flow(verdict="AUDIT")) == [False, False, True]
    # an allow list and an exclusion together
    assert selects(q("--namespace", "kube-system", "--not", "--verdict", "FORWARDED"),
                   drop_in_ks, forward_in_ks, drop_elsewhere) == [True, False, False]


# --- values ---------------------------------------------------------------------------------


def test_drop_reason_never_selects_audit_or_forwarded() -> None:
    dropped = flow(verdict="DROPPED", drop_reason_desc="POLICY_DENIED")
    audit = flow(verdict="AUDIT", drop_reason_desc="POLICY_DENIED")
    forwarded = flow(verdict="FORWARDED", drop_reason_desc="POLICY_DENIED")
    # garrison's ERROR records (a connection the proxy closed) carry a reason too
    parse_error = flow(verdict="ERROR", drop_reason_desc="PARSE_ERROR")
    assert selects(q("--drop-reason-desc", "POLICY_DENIED"), dropped, audit, forwarded) == [
        True, False, False]
    assert selects(q("--drop-reason-desc", "PARSE_ERROR"), parse_error) == [True]
    # any of Hubble's reasons is a valid filter
    assert selects(q("--drop-reason-desc", "CT_MAP_INSERTION_FAILED"), dropped) == [False]


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("http://h/v1/a%20b?x=%20", "/v1/a b"),
        ("http://h:8080/v1/x%2Fy", "/v1/x/y"),
        ("/v1/caf%C3%A9", "/v1/café"),
        ("/a#b", "/a#b"),  # a request has no fragment: Go keeps `#` in the path
        ("http://h", ""),
        ("http://h?q=1", ""),
        ("/bad%zz", None),  # Go refuses the escape: no match
        ("v1/relative", None),
        ("", None),
    ],
)
def test_http_path_is_the_decoded_request_path(url: str, path: str | None) -> None:
    assert request_uri_path(url) == path


def test_http_path_matches_the_decoded_path() -> None:
    encoded = flow(l7={"http": {"method": "GET", "url": "http://h/files/a%20b.txt"}},
                   event_type={"type": 129})
    assert selects(q("--http-path", "^/files/a b\\.txt$"), encoded) == [True]
    assert selects(q("--http-path", "%20"), encoded) == [False]
    assert selects(q("--http-url", "%20"), encoded) == [True]  # the URL as written


def test_protocol_http_includes_grpc_and_grpc_is_grpc_only() -> None:
    http = flow(l7={"http": {"method": "GET", "url": "/"}})
    grpc = flow(l7={"http": {"method": "POST", "url": "/pkg.S/M"},
                    "grpc": {"service": "pkg.S", "method": "M"}})
    assert selects(q("--protocol", "http"), http, grpc) == [True, True]
    assert selects(q("--protocol", "grpc"), http, grpc) == [False, True]
    # L4 names match the l4 part, which proxy records have as well
    assert selects(q("--protocol", "TCP"), http, flow(l4="UDP")) == [True, False]
    assert selects(q("--protocol", "icmp"), flow(l4="ICMPv4"), flow()) == [True, False]
    assert selects(q("--protocol", "dns"), http) == [False]  # Hubble's, never in garrison


def test_hubble_verdicts() -> None:
    assert selects(q("--verdict", "REDIRECTED"), flow(verdict="REDIRECTED"), flow()) == [
        True, False]
    for name in ("TRACED", "TRANSLATED", "VERDICT_UNKNOWN", "audit"):
        q("--verdict", name).compile()
    unknown = flow()
    del unknown["verdict"]
    assert selects(q("--verdict", "VERDICT_UNKNOWN"), unknown, flow()) == [True, False]


def test_event_types_by_name_number_and_sub_type() -> None:
    l7 = flow(event_type={"type": 129})
    drop_133 = flow(event_type={"type": 1, "sub_type": 133})
    drop_181 = flow(event_type={"type": 1, "sub_type": 181})
    to_endpoint = flow(event_type={"type": 4})  # sub type 0, omitted in JSON
    to_proxy = flow(event_type={"type": 4, "sub_type": 1})
    every = (l7, drop_133, drop_181, to_endpoint, to_proxy)
    assert selects(q("-t", "129"), *every) == selects(q("-t", "l7"), *every)
    assert selects(q("-t", "129"), *every) == [True, False, False, False, False]
    assert selects(q("-t", "drop:133"), *every) == [False, True, False, False, False]
    assert selects(q("-t", "1:181"), *every) == [False, False, True, False, False]
    assert selects(q("-t", "trace:to-endpoint"), *every) == [False, False, False, True, False]
    assert selects(q("-t", "trace:1"), *every) == [False, False, False, False, True]
    assert selects(q("-t", "0"), *every) == [True] * 5  # type 0: any
    assert selects(q("-t", "drop", "-t", "l7"), *every) == [True, True, True, False, False]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("trace:typo", "sub type 'typo' is no number nor an observation point"),
        ("4:to-endpoint", "sub type 'to-endpoint' is no number"),  # names only after `trace`
        ("drop:policy", "sub type 'policy' is no number"),
        ("flows", "not a type name"),
        ("-1", "not a type name"),
    ],
)
def test_event_types_hubble_refuses(value: str, message: str) -> None:
    with pytest.raises(FilterError, match=message):
        q("-t", value).compile()


def test_ports_zero_and_icmp() -> None:
    zero = flow(dport=0)
    assert selects(q("--to-port", "0"), zero, flow()) == [True, False]
    # Hubble: an ICMP flow has no port, not even its type
    assert selects(q("--port", "8"), flow(l4="ICMPv4")) == [False]


@pytest.mark.parametrize(
    ("value", "matches"),
    [
        ("4+", [True, True, False, False]),
        ("40+", [True, False, False, False]),
        ("404", [True, False, False, False]),
        ("5+", [False, False, True, False]),
    ],
)
def test_http_status(value: str, matches: list[bool]) -> None:
    def http(code: int | None) -> dict[str, Any]:
        part: dict[str, Any] = {"method": "GET", "url": "/"}
        if code is not None:
            part["code"] = code
        return flow(l7={"http": part}, event_type={"type": 129})

    assert selects(q("--http-status", value), http(404), http(418), http(503), http(None)) == (
        matches
    )


@pytest.mark.parametrize("value", ["404+", "4", "40", "600", "4xx", "+", "0+"])
def test_http_status_forms_hubble_refuses(value: str) -> None:
    with pytest.raises(FilterError, match=re.escape(f"--http-status '{value}'")):
        q("--http-status", value).compile()


def test_http_flags_need_l7_among_the_types() -> None:
    with pytest.raises(FilterError, match="--http-status needs --type l7 among the types"):
        q("--http-status", "200", "-t", "drop").compile()
    with pytest.raises(FilterError, match="--http-path needs --type l7"):
        q("--http-path", "/", "-t", "trace").compile()
    q("--http-method", "GET", "-t", "drop", "-t", "l7").compile()
    q("--http-status", "200", "-t", "129").compile()


def test_selector_empty_lists_hold_the_empty_value() -> None:
    # Kubernetes' parser reads `()` as the empty value
    assert [r.values for r in parse_selector("k notin ()")] == [("",)]
    with_value = flow("default/web-0", "")
    without = flow("", "")
    empty = flow("", "")
    empty["source"]["labels"] = ["k8s:app="]
    query = q("--from-label", "app notin ()")
    assert selects(query, with_value, without, empty) == [True, True, False]
    assert selects(q("--from-label", "app in ()"), with_value, without, empty) == [
        False, False, True]


def test_selector_numeric_comparisons() -> None:
    replica = flow("default/web-0", "")
    replica["source"]["labels"].append("k8s:replica=3")
    assert selects(q("--from-label", "replica>2"), replica) == [True]
    assert selects(q("--from-label", "replica<3"), replica) == [False]


NOW = parse_time("2026-12-05T12:00:00Z")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-12-05T11:59Z", "2026-12-05T11:59:00Z"),
        ("2026-12-05T11Z", "2026-12-05T11:00:00Z"),
        ("2026-12-05T12:59+01:00", "2026-12-05T11:59:00Z"),
        ("2026-12-05T11:59:30.250Z", "2026-12-05T11:59:30.25Z"),
        ("Sat, 05 Dec 2026 11:59:00 +0000", "2026-12-05T11:59:00Z"),
        ("Sat, 05 Dec 2026 12:59:00 +0100", "2026-12-05T11:59:00Z"),
        ("Sat, 05 Dec 2026 11:59:00 GMT", "2026-12-05T11:59:00Z"),
        ("2026-12-05", "2026-12-05T00:00:00Z"),
        ("300ms", "2026-12-05T11:59:59.7Z"),
        ("0", "2026-12-05T12:00:00Z"),
        ("1h30m", "2026-12-05T10:30:00Z"),
    ],
)
def test_hubble_time_forms(text: str, expected: str) -> None:
    assert parse_time_bound(text, NOW) == parse_time(expected)


@pytest.mark.parametrize("text", ["Sat, 05 Dec 2026 11:59:00 MST", "2026-12-05T11", "11:59"])
def test_time_forms_without_a_known_zone_are_refused(text: str) -> None:
    with pytest.raises(FilterError, match="expected a duration"):
        parse_time_bound(text, NOW)


def test_pretest_agrees_with_either_side_filters() -> None:
    # two filters (left, right): a line may match when it could match one of them
    query = q("--namespace", "cilium", "--port", "443", "--verdict", "DROPPED").compile()
    import orjson

    for f in (flow("cilium/a", "default/b", sport=443, verdict="DROPPED"),
              flow("default/b", "cilium/a", dport=443, verdict="DROPPED")):
        line = orjson.dumps(f)
        assert query.matches(f) and query.may_match(line)
    assert not query.may_match(orjson.dumps(flow("cilium/a", "default/b", dport=443)))


# --- Hubble's other flags that garrison's records can answer ---------------------------------


def test_tcp_flags_a_packet_has_all_of() -> None:
    syn = flow(l4="TCP")
    syn["l4"]["TCP"]["flags"] = {"SYN": True}
    syn_ack = flow()
    syn_ack["l4"]["TCP"]["flags"] = {"SYN": True, "ACK": True}
    no_flags = flow()  # a proxy record: no packet, no flags
    every = (syn, syn_ack, no_flags)
    assert selects(q("--tcp-flags", "syn"), *every) == [True, True, False]
    assert selects(q("--tcp-flags", "SYN,ACK"), *every) == [False, True, False]
    assert selects(q("--tcp-flags", "fin", "--tcp-flags", "ack"), *every) == [False, True, False]
    with pytest.raises(FilterError, match="--tcp-flags 'syn,bogus': unknown TCP flag 'BOGUS'"):
        q("--tcp-flags", "syn,bogus").compile()


def test_http_header_name_and_value_exactly() -> None:
    request = flow(l7={"http": {"method": "GET", "url": "/",
                                "headers": [{"key": "X-Team", "value": "empire"}]}})
    assert selects(q("--http-header", "X-Team:empire"), request) == [True]
    assert selects(q("--http-header", "x-team:empire"), request) == [False]
    assert selects(q("--http-header", "X-Team:Empire"), request) == [False]
    with pytest.raises(FilterError, match="expected name:value"):
        q("--http-header", "X-Team").compile()
    with pytest.raises(FilterError, match="--http-header needs --type l7"):
        q("--http-header", "a:b", "-t", "drop").compile()


@pytest.mark.parametrize(
    ("pattern", "node", "selected"),
    [
        ("vm", "vm", True),
        ("default/vm", "vm", True),  # a node name without a cluster is in `default`
        ("v*", "vm", True),
        ("*", "vm", True),
        ("other/vm", "vm", False),
        ("VM", "vm", True),  # patterns are lower case
        ("vm", "vm-2", False),  # whole names
        ("east/*", "east/node-1.example.com", True),
        ("*.example.com", "east/node-1.example.com", True),
    ],
)
def test_node_name_patterns(pattern: str, node: str, selected: bool) -> None:
    assert selects(q("--node-name", pattern), flow(node_name=node)) == [selected]


@pytest.mark.parametrize("pattern", ["a/b/c", "", "vm!"])
def test_node_name_patterns_hubble_refuses(pattern: str) -> None:
    with pytest.raises(FilterError, match="--node-name"):
        q("--node-name", pattern).compile()


def test_ip_versions() -> None:
    v4 = flow()
    v4["IP"]["ipVersion"] = "IPv4"
    v6 = flow()
    v6["IP"]["ipVersion"] = "IPv6"
    none = flow()
    del none["IP"]
    assert selects(q("-4"), v4, v6, none) == [True, False, False]
    assert selects(q("--ipv6"), v4, v6, none) == [False, True, False]
    assert selects(q("--ip-version", "v4", "--ip-version", "ip6"), v4, v6, none) == [
        True, True, False]
    assert selects(q("--ip-version", "none"), v4, v6, none) == [False, False, True]
