//! Service and EndpointSlice manifests for tests, shaped like the ones in
//! deploy/examples.

use std::net::Ipv4Addr;

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
