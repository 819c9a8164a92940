//! The Service most end-to-end tests use: `shop/web` at 198.19.0.10, TCP
//! port 80 ("http") and UDP port 53 ("dns"), its backends in the topology's
//! backend namespaces answering with their names (`b1`, `b2`, ...) on 8080
//! and 5353.

use std::net::Ipv4Addr;

use crate::{
    manifests::{service, slice},
    netns::{backend_addr, Topology},
    servers::{tcp_server, udp_server, Server},
};

pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
pub const PORTS: &[(&str, u16, &str)] = &[("http", 80, "TCP"), ("dns", 53, "UDP")];
pub const TARGETS: &[(&str, u16, &str)] = &[("http", 8080, "TCP"), ("dns", 5353, "UDP")];

/// A TCP and a UDP server in every backend namespace of `t`.
pub fn start_servers(t: &Topology) -> Vec<Server> {
    let mut v = Vec::new();
    for (i, ns) in t.backends.iter().enumerate() {
        let name = format!("b{}", i + 1);
        v.push(tcp_server(ns, backend_addr(i + 1), 8080, &name));
        v.push(udp_server(ns, backend_addr(i + 1), 5353, &name));
    }
    v
}

/// The Service and one EndpointSlice with the backends numbered `backends`.
pub fn manifests(backends: &[usize]) -> Vec<(&'static str, String)> {
    let addrs: Vec<Ipv4Addr> = backends.iter().map(|i| backend_addr(*i)).collect();
    vec![
        ("service.yaml", service("shop", "web", VIP, PORTS)),
        ("slice.yaml", slice("shop", "web-abcde", "web", TARGETS, &addrs)),
    ]
}
