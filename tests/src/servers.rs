//! Backend servers and clients that run inside namespaces. Every loop is
//! bounded in time; servers stop when their guard drops.

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::netns::Netns;

/// The longest any server lives, whatever the test does.
const SERVER_LIFETIME: Duration = Duration::from_secs(300);

/// A server thread in a namespace; stopped and joined on drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP server at `addr:port` in `ns`: for every line a client sends, it
/// answers `name` and a newline. Connections are served on their own threads.
pub fn tcp_server(ns: &Netns, addr: impl Into<IpAddr>, port: u16, name: &str) -> Server {
    let addr: IpAddr = addr.into();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let name = name.to_string();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = ns.run(move || {
        let l = TcpListener::bind((addr, port)).unwrap_or_else(|e| panic!("bind {addr}:{port}: {e}"));
        l.set_nonblocking(true).unwrap();
        ready_tx.send(()).unwrap();
        let started = Instant::now();
        let mut conns = Vec::new();
        while !s.load(Ordering::Relaxed) && started.elapsed() < SERVER_LIFETIME {
            match l.accept() {
                Ok((c, _)) => {
                    let name = name.clone();
                    let s = s.clone();
                    conns.push(std::thread::spawn(move || serve_lines(c, &name, &s)));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(2)),
                Err(e) => panic!("accept on {addr}:{port}: {e}"),
            }
        }
        for c in conns {
            let _ = c.join();
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("TCP server did not start");
    Server {
        stop,
        thread: Some(thread),
    }
}

/// A TCP server on every local address of `ns` at `port`: for every line a
/// client sends, it answers with the local address the connection reached
/// (its backend identity when many backend addresses share one namespace).
pub fn tcp_server_any_addr(ns: &Netns, port: u16) -> Server {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = ns.run(move || {
        let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap_or_else(|e| panic!("bind *:{port}: {e}"));
        l.set_nonblocking(true).unwrap();
        ready_tx.send(()).unwrap();
        let started = Instant::now();
        let mut conns: Vec<JoinHandle<()>> = Vec::new();
        while !s.load(Ordering::Relaxed) && started.elapsed() < SERVER_LIFETIME {
            match l.accept() {
                Ok((c, _)) => {
                    let name = c.local_addr().map(|a| a.ip().to_string()).unwrap_or_default();
                    let s = s.clone();
                    conns.retain(|h| !h.is_finished());
                    conns.push(std::thread::spawn(move || serve_lines(c, &name, &s)));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(1)),
                Err(e) => panic!("accept on *:{port}: {e}"),
            }
        }
        for c in conns {
            let _ = c.join();
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("TCP server did not start");
    Server {
        stop,
        thread: Some(thread),
    }
}

fn serve_lines(c: TcpStream, name: &str, stop: &AtomicBool) {
    c.set_nonblocking(false).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    // The answer carries the client address as this backend sees it, so
    // tests can tell whether the source was preserved or translated.
    let peer = c.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default();
    let mut w = c.try_clone().unwrap();
    let mut r = BufReader::new(c);
    let started = Instant::now();
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) && started.elapsed() < SERVER_LIFETIME {
        match r.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if w.write_all(format!("{name} {peer}\n").as_bytes()).is_err() {
                    return;
                }
                line.clear();
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// A UDP server at `addr:port` in `ns` that answers every datagram with `name`.
pub fn udp_server(ns: &Netns, addr: impl Into<IpAddr>, port: u16, name: &str) -> Server {
    let addr: IpAddr = addr.into();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let name = name.to_string();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = ns.run(move || {
        let sock = UdpSocket::bind((addr, port)).unwrap_or_else(|e| panic!("bind udp {addr}:{port}: {e}"));
        sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        ready_tx.send(()).unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 2048];
        while !s.load(Ordering::Relaxed) && started.elapsed() < SERVER_LIFETIME {
            if let Ok((_, from)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(name.as_bytes(), from);
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("UDP server did not start");
    Server {
        stop,
        thread: Some(thread),
    }
}

/// A client connection that asks "who are you" and reads the answer.
pub struct Conn {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Conn {
    pub fn connect(to: SocketAddr, timeout: Duration) -> std::io::Result<Conn> {
        let c = TcpStream::connect_timeout(&to, timeout)?;
        c.set_read_timeout(Some(timeout))?;
        c.set_write_timeout(Some(timeout))?;
        Ok(Conn {
            w: c.try_clone()?,
            r: BufReader::new(c),
        })
    }

    /// One request/response; the answer is the backend's name.
    pub fn ask(&mut self) -> std::io::Result<String> {
        Ok(self.ask_peer()?.0)
    }

    /// One request/response: the backend's name and the client address it
    /// saw.
    pub fn ask_peer(&mut self) -> std::io::Result<(String, String)> {
        self.w.write_all(b"who\n")?;
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        let mut parts = line.split_whitespace();
        let name = parts.next().unwrap_or_default().to_string();
        Ok((name, parts.next().unwrap_or_default().to_string()))
    }

    /// One line the server sent without being asked (it pushed).
    pub fn read_line(&mut self) -> std::io::Result<String> {
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        Ok(line)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.w.local_addr().unwrap()
    }
}
