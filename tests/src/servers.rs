//! The "nginx" of the sandbox: an HTTP/1.1 server (keep-alive capable) and
//! a UDP server, both answering with the pod's name. They run as threads
//! inside the pod's namespace and stop when dropped.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;

use crate::netns::Netns;

pub struct Servers {
    tcp: Vec<Arc<TcpListener>>,
    udp: Vec<Arc<UdpSocket>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl Servers {
    /// HTTP and UDP servers on both families (`[::]` only for IPv6: the
    /// namespace gets net.ipv6.bindv6only=1, so IPv4 peers keep showing as
    /// IPv4 addresses).
    pub fn start(ns: &Netns, pod_name: &str, http_port: u16, udp_port: u16) -> anyhow::Result<Self> {
        let any = [Ipv4Addr::UNSPECIFIED.into(), Ipv6Addr::UNSPECIFIED.into()];
        Self::start_on(ns, &any, pod_name, http_port, udp_port)
    }

    /// The same servers bound to `addrs` only, as a host-network server
    /// bound to the node's address (its UDP answers then come from that
    /// address, whatever the route back prefers).
    pub fn start_on(
        ns: &Netns,
        addrs: &[IpAddr],
        pod_name: &str,
        http_port: u16,
        udp_port: u16,
    ) -> anyhow::Result<Self> {
        ns.sysctl("net.ipv6.bindv6only", "1")?;
        let addrs = addrs.to_vec();
        let (tcp, udp) = ns.run(move || -> anyhow::Result<_> {
            let mut tcp = Vec::new();
            let mut udp = Vec::new();
            for any in addrs {
                tcp.push(Arc::new(
                    TcpListener::bind((any, http_port)).context("binding HTTP port")?,
                ));
                udp.push(Arc::new(UdpSocket::bind((any, udp_port)).context("binding UDP port")?));
            }
            Ok((tcp, udp))
        })??;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for listener in &tcp {
            let (listener, stopped, name) = (listener.clone(), stop.clone(), pod_name.to_string());
            threads.push(std::thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { break };
                    if stopped.load(Ordering::Relaxed) {
                        break;
                    }
                    let name = name.clone();
                    std::thread::spawn(move || serve_http(conn, &name));
                }
                Ok(())
            }));
        }
        for socket in &udp {
            let (socket, stopped, name) = (socket.clone(), stop.clone(), pod_name.to_string());
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while let Ok((_, peer)) = socket.recv_from(&mut buf) {
                    if stopped.load(Ordering::Relaxed) {
                        break;
                    }
                    let _ = socket.send_to(name.as_bytes(), peer);
                }
                Ok(())
            }));
        }
        Ok(Servers {
            tcp,
            udp,
            stop,
            threads,
        })
    }
}

/// Answers requests on one connection until the client closes it.
fn serve_http(conn: TcpStream, name: &str) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut writer = conn;
    loop {
        let mut close = false;
        let mut bulk_mib = None;
        let mut line = String::new();
        // Request line and headers, up to the empty line.
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line.to_ascii_lowercase().starts_with("connection: close") || line.starts_with("GET / HTTP/1.0") {
                close = true;
            }
            // GET /bulk/<MiB>: that much data, then close (throughput runs).
            if let Some(rest) = line.strip_prefix("GET /bulk/") {
                bulk_mib = rest.split_whitespace().next().and_then(|n| n.parse::<usize>().ok());
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
        }
        if let Some(mib) = bulk_mib {
            let header = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                mib << 20
            );
            let chunk = vec![0u8; 1 << 20];
            if writer.write_all(header.as_bytes()).is_ok() {
                for _ in 0..mib {
                    if writer.write_all(&chunk).is_err() {
                        break;
                    }
                }
            }
            return;
        }
        let body = format!("{name}\n");
        // X-Client: the source address this pod sees (the client, or a node
        // when the flow was masqueraded).
        let peer = writer.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default();
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Client: {peer}\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n{body}",
            body.len(),
            if close { "close" } else { "keep-alive" }
        );
        if writer.write_all(response.as_bytes()).is_err() || close {
            return;
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        // shutdown(2) wakes the blocked accept/recv so the threads end and the
        // sockets (which pin the namespace) close.
        self.stop.store(true, Ordering::Relaxed);
        // SAFETY: plain syscalls on fds we own.
        unsafe {
            for l in &self.tcp {
                libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR);
            }
            for u in &self.udp {
                libc::shutdown(u.as_raw_fd(), libc::SHUT_RDWR);
            }
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
