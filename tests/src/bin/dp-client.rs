//! `dp-client`: a test client run as its own process, so that a test can
//! place it in a cgroup (socket-level load balancing acts on the sockets of
//! processes in a cgroup) and in a network namespace (`ip netns exec`).
//! Prints one JSON object per line; every loop is bounded in count and
//! time.
//!
//! ```text
//! dp-client tcp ADDR:PORT COUNT          COUNT connections: connect, ask, getpeername, close
//! dp-client udp ADDR:PORT COUNT          one unconnected socket: COUNT sendto/recvfrom
//! dp-client udp-connected ADDR:PORT COUNT one connected socket: COUNT send/recv, getpeername
//! dp-client udp-each ADDR:PORT COUNT     COUNT unconnected sockets, one sendto/recvfrom each
//! dp-client tcp-hold ADDR:PORT SECONDS   one connection, a request every 20 ms
//! dp-client udp-hold ADDR:PORT SECONDS   one unconnected socket, a datagram every 20 ms;
//!                                        one line: every answer (Unix ms, backend)
//! ```
//!
//! The servers (`dataplane_tests::servers`) answer a TCP line with "NAME
//! CLIENT-ADDRESS-AS-SEEN" and a UDP datagram with their name.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(3);
/// No run of this client lasts longer, whatever it is asked.
const LIMIT: Duration = Duration::from_secs(60);

fn err_json(what: &str, e: &std::io::Error) -> serde_json::Value {
    json!({ "ok": false, "op": what, "error": e.to_string(), "errno": e.raw_os_error() })
}

fn tcp_once(to: SocketAddr) -> std::io::Result<serde_json::Value> {
    let c = TcpStream::connect_timeout(&to, TIMEOUT)?;
    c.set_read_timeout(Some(TIMEOUT))?;
    c.set_write_timeout(Some(TIMEOUT))?;
    let peer = c.peer_addr()?;
    let local = c.local_addr()?;
    let mut w = c.try_clone()?;
    w.write_all(b"who\n")?;
    let mut line = String::new();
    BufReader::new(c).read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    Ok(json!({
        "ok": true,
        "backend": parts.next().unwrap_or_default(),
        "seen_as": parts.next().unwrap_or_default(),
        "peer": peer.to_string(),
        "local": local.to_string(),
    }))
}

fn udp(to: SocketAddr, count: usize, connected: bool) -> std::io::Result<()> {
    let bind: SocketAddr = if to.is_ipv6() {
        "[::]:0".parse().unwrap()
    } else {
        "0.0.0.0:0".parse().unwrap()
    };
    let s = UdpSocket::bind(bind)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    if connected {
        s.connect(to)?;
    }
    let started = Instant::now();
    let mut buf = [0u8; 2048];
    for _ in 0..count {
        if started.elapsed() > LIMIT {
            break;
        }
        let sent = if connected {
            s.send(b"who")
        } else {
            s.send_to(b"who", to)
        };
        if let Err(e) = sent {
            println!("{}", err_json("send", &e));
            continue;
        }
        match s.recv_from(&mut buf) {
            Ok((n, from)) => {
                let mut v = json!({
                    "ok": true,
                    "backend": String::from_utf8_lossy(&buf[..n]),
                    "from": from.to_string(),
                });
                if connected {
                    v["peer"] = s.peer_addr().map(|a| a.to_string()).unwrap_or_default().into();
                }
                println!("{v}");
            }
            Err(e) => println!("{}", err_json("recv", &e)),
        }
    }
    Ok(())
}

fn tcp_hold(to: SocketAddr, secs: f64) -> std::io::Result<()> {
    let c = TcpStream::connect_timeout(&to, TIMEOUT)?;
    c.set_read_timeout(Some(TIMEOUT))?;
    let mut w = c.try_clone()?;
    let mut r = BufReader::new(c);
    let started = Instant::now();
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut backends = std::collections::BTreeSet::new();
    let limit = Duration::from_secs_f64(secs).min(LIMIT);
    while started.elapsed() < limit {
        let mut line = String::new();
        match w.write_all(b"who\n").and_then(|()| r.read_line(&mut line)) {
            Ok(n) if n > 0 => {
                ok += 1;
                backends.insert(line.split_whitespace().next().unwrap_or_default().to_string());
            }
            _ => {
                failed += 1;
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "{}",
        json!({ "ok": failed == 0, "exchanges": ok, "failed": failed, "backends": backends })
    );
    Ok(())
}

/// One unconnected UDP socket talking to `to` for `secs`: a datagram every
/// 20 ms, each answer recorded with its arrival time (Unix milliseconds)
/// so that a test can tell what was answered before and after a change.
fn udp_hold(to: SocketAddr, secs: f64) -> std::io::Result<()> {
    let bind: SocketAddr = if to.is_ipv6() {
        "[::]:0".parse().unwrap()
    } else {
        "0.0.0.0:0".parse().unwrap()
    };
    let s = UdpSocket::bind(bind)?;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    let started = Instant::now();
    let limit = Duration::from_secs_f64(secs).min(LIMIT);
    let (mut answers, mut lost, mut from) = (Vec::new(), 0u64, std::collections::BTreeSet::new());
    let mut buf = [0u8; 2048];
    while started.elapsed() < limit {
        s.send_to(b"who", to)?;
        match s.recv_from(&mut buf) {
            Ok((n, src)) => {
                let ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                answers.push(json!([ms, String::from_utf8_lossy(&buf[..n])]));
                from.insert(src.to_string());
            }
            Err(_) => lost += 1,
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "{}",
        json!({ "ok": true, "answers": answers, "lost": lost, "from": from })
    );
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: dp-client tcp|udp|udp-connected|udp-each ADDR:PORT COUNT | tcp-hold|udp-hold ADDR:PORT SECONDS";
    let (Some(mode), Some(to), Some(n)) = (args.first(), args.get(1), args.get(2)) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let to: SocketAddr = to.parse().unwrap_or_else(|e| {
        eprintln!("{to}: {e}");
        std::process::exit(2)
    });
    let result = match mode.as_str() {
        "tcp" => {
            let count: usize = n.parse().expect("COUNT");
            let started = Instant::now();
            for _ in 0..count {
                if started.elapsed() > LIMIT {
                    break;
                }
                match tcp_once(to) {
                    Ok(v) => println!("{v}"),
                    Err(e) => println!("{}", err_json("connect", &e)),
                }
            }
            Ok(())
        }
        "udp" => udp(to, n.parse().expect("COUNT"), false),
        "udp-connected" => udp(to, n.parse().expect("COUNT"), true),
        "udp-each" => (0..n.parse::<usize>().expect("COUNT")).try_for_each(|_| udp(to, 1, false)),
        "tcp-hold" => tcp_hold(to, n.parse().expect("SECONDS")),
        "udp-hold" => udp_hold(to, n.parse().expect("SECONDS")),
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        println!("{}", err_json(mode, &e));
    }
}
