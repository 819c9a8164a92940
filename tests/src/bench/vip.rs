//! Latency and throughput through a VIP in network namespaces.
