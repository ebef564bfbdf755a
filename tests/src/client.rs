//! Client side of the sandbox: HTTP GETs (one connection each, or one
//! keep-alive connection) and UDP queries. Call these inside a client
//! namespace (`Netns::run`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::netns::Netns;

pub const TIMEOUT: Duration = Duration::from_secs(2);

/// One request on a new connection; returns the body (the pod name).
pub fn http_get(addr: SocketAddr) -> anyhow::Result<String> {
    http_get_seen(addr).map(|(pod, _)| pod)
}

/// One request on a new connection: the pod that answered and the source
/// address it saw (`X-Client`).
pub fn http_get_seen(addr: SocketAddr) -> anyhow::Result<(String, String)> {
    let mut conn = TcpStream::connect_timeout(&addr, TIMEOUT).with_context(|| format!("connecting to {addr}"))?;
    conn.set_read_timeout(Some(TIMEOUT))?;
    conn.write_all(b"GET / HTTP/1.0\r\nHost: service\r\n\r\n")?;
    let mut response = String::new();
    conn.read_to_string(&mut response)
        .with_context(|| format!("reading from {addr}"))?;
    let seen = response
        .lines()
        .find_map(|l| l.strip_prefix("X-Client: "))
        .unwrap_or_default()
        .trim()
        .to_string();
    Ok((body(&response)?, seen))
}

/// Downloads `mib` MiB over one connection (`GET /bulk/<mib>`); returns the
/// bytes received and how long the transfer took.
pub fn bulk_get(addr: SocketAddr, mib: usize) -> anyhow::Result<(u64, Duration)> {
    let started = std::time::Instant::now();
    let mut conn = TcpStream::connect_timeout(&addr, TIMEOUT).with_context(|| format!("connecting to {addr}"))?;
    conn.set_read_timeout(Some(TIMEOUT))?;
    conn.write_all(format!("GET /bulk/{mib} HTTP/1.0\r\n\r\n").as_bytes())?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        match conn.read(&mut buf).with_context(|| format!("reading from {addr}"))? {
            0 => break,
            n => total += n as u64,
        }
    }
    if total < (mib as u64) << 20 {
        bail!("short transfer: {total} bytes of {mib} MiB");
    }
    Ok((total, started.elapsed()))
}

fn body(response: &str) -> anyhow::Result<String> {
    let Some((head, body)) = response.split_once("\r\n\r\n") else {
        bail!("malformed HTTP response {response:?}");
    };
    if !head.starts_with("HTTP/1.1 200") {
        bail!("unexpected status in {head:?}");
    }
    Ok(body.trim().to_string())
}

/// One TCP connection used for many requests.
pub struct KeepAlive {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl KeepAlive {
    pub fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let conn = TcpStream::connect_timeout(&addr, TIMEOUT).with_context(|| format!("connecting to {addr}"))?;
        conn.set_read_timeout(Some(TIMEOUT))?;
        Ok(KeepAlive {
            reader: BufReader::new(conn.try_clone()?),
            writer: conn,
        })
    }

    pub fn get(&mut self) -> anyhow::Result<String> {
        self.writer.write_all(b"GET / HTTP/1.1\r\nHost: service\r\n\r\n")?;
        let mut head = String::new();
        let mut content_length = 0usize;
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                bail!("connection closed by the server");
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                content_length = v.trim().parse()?;
            }
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0u8; content_length];
        self.reader.read_exact(&mut body)?;
        Ok(String::from_utf8(body)?.trim().to_string())
    }
}

/// GET `path` over HTTP/1.0 (the agent's /metrics, /healthz, health
/// check ports): the whole response, status line and headers included.
pub fn raw_http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut conn = TcpStream::connect_timeout(&addr, TIMEOUT).with_context(|| format!("connecting to {addr}"))?;
    conn.set_read_timeout(Some(TIMEOUT))?;
    conn.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    conn.read_to_string(&mut out)
        .with_context(|| format!("reading from {addr}"))?;
    Ok(out)
}

/// The status code of a whole HTTP response.
pub fn status_of(response: &str) -> Option<u16> {
    response.split_whitespace().nth(1)?.parse().ok()
}

/// One UDP datagram and its answer.
pub fn udp_query(addr: SocketAddr) -> anyhow::Result<String> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    socket.connect(addr)?;
    socket.send(b"who are you")?;
    let mut buf = [0u8; 1500];
    let n = socket
        .recv(&mut buf)
        .with_context(|| format!("waiting for a UDP answer from {addr}"))?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
}

/// Sends `n` queries from inside `client` (each on a new connection or
/// socket) and counts the answers: pod name → how many.
pub fn tally(
    client: &Netns,
    n: usize,
    target: SocketAddr,
    query: fn(SocketAddr) -> anyhow::Result<String>,
) -> anyhow::Result<BTreeMap<String, usize>> {
    client.run(move || {
        let mut counts = BTreeMap::new();
        for i in 0..n {
            let pod = query(target).with_context(|| format!("query {i} of {n} to {target}"))?;
            *counts.entry(pod).or_insert(0) += 1;
        }
        Ok(counts)
    })?
}
