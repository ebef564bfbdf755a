//! SCTP without an SCTP stack (this kernel has no SCTP module): raw
//! IPPROTO_SCTP sockets send crafted packets and receive every SCTP packet
//! of their namespace, with the CRC32c computed and checked here. A client
//! sends INIT and waits for INIT ACK; a backend answers INIT with INIT ACK
//! and reports what it received. Call these inside a namespace
//! (`Netns::run` / `Netns::spawn`).

use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

const CASTAGNOLI: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
const IPPROTO_SCTP: i32 = 132;
pub const INIT: u8 = 1;
pub const INIT_ACK: u8 = 2;

/// An SCTP packet (common header + one INIT or INIT ACK chunk) with a
/// correct CRC32c.
pub fn init_packet(kind: u8, sport: u16, dport: u16, vtag: u32, initiate_tag: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(32);
    p.extend(sport.to_be_bytes());
    p.extend(dport.to_be_bytes());
    p.extend(vtag.to_be_bytes());
    p.extend([0u8; 4]);
    // Chunk header, initiate tag, a_rwnd, outbound / inbound streams, initial TSN.
    p.extend([kind, 0]);
    p.extend(20u16.to_be_bytes());
    p.extend(initiate_tag.to_be_bytes());
    p.extend(65536u32.to_be_bytes());
    p.extend([0, 10, 0, 10]);
    p.extend(1u32.to_be_bytes());
    let crc = CASTAGNOLI.checksum(&p);
    p[8..12].copy_from_slice(&crc.to_le_bytes());
    p
}

/// An SCTP packet as received: addresses, the common header's fields, the
/// first chunk's type and initiate tag, and whether its CRC32c is right.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub vtag: u32,
    pub chunk: u8,
    pub initiate_tag: u32,
    pub crc_ok: bool,
}

fn parse(src: IpAddr, dst: IpAddr, sctp: &[u8]) -> Option<Received> {
    if sctp.len() < 16 {
        return None;
    }
    let mut zeroed = sctp.to_vec();
    zeroed[8..12].fill(0);
    let be16 = |at: usize| u16::from_be_bytes([sctp[at], sctp[at + 1]]);
    let be32 = |at: usize| u32::from_be_bytes(sctp[at..at + 4].try_into().unwrap());
    Some(Received {
        src: SocketAddr::new(src, be16(0)),
        dst: SocketAddr::new(dst, be16(2)),
        vtag: be32(4),
        chunk: sctp[12],
        initiate_tag: if sctp.len() >= 20 { be32(16) } else { 0 },
        crc_ok: CASTAGNOLI.checksum(&zeroed).to_le_bytes() == sctp[8..12],
    })
}

/// A raw IPPROTO_SCTP socket of one family.
pub struct RawSctp {
    fd: OwnedFd,
    v6: bool,
}

