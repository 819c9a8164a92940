//! Service and EndpointSlice manifests for tests, shaped like the ones in
//! deploy/examples.

use std::net::{IpAddr, Ipv4Addr};

/// A ClusterIP Service `ns/name` with one port per (name, port, protocol).
pub fn service(ns: &str, name: &str, vip: Ipv4Addr, ports: &[(&str, u16, &str)]) -> String {
    let mut s = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  type: ClusterIP\n  clusterIP: {vip}\n  clusterIPs: [{vip}]\n  ports:\n"
    );
    for (pname, port, proto) in ports {
        s.push_str(&format!("  - {{name: {pname}, port: {port}, protocol: {proto}}}\n"));
    }
    s
}

/// A ClusterIP Service `ns/name` with one ClusterIP per address in `vips`
/// (one family: single-stack; both: dual-stack, `ipFamilies` in the order
/// given, as the API server writes it).
pub fn service_ips(ns: &str, name: &str, vips: &[IpAddr], ports: &[(&str, u16, &str)]) -> String {
    let ips: Vec<String> = vips.iter().map(|v| format!("\"{v}\"")).collect();
    let families: Vec<&str> = vips.iter().map(|v| if v.is_ipv6() { "IPv6" } else { "IPv4" }).collect();
    let policy = if vips.len() > 1 {
        "RequireDualStack"
    } else {
        "SingleStack"
    };
    let mut s = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  type: ClusterIP\n  clusterIP: {}\n  clusterIPs: [{}]\n  ipFamilies: [{}]\n  ipFamilyPolicy: {policy}\n  ports:\n",
        ips[0],
        ips.join(", "),
        families.join(", ")
    );
    for (pname, port, proto) in ports {
        s.push_str(&format!("  - {{name: {pname}, port: {port}, protocol: {proto}}}\n"));
    }
    s
}

/// As `slice`, for endpoints of either family: `addressType` is the family
/// of the addresses (all of one family, as in a real slice).
pub fn slice_ips(ns: &str, name: &str, svc: &str, ports: &[(&str, u16, &str)], addrs: &[IpAddr]) -> String {
    let v4: Vec<Ipv4Addr> = Vec::new();
    let mut s = slice(ns, name, svc, ports, &v4);
    if addrs.first().is_some_and(|a| a.is_ipv6()) {
        s = s.replace("addressType: IPv4", "addressType: IPv6");
    }
    if !addrs.is_empty() {
        s = s.replace("endpoints: []\n", "endpoints:\n");
    }
    for a in addrs {
        s.push_str(&format!(
            "- addresses: [\"{a}\"]\n  conditions: {{ready: true, serving: true, terminating: false}}\n"
        ));
    }
    s
}

/// An EndpointSlice of Service `ns/svc` with ready endpoints `addrs`, every
/// port named as in the Service and served on `(name, port, protocol)`.
pub fn slice(ns: &str, name: &str, svc: &str, ports: &[(&str, u16, &str)], addrs: &[Ipv4Addr]) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {{kubernetes.io/service-name: {svc}}}\naddressType: IPv4\nports:\n"
    );
    for (pname, port, proto) in ports {
        s.push_str(&format!("- {{name: {pname}, port: {port}, protocol: {proto}}}\n"));
    }
    s.push_str("endpoints:\n");
    if addrs.is_empty() {
        s.truncate(s.len() - 1);
        s.push_str(" []\n");
    }
    for a in addrs {
        s.push_str(&format!(
            "- addresses: [{a}]\n  conditions: {{ready: true, serving: true, terminating: false}}\n"
        ));
    }
    s
}

/// An EndpointSlice `ns/name` of Service `svc` for one port `(name,
/// protocol, port)` with one ready endpoint on each node of
/// `netns::TwoNodes`: `BACKEND_A` on `node-a`, `BACKEND_B` on `node-b`.
pub fn two_node_slice(ns: &str, name: &str, svc: &str, (pname, proto, port): (&str, &str, u16)) -> String {
    use crate::netns::{BACKEND_A, BACKEND_B};
    format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}
  namespace: {ns}
  labels: {{kubernetes.io/service-name: {svc}}}
addressType: IPv4
ports: [{{name: {pname}, protocol: {proto}, port: {port}}}]
endpoints:
- addresses: [{BACKEND_A}]
  conditions: {{ready: true}}
  nodeName: node-a
- addresses: [{BACKEND_B}]
  conditions: {{ready: true}}
  nodeName: node-b
"
    )
}

/// Endpoint conditions: (address, ready, serving, terminating).
pub type Conditions = (Ipv4Addr, bool, bool, bool);

/// As `slice`, with explicit conditions per endpoint.
pub fn slice_with_conditions(
    ns: &str,
    name: &str,
    svc: &str,
    ports: &[(&str, u16, &str)],
    endpoints: &[Conditions],
) -> String {
    let mut s = slice(ns, name, svc, ports, &[]);
    s.truncate(s.len() - " []\n".len());
    s.push('\n');
    for (a, ready, serving, terminating) in endpoints {
        s.push_str(&format!(
            "- addresses: [{a}]\n  conditions: {{ready: {ready}, serving: {serving}, terminating: {terminating}}}\n"
        ));
    }
    s
}