impl RawSctp {
    pub fn open(v6: bool) -> anyhow::Result<Self> {
        let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
        // SAFETY: plain socket call; the descriptor is owned below.
        let fd = unsafe { libc::socket(family, libc::SOCK_RAW | libc::SOCK_CLOEXEC, IPPROTO_SCTP) };
        if fd < 0 {
            bail!("raw SCTP socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        if v6 {
            // The destination address of received packets (IPV6_PKTINFO).
            let on: libc::c_int = 1;
            // SAFETY: option value of the documented type and size.
            let rc = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::IPPROTO_IPV6,
                    libc::IPV6_RECVPKTINFO,
                    (&on as *const libc::c_int).cast(),
                    size_of::<libc::c_int>() as u32,
                )
            };
            if rc != 0 {
                bail!("IPV6_RECVPKTINFO: {}", std::io::Error::last_os_error());
            }
        }
        Ok(RawSctp { fd, v6 })
    }

    /// Sends `sctp` (an SCTP packet) to `dst`; the kernel adds the IP header.
    pub fn send(&self, dst: IpAddr, sctp: &[u8]) -> anyhow::Result<()> {
        // SAFETY: an all-zero sockaddr_in is valid; filled in below.
        let mut sa4: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        // SAFETY: likewise for sockaddr_in6.
        let mut sa6: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        let (sa, len): (*const libc::sockaddr, usize) = match dst {
            IpAddr::V4(a) if !self.v6 => {
                sa4.sin_family = libc::AF_INET as u16;
                sa4.sin_addr.s_addr = u32::from_ne_bytes(a.octets());
                (
                    (&sa4 as *const libc::sockaddr_in).cast(),
                    size_of::<libc::sockaddr_in>(),
                )
            }
            IpAddr::V6(a) if self.v6 => {
                sa6.sin6_family = libc::AF_INET6 as u16;
                sa6.sin6_addr.s6_addr = a.octets();
                (
                    (&sa6 as *const libc::sockaddr_in6).cast(),
                    size_of::<libc::sockaddr_in6>(),
                )
            }
            _ => bail!("{dst} is not of this socket's family"),
        };
        // SAFETY: buffer and address valid for the call.
        let n = unsafe { libc::sendto(self.fd.as_raw_fd(), sctp.as_ptr().cast(), sctp.len(), 0, sa, len as u32) };
        if n < 0 {
            bail!("sending SCTP to {dst}: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The next SCTP packet that `want` accepts, within `timeout`.
    pub fn recv_matching(&self, timeout: Duration, want: impl Fn(&Received) -> bool) -> anyhow::Result<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no matching SCTP packet within {timeout:?}");
            }
            if let Some(r) = self.recv(left)?
                && want(&r)
            {
                return Ok(r);
            }
        }
    }

    /// One packet, `None` on timeout or when it is not SCTP we can parse.
    fn recv(&self, timeout: Duration) -> anyhow::Result<Option<Received>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis().max(1) as i32) };
        if ready <= 0 {
            return Ok(None);
        }
        let mut buf = [0u8; 2048];
        let mut control = [0u64; 16];
        // SAFETY: an all-zero sockaddr_in6 is valid (recvmsg fills it).
        let mut from: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: an all-zero msghdr is valid; its fields are set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&mut from as *mut libc::sockaddr_in6).cast();
        msg.msg_namelen = size_of::<libc::sockaddr_in6>() as u32;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = size_of::<[u64; 16]>();
        // SAFETY: msghdr points at live buffers of the given sizes.
        let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
        if n < 0 {
            return Err(std::io::Error::last_os_error()).context("receiving SCTP");
        }
        let data = &buf[..n as usize];
        if !self.v6 {
            // IPv4 raw sockets deliver the IP header too.
            if data.len() < 20 {
                return Ok(None);
            }
            let ihl = (data[0] & 0x0f) as usize * 4;
            let addr = |at: usize| IpAddr::V4(Ipv4Addr::new(data[at], data[at + 1], data[at + 2], data[at + 3]));
            return Ok(data.get(ihl..).and_then(|sctp| parse(addr(12), addr(16), sctp)));
        }
        let src = IpAddr::V6(Ipv6Addr::from(from.sin6_addr.s6_addr));
        let mut dst = None;
        // SAFETY: walking the control messages recvmsg wrote, with the libc macros.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::IPPROTO_IPV6 && (*c).cmsg_type == libc::IPV6_PKTINFO {
                    let info = (libc::CMSG_DATA(c) as *const libc::in6_pktinfo).read_unaligned();
                    dst = Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        Ok(dst.and_then(|dst| parse(src, dst, data)))
    }
}

/// Client: sends INIT from `sport` to `to` (again every 100 ms, as SCTP
/// retransmits) until an INIT ACK for it arrives; returns that INIT ACK.
pub fn associate(to: SocketAddr, sport: u16, timeout: Duration) -> anyhow::Result<Received> {
    let socket = RawSctp::open(to.is_ipv6())?;
    let tag = client_tag(sport);
    let init = init_packet(INIT, sport, to.port(), 0, tag);
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        socket.send(to.ip(), &init)?;
        if let Ok(ack) = socket.recv_matching(Duration::from_millis(100), |r| {
            r.chunk == INIT_ACK && r.dst.port() == sport && r.vtag == tag
        }) {
            return Ok(ack);
        }
    }
    bail!("no INIT ACK from {to} within {timeout:?}")
}

/// The initiate tag `associate` sends from `sport`: it crosses NAT
/// unchanged, so a backend can tell that client's INIT.
pub fn client_tag(sport: u16) -> u32 {
    0x1000_0000 | sport as u32
}

/// Backend: waits for an INIT to `port` with initiate tag `tag`, answers it
/// with an INIT ACK and returns the INIT as received.
pub fn answer_init(v6: bool, port: u16, tag: u32, timeout: Duration) -> anyhow::Result<Received> {
    let socket = RawSctp::open(v6)?;
    let init = socket.recv_matching(timeout, |r| {
        r.chunk == INIT && r.dst.port() == port && r.initiate_tag == tag
    })?;
    let ack = init_packet(
        INIT_ACK,
        port,
        init.src.port(),
        init.initiate_tag,
        0x2000_0000 | port as u32,
    );
    socket.send(init.src.ip(), &ack)?;
    Ok(init)
}
